"""Running the real `cdc` command against real services, and comparing databases row for row."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import yaml


def write_pipeline(path: Path, *, pipeline: str, source_dsn: str, tables: list[str], bootstrap: str,
                   sinks: dict[str, dict], status_interval_s: float = 1.0, idempotence: bool = True,
                   kafka: dict[str, Any] | None = None, snapshot: str = "never") -> Path:
    """A pipeline YAML with production Kafka settings (idempotent producer, acks=all). Pass
    `idempotence=False` only for tansu (`tansu_broker`), which has no idempotent producers.

    `snapshot` defaults to `never` here (the product's default is `initial`): a test of streaming
    checks exactly the events its workload makes, and an initial snapshot running at the same time
    could add `r` events for rows made after the slot. Snapshot tests ask for `initial`."""
    doc = {
        "pipeline": pipeline,
        "source": {"postgres": source_dsn, "tables": tables, "status_interval_s": status_interval_s,
                   "snapshot": snapshot},
        "kafka": {"bootstrap_servers": bootstrap, **({} if idempotence else {"idempotence": False}), **(kafka or {})},
        "sinks": sinks,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class CdcProcess:
    """`cdc <command> FILE` as a child process, its output in a log file next to the YAML."""

    def __init__(self, pipeline_file: Path, command: str = "run"):
        self.pipeline_file = pipeline_file
        self.command = command
        self.log_path = pipeline_file.with_suffix(f".{command}.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "CdcProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdc.cli", self.command, str(self.pipeline_file)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=os.environ.copy(),
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"cdc {self.command} exited with {self.proc.returncode}:\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM, as a user's Ctrl-C or an orchestrator would; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"cdc {self.command} did not stop on SIGTERM:\n{self.log()}")

    def __enter__(self) -> "CdcProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(check: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.25,
               process: CdcProcess | None = None, what: str = "condition") -> Any:
    """Poll `check` until it returns a truthy value other than a string; on time-out fail with its
    last answer (a check may return a string saying what is still different)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    checked_at = time.monotonic()
    while time.monotonic() < deadline:
        if process is not None:
            process.check_alive()
        checked_at = time.monotonic()
        last = check()
        if last and not isinstance(last, str):
            return last
        time.sleep(interval)
    # A slow check's answer describes the moment it began, not the time-out: say how old it is.
    age = time.monotonic() - checked_at
    log = f"\n--- cdc log ---\n{process.log()[-5000:]}" if process is not None else ""
    raise AssertionError(f"timed out waiting for {what}; last result (a check begun {age:.0f} s ago): {last!r}{log}")


def wait_for_slot(source_dsn: str, slot: str, process: CdcProcess) -> None:
    """Changes are captured from the moment the connector's slot exists: wait for it to stream."""

    def active() -> bool:
        # Streaming, not only held: the walsender that creates the slot holds it too, and lets it go
        # before the connector starts streaming from it.
        with psycopg.connect(source_dsn) as conn:
            return bool(conn.execute(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid"
                " WHERE s.slot_name = %s AND r.state IN ('catchup', 'streaming')", (slot,)).fetchone())

    wait_until(active, process=process, what=f"slot {slot} to be streaming")


def topic_events(bootstrap: str, topic: str) -> list[dict]:
    """Every event of a one-partition topic, from its first retained offset to its end."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> list[dict]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            events: list[dict] = []
            next_offset = 0
            while next_offset < end:
                batch = (await consumer.getmany(tp, timeout_ms=1000, max_records=5000)).get(tp, [])
                events.extend(json.loads(m.value) for m in batch)
                next_offset = batch[-1].offset + 1 if batch else next_offset
            return events
        finally:
            await consumer.stop()

    return asyncio.run(read())


def published_schemas(bootstrap: str, pipeline: str) -> dict[bytes, dict]:
    """The schemas on the pipeline's schemas topic: schema id (the record key) -> schema JSON, parsed."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> dict[bytes, dict]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(f"{pipeline}.schemas", 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            out: dict[bytes, dict] = {}
            while await consumer.position(tp) < end:
                for m in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    out[m.key] = json.loads(m.value)
            return out
        finally:
            await consumer.stop()

    return asyncio.run(read())


def schema_of(headers: list[tuple[str, bytes]], schemas: dict[bytes, dict]) -> dict:
    """The published schema an event names by its cdc.schema_id header (schemas: published_schemas)."""
    return schemas[dict(headers)["cdc.schema_id"]]


def pg_rows(dsn: str, table: str, order_by: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY {order_by}").fetchall()


def pg_columns(dsn: str, table: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(f"SELECT * FROM {table} LIMIT 0")
        return [d.name for d in cur.description]


def sqlite_rows(path: Path, table: str, order_by: str) -> list[tuple]:
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY {order_by}").fetchall()
    except sqlite3.OperationalError:  # table not created yet
        return []
    finally:
        conn.close()


def json_text(value: Any) -> Any:
    """Parse JSON text as a sink stores json columns and arrays (exact decimals)."""
    from decimal import Decimal

    return json.loads(value, parse_float=Decimal) if isinstance(value, str) else value


def wait_for_initial_snapshot(process: CdcProcess, timeout: float = 120.0) -> None:
    """Wait until `cdc status` reports the initial snapshot of every table done."""

    def done() -> bool | str:
        result = subprocess.run([sys.executable, "-m", "cdc.cli", "status", str(process.pipeline_file), "--json"],
                                capture_output=True, text=True, timeout=60)
        snapshots = json.loads(result.stdout or "{}").get("kafka", {}).get("snapshots", {})
        states = {table: s["state"] for table, s in snapshots.items()}
        return bool(states) and all(s == "done" for s in states.values()) or f"initial snapshot: {states}"

    wait_until(done, process=process, timeout=timeout, what="the initial snapshot of every table")


def wait_for_snapshot_progress(process: CdcProcess, timeout: float = 120.0) -> None:
    """Wait, polling closely, for the log's first snapshot progress record: the snapshot is running
    and has published its first chunks. A wait for some count of published rows lets a fast
    snapshot finish first."""
    wait_until(lambda: "rows/s" in process.log(), process=process, timeout=timeout, interval=0.01,
               what="the snapshot's first progress record")


def wait_for_confirmed(source_dsn: str, slot: str, process: CdcProcess) -> None:
    """Wait until the slot has confirmed everything committed so far: a kill after this re-sends none of it.

    The insert position, not pg_current_wal_lsn(): on a source with synchronous_commit=off (the test
    clusters) the write position lags the last commits, and a slot confirmed up to it may still lack them."""
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        (now,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        wait_until(lambda: conn.execute("SELECT confirmed_flush_lsn >= %s FROM pg_replication_slots WHERE slot_name = %s",
                                        (now, slot)).fetchone()[0], process=process, what=f"slot {slot} to confirm {now}")


def _wait_until_commits_wait(source_dsn: str, admin: psycopg.Connection) -> None:
    """Wait until a commit waits for the synchronous standby. pg_reload_conf() only signals the
    postmaster: a session that has the new setting still commits at once until the checkpointer has
    re-read it too (it is what tells every backend that a synchronous standby is named). Probed with
    transactions that change no row (a temporary table: logical decoding shows nothing of them),
    each let go once seen waiting: a cancelled wait leaves the commit done."""
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(source_dsn, autocommit=True) as probe:
            probe.execute("SET synchronous_commit = on")
            pid = probe.info.backend_pid
            committing = threading.Thread(target=lambda: probe.execute("CREATE TEMPORARY TABLE commit_probe ()"))
            committing.start()
            while committing.is_alive():
                (waits,) = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event = 'SyncRep'",
                                         (pid,)).fetchone()
                if waits:
                    admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
                    committing.join()
                    return
                time.sleep(0.01)
        assert time.monotonic() < deadline, "commits did not wait for synchronous_standby_names within 30 s"


@contextmanager
def held_commit(source_dsn: str, *statements: str) -> Iterator[Callable[[], None]]:
    """One transaction of `statements` whose commit is in the WAL, so it is streamed at once, but
    shown to no other session's snapshot until released: its COMMIT waits for a synchronous standby
    that never answers (every other session commits locally meanwhile). Yields `release()`; leaving
    the block releases it too, and restores the server's settings."""
    admin = psycopg.connect(source_dsn, autocommit=True)

    def release() -> None:
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.execute("SELECT pg_reload_conf()")

    def commit() -> None:
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement)

    writer = threading.Thread(target=commit)
    try:
        admin.execute("ALTER SYSTEM SET synchronous_commit = 'local'")
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody_answers'")
        admin.execute("SELECT pg_reload_conf()")
        _wait_until_commits_wait(source_dsn, admin)
        writer.start()
        yield release
    finally:
        release()
        admin.execute("ALTER SYSTEM RESET synchronous_commit")
        admin.execute("SELECT pg_reload_conf()")
        if writer.ident is not None:  # started
            writer.join(timeout=60)
        admin.close()
