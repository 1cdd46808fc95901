"""`cdc status` as an operator and a health check read it: right numbers, no `None`, and an exit
code that says whether the pipeline is running (docs/operations.md: Status)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from cdc.dev.postgres import free_port
from tests.integration.harness import CdcProcess, sqlite_rows, topic_events, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import cdc

pytestmark = pytest.mark.integration


def make_pipeline(tmp_path, source_db: str, bootstrap: str) -> tuple[str, object]:
    name = f"st_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
        conn.execute("CREATE TABLE other (id int PRIMARY KEY, body text)")
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
                          bootstrap=bootstrap, sinks={"replica": {"url": "sqlite:///replica.db"}}, status_interval_s=0.5)
    return name, path


def status(path) -> tuple[int, dict]:
    result = cdc("status", str(path), "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_a_caught_up_sink_is_not_behind_by_the_wal_of_other_tables(tmp_path, source_db, broker):
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    with CdcProcess(path, "run") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT i, i FROM generate_series(1, 10) i")
            wait_until(lambda: len(sqlite_rows(tmp_path / "replica.db", "items", "id")) == 10, process=proc,
                       what="10 rows in the sink")
            # About 4 MB of WAL that the pipeline does not capture.
            conn.execute("INSERT INTO other SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, 4000) i")
            (written,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            wait_until(lambda: conn.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                (written, f"cdc_{name}")).fetchone() == (True,), process=proc, what="the slot to confirm the idle WAL")
        code, doc = status(path)
        (partition,) = doc["sinks"]["replica"]["partitions"]
        assert partition["lag_events"] == 0, doc
        assert partition["lag_wal_bytes"] < 1_000_000, doc  # not the 4 MB written to `other`
        assert doc["sinks"]["replica"]["running"] is True and doc["source"]["slot"]["active"], doc
        assert code == 0 and doc["problems"] == [], doc
        text = cdc("status", str(path)).stdout
        assert "caught up" in text, text


def test_with_the_broker_down_status_says_so_instead_of_none(tmp_path, source_db):
    name, path = make_pipeline(tmp_path, source_db, f"127.0.0.1:{free_port()}")
    result = cdc("status", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "kafka: UNREACHABLE" in result.stdout, result.stdout
    assert "None" not in result.stdout and "?" not in result.stdout, result.stdout
    assert "lag unknown (Kafka did not answer)" in result.stdout, result.stdout
    assert not (tmp_path / "replica.db").exists()  # status creates nothing


def test_no_connector_and_a_sink_behind_is_not_healthy(tmp_path, source_db, broker):
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT i, i FROM generate_series(1, 50) i")
        wait_until(lambda: len(topic_events(broker.bootstrap_servers, f"{name}.public.items")) == 50, process=proc,
                   what="50 events in Kafka")
    code, doc = status(path)
    assert code == 3, doc
    assert doc["sinks"]["replica"]["partitions"][0]["lag_events"] == 50, doc
    assert any("no connector is running" in p for p in doc["problems"]), doc
    assert any("sink replica is not running and has 50 events to apply" in p for p in doc["problems"]), doc
    text = cdc("status", str(path))
    assert text.returncode == 3 and "NOT HEALTHY: no connector is running" in text.stdout, text.stdout
