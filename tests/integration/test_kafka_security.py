"""Kafka with TLS and SASL, as a production cluster asks for it: the local Apache Kafka gets SSL,
SASL_PLAINTEXT and SASL_SSL listeners (PLAIN and SCRAM-SHA-256/512) beside PLAINTEXT, with a
certificate from a test CA. cdc publishes and consumes over each; a wrong password or an untrusted
certificate stops it at start with exit 2 (a restart cannot fix it), never retried for minutes, and
no output ever shows the password."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from cdc.config import load_pipeline
from cdc.dev.kafka import KafkaCluster, SecureListeners
from cdc.publish.admin import ensure_topics
from tests.integration.certs import issue_localhost_cert, make_ca, openssl
from tests.integration.harness import CdcProcess, sqlite_rows, wait_for_slot, wait_until

PASSWORD = "wombat-4417-secret"  # must never be printed
ACL_USERS = ("shop-connector", "shop-replica", "mallory")
KEYSTORE_PASSWORD = "keystore-pass"


@pytest.fixture(scope="module")
def kafka_ca(tmp_path_factory) -> Path:
    """A CA, and a broker certificate for `localhost` in a PKCS#12 keystore."""
    d = tmp_path_factory.mktemp("kafka-tls")
    make_ca(d)
    cert, key = issue_localhost_cert(d, "broker")
    openssl("pkcs12", "-export", "-in", cert.name, "-inkey", key.name, "-out", "broker.p12",
            "-passout", f"pass:{KEYSTORE_PASSWORD}", "-name", "broker", cwd=d)
    (d / "password").write_text(PASSWORD + "\n")
    return d


@pytest.fixture(scope="module")
def secure_kafka(kafka_ca):
    # `cdc` may do everything; the ACL test's principals only what their ACLs allow.
    secure = SecureListeners(keystore=kafka_ca / "broker.p12", keystore_password=KEYSTORE_PASSWORD,
                             users={"cdc": PASSWORD, **{user: PASSWORD for user in ACL_USERS}}, super_users=("cdc",))
    with KafkaCluster(nodes=1, secure=secure) as cluster:
        yield cluster


def _pipeline(tmp_path: Path, bootstrap: str, security: dict, source: str = "postgresql://cdc@127.0.0.1:9/shop",
              name: str = "secure") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": name,
        "source": {"postgres": source, "tables": ["public.customers"], "status_interval_s": 1, "snapshot": "never"},
        "kafka": {"bootstrap_servers": bootstrap, "security": security},
        "sinks": {"replica": {"url": "sqlite:///replica.db"}},
    }, sort_keys=False))
    return path


SECURITY = {
    "SSL": {"protocol": "SSL"},
    "SASL_PLAINTEXT PLAIN": {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "username": "cdc",
                             "password": PASSWORD},
    "SASL_PLAINTEXT SCRAM-SHA-512": {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                     "username": "cdc", "password": PASSWORD},
    "SASL_SSL SCRAM-SHA-256": {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "username": "cdc",
                               "password_file": "{dir}/password"},
}


def _security(label: str, ca_dir: Path) -> dict:
    security = {k: v.format(dir=ca_dir) if isinstance(v, str) else v for k, v in SECURITY[label].items()}
    if security["protocol"].endswith("SSL"):
        security["ca_file"] = str(ca_dir / "ca.crt")
    return security


@pytest.mark.parametrize("label", sorted(SECURITY))
def test_topics_events_and_reads_over_each_protocol(tmp_path, secure_kafka, kafka_ca, label):
    security = _security(label, kafka_ca)
    config = load_pipeline(_pipeline(tmp_path, secure_kafka.secure_bootstrap(security["protocol"], "localhost"),
                                     security)).kafka
    topic = f"secure.{uuid.uuid4().hex[:8]}"

    async def roundtrip() -> list[bytes]:
        await ensure_topics(config, [topic])  # the admin client
        producer = AIOKafkaProducer(**config.client_options(), acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"over " + label.encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(**config.client_options(), enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            await consumer.seek_to_beginning(TopicPartition(topic, 0))
            batch = await consumer.getmany(timeout_ms=10000)
            return [m.value for messages in batch.values() for m in messages]
        finally:
            await consumer.stop()

    assert asyncio.run(roundtrip()) == [b"over " + label.encode()]


def test_cdc_run_over_sasl_ssl_end_to_end(tmp_path, secure_kafka, kafka_ca, source_db):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        conn.execute("ALTER TABLE customers REPLICA IDENTITY FULL")
    security = _security("SASL_SSL SCRAM-SHA-256", kafka_ca) | {"sasl_mechanism": "SCRAM-SHA-512"}
    name = f"sasl_{uuid.uuid4().hex[:8]}"
    path = _pipeline(tmp_path, secure_kafka.secure_bootstrap("SASL_SSL", "localhost"), security, source_db, name)
    replica = tmp_path / "replica.db"
    with CdcProcess(path) as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO customers SELECT i, 'c' || i FROM generate_series(1, 100) i")
        wait_until(lambda: replica.exists() and len(sqlite_rows(replica, "customers", "id")) == 100,
                   process=proc, what="100 rows in the replica")
        assert proc.stop() == 0, proc.log()
    assert PASSWORD not in proc.log()

    # The password rotated on the cluster but not in the file: the connector stops at start, exit 2.
    rotated = {k: v for k, v in security.items() if k != "password_file"} | {"password": "not-the-password"}
    wrong = _pipeline(tmp_path, secure_kafka.secure_bootstrap("SASL_SSL", "localhost"), rotated, source_db, name)
    result = subprocess.run([sys.executable, "-m", "cdc.cli", "run", str(wrong)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "authentication" in result.stderr.lower() and "not-the-password" not in result.stderr


@pytest.mark.parametrize("label, change, says", [
    ("SASL_SSL SCRAM-SHA-256", {"password_file": None, "password": "not-the-password"}, "authentication"),
    ("SASL_PLAINTEXT PLAIN", {"password": "not-the-password"}, "authentication"),
    ("SSL", {"ca_file": None}, "certificate verify failed"),  # the system's CAs do not know the test CA
])
def test_a_refused_kafka_login_or_certificate_is_exit_2_at_start(tmp_path, secure_kafka, kafka_ca, label, change, says):
    security = {k: v for k, v in {**_security(label, kafka_ca), **change}.items() if v is not None}
    path = _pipeline(tmp_path, secure_kafka.secure_bootstrap(security["protocol"], "localhost"), security)
    result = subprocess.run([sys.executable, "-m", "cdc.cli", "sink", str(path)], capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert says in output.lower()
    assert "Traceback" not in output
    assert PASSWORD not in output and "not-the-password" not in output


@pytest.mark.parametrize("security, says", [
    ({"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "username": "cdc", "password": PASSWORD,
      "ca_file": "{dir}/missing.crt"}, "missing.crt: no such file"),
    ({"protocol": "SASL_SSL", "username": "cdc", "password": PASSWORD}, "SASL_SSL needs sasl_mechanism"),
    ({"protocol": "PLAINTEXT", "username": "cdc", "password": PASSWORD}, "only used with protocol SASL_PLAINTEXT"),
])
def test_validate_checks_security_and_never_prints_the_password(tmp_path, security, says):
    security = {k: v.format(dir=tmp_path) for k, v in security.items()}
    path = _pipeline(tmp_path, "localhost:9093", security)
    result = subprocess.run([sys.executable, "-m", "cdc.cli", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "p.yaml:" in result.stderr and "kafka.security" in result.stderr and says in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_acls_let_only_the_connector_write_and_the_sink_read(tmp_path, secure_kafka, kafka_ca, source_db, monkeypatch):
    """The ACLs of docs/pipeline-reference.md (Kafka ACLs), applied with kafka-acls: the connector's principal
    publishes, the sink's applies, and nobody else (nor the sink) can put a record into the topics."""
    name = f"acl{uuid.uuid4().hex[:6]}"
    prefix, dlq = f"{name}.", f"{name}.replica.dlq"
    readme_acls = [
        ["--allow-principal", "User:shop-connector", "--operation", "Create", "--operation", "Write",
         "--operation", "Read", "--operation", "Describe", "--operation", "DescribeConfigs",
         "--topic", prefix, "--resource-pattern-type", "prefixed"],
        ["--allow-principal", "User:shop-replica", "--operation", "Read", "--operation", "Describe",
         "--operation", "DescribeConfigs", "--topic", prefix, "--resource-pattern-type", "prefixed"],
        ["--allow-principal", "User:shop-replica", "--operation", "Create", "--operation", "Write", "--topic", dlq],
    ]
    for acl in readme_acls:
        secure_kafka.acls("--add", *acl)

    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        conn.execute("ALTER TABLE customers REPLICA IDENTITY FULL")
    security = {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "username": "${KAFKA_USER}",
                "password": "${KAFKA_PASSWORD}", "ca_file": str(kafka_ca / "ca.crt")}
    path = _pipeline(tmp_path, secure_kafka.secure_bootstrap("SASL_SSL", "localhost"), security, source_db, name)
    monkeypatch.setenv("KAFKA_PASSWORD", PASSWORD)
    replica = tmp_path / "replica.db"
    monkeypatch.setenv("KAFKA_USER", "shop-connector")
    connector = CdcProcess(path, "connector").start()
    try:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        monkeypatch.setenv("KAFKA_USER", "shop-replica")
        with CdcProcess(path, "sink") as sink:
            with psycopg.connect(source_db, autocommit=True) as conn:
                conn.execute("INSERT INTO customers SELECT i, 'c' || i FROM generate_series(1, 30) i")
            wait_until(lambda: replica.exists() and len(sqlite_rows(replica, "customers", "id")) == 30,
                       process=sink, what="30 rows in the replica")
            connector.check_alive()
            assert sink.stop() == 0, sink.log()
    finally:
        assert connector.stop() == 0, connector.log()

    async def write_as(user: str) -> str:
        options = load_pipeline(path, env={"KAFKA_USER": user, "KAFKA_PASSWORD": PASSWORD}).kafka.client_options()
        producer = AIOKafkaProducer(**options, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(f"{name}.public.customers", b'{"op": "d"}', key=b'{"id": 1}')
            return "written"
        except Exception as exc:  # the refusal is what the test wants to see
            return type(exc).__name__
        finally:
            await producer.stop()

    assert asyncio.run(write_as("mallory")) == "TopicAuthorizationFailedError"
    assert asyncio.run(write_as("shop-replica")) == "TopicAuthorizationFailedError"
