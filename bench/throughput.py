"""Connector throughput against the physical limit, measured side by side in one run.

The same WAL (a backlog of committed row changes) is drained twice, from two slots created at the
same LSN:

- baseline: `pg_recvlogical` with pgoutput, writing the raw stream to /dev/null: what PostgreSQL
  can send, with no decoding, no JSON and no Kafka;
- cdc: `cdc connector`, decoding every change into an event and publishing it to Kafka with
  acks=all, until its slot confirms the end of the backlog. Once per broker, each from its own slot:
  Apache Kafka (one KRaft node, `cdc.dev.kafka`; idempotent producer, the production default) and
  tansu (the demo's memory-only broker, `idempotence: false`).

Prints rows per second for each, the ratio to pg_recvlogical, and the connector's peak memory. Usage:

    python bench/throughput.py [--rows 200000] [--batch 1000] [--broker kafka|tansu|both]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from contextlib import ExitStack

from cdc.dev.broker import LocalBroker
from cdc.dev.kafka import KafkaCluster
from cdc.dev.postgres import LocalPostgres

# The benchmark table, also read by bench/snapshot.py.
ORDERS = """
CREATE TABLE orders (
    id          bigint PRIMARY KEY,
    customer    text NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    status      text NOT NULL,
    tags        text[],
    details     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE orders REPLICA IDENTITY FULL;
"""
SCHEMA = ORDERS + "CREATE PUBLICATION bench FOR TABLE orders;\n"

PIPELINE = """\
pipeline: bench_{broker}
source:
  postgres: {dsn}
  tables: [public.orders]
  slot: bench_{broker}
  publication: bench
  status_interval_s: 0.5
  snapshot: never   # the backlog is in the WAL: measure streaming only (bench/snapshot.py: snapshots)
kafka:
  bootstrap_servers: {bootstrap}
  idempotence: {idempotence}
  linger_ms: 5
"""


def confirmed(conn: psycopg.Connection, slot: str) -> str | None:
    row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return row[0] if row else None


def run_connector(conn: psycopg.Connection, pipeline: Path, slot: str, end_lsn: str) -> tuple[float, float]:
    """`cdc connector` from process start until its slot confirms `end_lsn`: (seconds, peak RSS MiB)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cdc.cli", "connector", str(pipeline)], stderr=subprocess.DEVNULL)
    while True:
        lsn = confirmed(conn, slot)
        if lsn is not None and conn.execute("SELECT %s::pg_lsn >= %s::pg_lsn", (lsn, end_lsn)).fetchone()[0]:
            break
        if proc.poll() is not None:
            raise SystemExit(f"cdc connector exited with {proc.returncode}")
        time.sleep(0.05)
    took = time.monotonic() - started
    proc.terminate()
    _, _, usage = os.wait4(proc.pid, 0)
    return took, usage.ru_maxrss / 1024  # kilobytes on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1_000, help="rows per source transaction")
    parser.add_argument("--broker", choices=["kafka", "tansu", "both"], default="both")
    args = parser.parse_args()
    brokers = ["kafka", "tansu"] if args.broker == "both" else [args.broker]

    with ExitStack() as stack:
        pg = stack.enter_context(LocalPostgres())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        started = time.monotonic()
        servers = {
            "kafka": lambda: stack.enter_context(KafkaCluster(nodes=1)).bootstrap_servers,
            "tansu": lambda: stack.enter_context(LocalBroker()).bootstrap_servers,
        }
        bootstrap = {name: servers[name]() for name in brokers}
        print(f"brokers {', '.join(brokers)} started in {time.monotonic() - started:.1f}s")
        dsn = pg.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            for slot in ["bench_baseline", *(f"bench_{b}" for b in brokers)]:  # all at the same LSN
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            started = time.monotonic()
            for first in range(0, args.rows, args.batch):
                conn.execute(
                    """INSERT INTO orders (id, customer, amount, status, tags, details)
                       SELECT g, 'customer-' || (g %% 997), (g %% 100000) / 100.0, 'new', ARRAY['a', 'b'],
                              jsonb_build_object('n', g, 'note', 'bench')
                       FROM generate_series(%s::bigint, %s::bigint) g""",
                    (first + 1, min(first + args.batch, args.rows)),
                )
            (end_lsn,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            print(f"backlog: {args.rows} rows in {args.rows // args.batch} transactions, "
                  f"written in {time.monotonic() - started:.1f}s, WAL up to {end_lsn}")

            recvlogical = pg.bindir / "pg_recvlogical"
            started = time.monotonic()
            subprocess.run(
                [str(recvlogical), "-d", dsn, "-S", "bench_baseline", "--start", "--endpos", end_lsn,
                 "-o", "proto_version=1", "-o", "publication_names=bench", "-f", "/dev/null", "--no-loop"],
                check=True,
            )
            baseline_s = time.monotonic() - started

            results = {}
            for broker in brokers:
                pipeline = tmp / f"bench_{broker}.yaml"
                pipeline.write_text(PIPELINE.format(dsn=dsn, bootstrap=bootstrap[broker], broker=broker,
                                                    idempotence="true" if broker == "kafka" else "false"))
                results[broker] = run_connector(conn, pipeline, f"bench_{broker}", end_lsn)

    baseline_rate = args.rows / baseline_s
    print(f"pg_recvlogical (limit):   {baseline_s:7.2f}s  {baseline_rate:10,.0f} rows/s")
    for broker, (took, peak_mib) in results.items():
        label = {"kafka": "cdc -> Apache Kafka:", "tansu": "cdc -> tansu:"}[broker]
        rate = args.rows / took
        print(f"{label:<25}{took:7.2f}s  {rate:10,.0f} rows/s  ratio {rate / baseline_rate:.3f}  "
              f"peak RSS {peak_mib:.0f} MiB  (process start to confirmed LSN)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
