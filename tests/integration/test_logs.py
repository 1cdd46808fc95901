"""Logs as a log collector reads them: `--log-format json` writes one JSON object per line, each with
the pipeline and the component that wrote it, and never a row's value."""

from __future__ import annotations

import json
import uuid

import psycopg

from tests.integration.harness import CdcProcess, sqlite_rows, wait_for_slot, wait_until, write_pipeline

CANARY = "okapi-7731"  # in every row; no log line may carry it


def test_json_logs_name_pipeline_and_component_and_never_a_row_value(tmp_path, source_db, broker, monkeypatch):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, secret text NOT NULL)")
        conn.execute("ALTER TABLE customers REPLICA IDENTITY FULL")
        conn.execute(f"INSERT INTO customers SELECT i, '{CANARY}-' || i FROM generate_series(1, 300) i")
    name = f"logs_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.customers"],
                          bootstrap=broker.bootstrap_servers, snapshot="initial",
                          sinks={"replica": {"url": "sqlite:///replica.db"}})
    monkeypatch.setenv("CDC_LOG_FORMAT", "json")
    replica = tmp_path / "replica.db"
    with CdcProcess(path) as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"INSERT INTO customers VALUES (301, '{CANARY}-301')")
            conn.execute("UPDATE customers SET secret = secret || '!' WHERE id <= 10")
        wait_until(lambda: replica.exists() and len(sqlite_rows(replica, "customers", "id")) == 301,
                   process=proc, what="301 rows in the replica")
        assert proc.stop() == 0, proc.log()

    lines = [line for line in proc.log().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert CANARY not in proc.log()
    for record in records:
        assert {"ts", "level", "logger", "message", "pipeline"} <= record.keys(), record
        assert record["pipeline"] == name
    by_component = {r.get("component") for r in records}
    assert {"connector", "sink"} <= by_component, by_component
    streaming = next(r for r in records if r["message"].startswith("streaming slot"))
    assert streaming["component"] == "connector" and streaming["slot"] == f"cdc_{name}"
    assert any(r.get("sink") == "replica" for r in records)
    # A stop says where a restart continues: the slot's confirmed LSN, each partition's applied offset.
    stopped = next(r for r in records if r["message"].startswith(f"stopped streaming slot cdc_{name}"))
    assert stopped["lsn"] in stopped["message"] and stopped["lsn"] != "0/0"
    assert any(r["message"].startswith(f"sink {name}.replica stopped: applied {name}.public.customers[0]@")
               for r in records)
