"""Snapshot throughput against the limit, measured side by side in one run.

One table of existing rows is read twice:

- baseline: `COPY orders TO STDOUT` through psycopg into nothing: what PostgreSQL can hand out,
  with no chunking, no JSON and no Kafka;
- cdc: `cdc connector` with `snapshot: initial`, reading the table in chunks between WAL watermarks
  and publishing every row as an `r` event to Kafka with acks=all, until its progress record says
  the table is done.

Prints rows per second for both, the ratio, and the connector's peak memory. Usage:

    python bench/snapshot.py [--rows 200000] [--chunk 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from cdc.config import load_pipeline
from cdc.dev.broker import LocalBroker
from cdc.dev.postgres import LocalPostgres
from cdc.snapshot import load_progress
from throughput import ORDERS  # bench/ is on the path when a script of it runs

# The same table as bench/throughput.py, filled before the connector starts.
SCHEMA = ORDERS + """
INSERT INTO orders (id, customer, amount, status, tags, details)
SELECT g, 'customer-' || (g % 997), (g % 100000) / 100.0, 'new', ARRAY['a', 'b'], jsonb_build_object('n', g, 'note', 'bench')
FROM generate_series(1, {rows}) g;
ANALYZE orders;
"""

PIPELINE = """\
pipeline: bench
source:
  postgres: {dsn}
  tables: [public.orders]
  status_interval_s: 0.5
  snapshot_chunk_size: {chunk}
kafka:
  bootstrap_servers: {bootstrap}
  idempotence: false
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=5_000)
    args = parser.parse_args()

    with LocalPostgres() as pg, LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA.format(rows=args.rows))
            started = time.monotonic()
            copied = 0
            with conn.cursor().copy("COPY orders TO STDOUT") as copy:
                for _ in copy.rows():
                    copied += 1
            baseline_s = time.monotonic() - started
        assert copied == args.rows

        pipeline = Path(tmp) / "bench.yaml"
        pipeline.write_text(PIPELINE.format(dsn=dsn, bootstrap=broker.bootstrap_servers, chunk=args.chunk))
        config = load_pipeline(pipeline)
        started = time.monotonic()
        log = Path(tmp) / "cdc.log"
        proc = subprocess.Popen([sys.executable, "-m", "cdc.cli", "connector", str(pipeline)], stderr=log.open("wb"))
        while True:
            time.sleep(0.2)
            if proc.poll() is not None:
                raise SystemExit(f"cdc connector exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                progress = asyncio.run(load_progress(config))
            except Exception:  # the topic does not exist yet
                continue
            record = progress.get(("initial", "public.orders"))
            if record and record["done"]:
                break
        cdc_s = time.monotonic() - started
        proc.terminate()
        _, _, usage = os.wait4(proc.pid, 0)
        peak_mib = usage.ru_maxrss / 1024  # kilobytes on Linux

    baseline_rate, cdc_rate = args.rows / baseline_s, args.rows / cdc_s
    print(f"COPY TO (limit):        {baseline_s:7.2f}s  {baseline_rate:10,.0f} rows/s")
    print(f"cdc snapshot:           {cdc_s:7.2f}s  {cdc_rate:10,.0f} rows/s  (process start to the table done, "
          f"chunks of {args.chunk})")
    print(f"ratio cdc / limit:      {cdc_rate / baseline_rate:.3f}")
    print(f"cdc connector peak RSS: {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
