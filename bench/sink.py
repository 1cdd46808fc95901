"""Sink throughput: whole source transactions (`apply: transactional`) next to `per_partition`.

One backlog in Kafka (orders with 3 lines each, one source transaction per order, published by the
connector) is applied twice into fresh SQLite files, once per mode, measured in the same run:
rows per second from sink start until the last row is in the target.

    python bench/sink.py [--orders 20000]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from cdc.dev.broker import LocalBroker
from cdc.dev.postgres import LocalPostgres

SCHEMA = """
CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, total numeric(12, 2));
CREATE TABLE lines (order_id bigint, line int, sku text, qty int, PRIMARY KEY (order_id, line));
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE lines REPLICA IDENTITY FULL;
"""

PIPELINE = """\
pipeline: bench
source:
  postgres: {dsn}
  tables: [public.orders, public.lines]
  status_interval_s: 0.5
  snapshot: never
kafka:
  bootstrap_servers: {bootstrap}
  idempotence: false
sinks:
  transactional: {{url: "sqlite:///{tmp}/transactional.db", apply: transactional}}
  per_partition: {{url: "sqlite:///{tmp}/per_partition.db", apply: per_partition}}
"""


def count(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(path)
    try:
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("orders", "lines"))
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=20_000)
    args = parser.parse_args()
    rows = args.orders * 4
    with LocalPostgres() as pg, LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        pipeline = Path(tmp) / "bench.yaml"
        pipeline.write_text(PIPELINE.format(dsn=dsn, bootstrap=broker.bootstrap_servers, tmp=tmp))
        connector = subprocess.Popen([sys.executable, "-m", "cdc.cli", "connector", str(pipeline)],
                                     stderr=subprocess.DEVNULL)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not conn.execute("SELECT 1 FROM pg_replication_slots WHERE active").fetchone():
                time.sleep(0.1)
            for first in range(1, args.orders + 1, 100):  # one source transaction per order
                with conn.pipeline():
                    for i in range(first, min(first + 100, args.orders + 1)):
                        with conn.transaction():
                            conn.execute("INSERT INTO orders VALUES (%s, 'c', 10)", (i,))
                            conn.execute("INSERT INTO lines SELECT %s, l, 'sku', 1 FROM generate_series(1, 3) l", (i,))
            (end,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            while conn.execute("SELECT confirmed_flush_lsn < %s FROM pg_replication_slots", (end,)).fetchone()[0]:
                time.sleep(0.2)  # the whole backlog is in Kafka
        connector.terminate()
        connector.wait()
        print(f"backlog: {args.orders} source transactions, {rows} rows in Kafka")
        rates = {}
        for mode in ("per_partition", "transactional"):
            started = time.monotonic()
            sink = subprocess.Popen([sys.executable, "-m", "cdc.cli", "sink", str(pipeline), "--name", mode],
                                    stderr=subprocess.DEVNULL)
            while count(Path(tmp) / f"{mode}.db") < rows:
                if sink.poll() is not None:
                    raise SystemExit(f"cdc sink {mode} exited with {sink.returncode}")
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            sink.terminate()
            sink.wait()
            rates[mode] = rows / elapsed
            print(f"sink apply: {mode:13s} {elapsed:7.2f}s  {rates[mode]:10,.0f} rows/s")
    print(f"ratio transactional / per_partition: {rates['transactional'] / rates['per_partition']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
