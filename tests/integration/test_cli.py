"""The `cdc` command as a user runs it: bad pipeline files are reported as FILE:LINE with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.integration.harness import CdcProcess, wait_for_slot, wait_until, write_pipeline

GOOD = """\
pipeline: shop
source:
  postgres: postgresql://cdc@127.0.0.1:5432/shop
  tables: [public.customers, 'public."Order Items"']
kafka:
  bootstrap_servers: ${KAFKA_BOOTSTRAP}
sinks:
  replica:
    url: sqlite:///replica.db
    tables: {'public."Order Items"': order_items}
"""


def cdc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cdc.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_validate_accepts_a_good_pipeline(tmp_path):
    result = cdc("validate", str(write(tmp_path, GOOD)), env={"KAFKA_BOOTSTRAP": "127.0.0.1:9092"})
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


@pytest.mark.parametrize(
    "label, text, line, words",
    [
        ("syntax error", GOOD.replace("  tables: [public.customers,", "  tables: [public.customers,,\n  :"), 4, "yaml"),
        ("unknown key", GOOD.replace("  bootstrap_servers:", "  bootstrap_server: x\n  bootstrap_servers:"), 6, "bootstrap_server"),
        ("wrong type", GOOD.replace("kafka:\n", "kafka:\n  partitions: many\n"), 6, "partitions"),
        ("missing env var", GOOD, 6, "KAFKA_BOOTSTRAP"),
        ("unknown table", GOOD.replace("{'public.\"Order Items\"': order_items}", "{public.orders: orders}"), 10, "public.orders"),
    ],
)
def test_validate_reports_bad_yaml_with_file_and_line(tmp_path, label, text, line, words):
    env = {} if label == "missing env var" else {"KAFKA_BOOTSTRAP": "127.0.0.1:9092"}
    os.environ.pop("KAFKA_BOOTSTRAP", None)
    path = write(tmp_path, text)
    result = cdc("validate", str(path), env=env)
    assert result.returncode == 2, (label, result.stdout, result.stderr)
    assert f"{path}:{line}:" in result.stderr, (label, result.stderr)
    assert words.lower() in result.stderr.lower(), (label, result.stderr)


def test_every_problem_is_reported_at_once(tmp_path):
    text = GOOD.replace("kafka:\n", "kafka:\n  partitions: many\n").replace("  slot", "  slot")
    text = text.replace("pipeline: shop\n", "pipeline: shop\nsurprise: 1\n")
    path = write(tmp_path, text)
    result = cdc("validate", str(path), env={"KAFKA_BOOTSTRAP": "x:1"})
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(f"{path}:")]
    assert [ln.split(":")[1] for ln in lines] == ["2", "7"], result.stderr


def test_every_command_has_help():
    for command in ([], ["validate"], ["run"], ["connector"], ["sink"]):
        result = cdc(*command, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout, (command, result.stderr)


def connector_only_pipeline(tmp_path: Path, source_db: str, broker, name: str, ddl: str, tables: list[str],
                            **options) -> Path:
    """Create the source tables, then a pipeline without sinks named `name` (slot cdc_<name>)."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(ddl)
    return write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=tables,
                          bootstrap=broker.bootstrap_servers, sinks={}, **options)


@pytest.mark.integration
def test_run_refuses_a_table_missing_from_the_database(tmp_path, source_db, broker):
    path = connector_only_pipeline(tmp_path, source_db, broker, "missing", "CREATE TABLE customers (id int PRIMARY KEY, n int)",
                                   ["public.customers", "public.nope"])
    result = cdc("run", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}:6:" in result.stderr and "public.nope does not exist" in result.stderr, result.stderr
    # Nothing was created on the source for a pipeline that cannot run.
    with psycopg.connect(source_db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cdc_missing'").fetchone() == (0,)


@pytest.mark.integration
def test_run_explains_missing_replica_identity_for_toastable_columns(tmp_path, source_db, broker):
    path = connector_only_pipeline(tmp_path, source_db, broker, "ident", "CREATE TABLE notes (id int PRIMARY KEY, body text)",
                                   ["public.notes"])
    result = cdc("connector", str(path))
    assert result.returncode == 2
    assert "ALTER TABLE public.notes REPLICA IDENTITY FULL" in result.stderr, result.stderr


@pytest.mark.integration
def test_slot_does_not_pin_wal_when_nothing_is_published(tmp_path, source_db, broker):
    """Writes to tables outside the pipeline produce no events; the slot must still move on."""
    path = connector_only_pipeline(
        tmp_path, source_db, broker, "idle",
        "CREATE TABLE watched (id int PRIMARY KEY, n int); CREATE TABLE other (id int PRIMARY KEY, n int)",
        ["public.watched"], status_interval_s=0.5,
    )
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, "cdc_idle", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            for i in range(50):
                conn.execute("INSERT INTO other VALUES (%s, %s)", (i, i))
            (written,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            wait_until(
                lambda: conn.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cdc_idle'",
                    (written,),
                ).fetchone() == (True,),
                process=proc, timeout=30, what=f"the slot to confirm past {written}",
            )
        assert proc.stop() == 0, proc.log()


@pytest.mark.integration
def test_connector_explains_a_broker_without_idempotent_producers(tmp_path, source_db, tansu_broker):
    path = connector_only_pipeline(tmp_path, source_db, tansu_broker, "idem",
                                   "CREATE TABLE watched (id int PRIMARY KEY, n int)", ["public.watched"])
    result = cdc("connector", str(path))
    assert result.returncode == 1, result.stderr
    assert "idempotence: false" in result.stderr, result.stderr


@pytest.mark.integration
def test_an_event_too_large_for_kafka_stops_the_connector_before_anything_after_it(tmp_path, source_db, broker):
    name = f"big_{uuid.uuid4().hex[:8]}"  # the broker lives for the whole session: a topic of our own
    path = connector_only_pipeline(
        tmp_path, source_db, broker, name,
        "CREATE TABLE docs (id int PRIMARY KEY, body text); ALTER TABLE docs REPLICA IDENTITY FULL", ["public.docs"],
        kafka={"topic_config": {"max.message.bytes": 4_000_000}},  # the broker takes events this large
    )
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            (before,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            conn.execute("INSERT INTO docs VALUES (1, repeat('x', 2000000))")
            conn.execute("INSERT INTO docs VALUES (2, 'small')")
        proc.proc.wait(30)
        assert proc.proc.returncode == 1, proc.log()
        assert f"topic {name}.public.docs" in proc.log() and "max_batch_bytes" in proc.log()
        assert "xxxxxxxx" not in proc.log()  # the value itself is never printed
    # Nothing was confirmed past the refused event: with a larger limit, a restart delivers it.
    path.write_text(path.read_text().replace("kafka:\n", "kafka:\n  max_batch_bytes: 4000000\n"))
    with CdcProcess(path, "connector") as proc:
        events = wait_until(lambda: read_topic(broker.bootstrap_servers, f"{name}.public.docs", 2), process=proc,
                            what="both events in Kafka")
    assert [e["after"]["id"] for e in events] == [1, 2]
    assert len(events[0]["after"]["body"]) == 2_000_000


def read_topic(bootstrap: str, topic: str, at_least: int) -> list[dict] | None:
    """Every event of a one-partition topic, from the start; None until there are `at_least`."""
    import asyncio
    import json

    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> list[dict]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                    max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=16 * 1024 * 1024)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            batch = await consumer.getmany(tp, timeout_ms=1000)
            return [json.loads(m.value) for m in batch.get(tp, [])]
        finally:
            await consumer.stop()

    events = asyncio.run(read())
    return events if len(events) >= at_least else None


def test_validate_refuses_a_billion_laughs_file_quickly(tmp_path):
    """9 levels of 9 aliases (387 million values once expanded): refused at its line, not expanded."""
    from tests.unit.test_config import laughs

    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(9) + GOOD)
    result = cdc("validate", str(path), env={"KAFKA_BOOTSTRAP": "127.0.0.1:9092"})  # 120 s timeout
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{path}:") and "aliases expand to more than" in result.stderr, result.stderr
