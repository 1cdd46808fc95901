"""The connector's per-change work in one process, without Kafka: CPU time per row, this checkout
against another one, on the same recorded frames.

On a busy machine, end-to-end rows per second move by half from one run to the next; CPU time of
the pure work does not. The walsender's frames for a backlog (the orders table of bench/run.py, in
1,000-row transactions) are recorded once; then each checkout, in its own process and alternately,
runs what the connector runs for every frame: parse the frame, decode the pgoutput message, convert
the row's values (the catalog's converters), build the event, encode its value and key (or, where
the compiled core's InsertEncoder takes an INSERT, the message to key and value in one step). This checkout
runs twice: with its compiled core (cdc.native) where it is built, and on its pure-Python path. Usage:

    python bench/hotpath.py [--rows 100000] [--before PATH] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def record_frames(dsn: str, rows: int, batch: int, path: Path) -> None:
    import psycopg

    from cdc.source.postgres.replication import ReplicationConnection
    from run import FILL, ORDERS  # bench/ is on the path when a script of it runs

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
        conn.execute("SELECT pg_create_logical_replication_slot('hotpath', 'pgoutput')")
        for first in range(1, rows + 1, batch):
            conn.execute(FILL, (first, min(first + batch - 1, rows)))
        (end,) = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()

    async def read() -> list[bytes]:
        repl = ReplicationConnection(dsn)
        repl.open()
        await repl.start("hotpath", "bench")
        frames: list[bytes] = []
        while True:
            frame = await repl.read_frame(timeout=5)
            if frame is None:
                break
            if hasattr(frame, "payload"):
                frames.append(_raw(frame))
                if frame.start_lsn >= end:
                    break
            elif frame.wal_end >= end and frames:
                break
        repl.close()
        return frames

    frames = asyncio.run(read())
    path.write_bytes(pickle.dumps(frames))


def _raw(frame) -> bytes:
    """The CopyData bytes of an XLogData frame again (the send time does not matter here)."""
    import struct

    return b"w" + struct.pack("!QQq", frame.start_lsn, frame.end_lsn, 0) + bytes(frame.payload)


def replay(dsn: str, frames_path: Path, repeat: int) -> dict:
    """In the checkout on PYTHONPATH: the connector's work per frame, timed in CPU seconds."""
    import psycopg

    from cdc.connector import TableStream
    from cdc.events import build
    from cdc.events.envelope import ChangeEvent, TransactionInfo
    from cdc.lsn import Position, format_lsn
    from cdc.source.postgres import pgoutput
    from cdc.source.postgres.frames import parse_copy_frame
    from cdc.source.postgres.catalog import Catalog
    from cdc.source.postgres.replication import SESSION_OPTIONS
    from cdc.source.postgres.values import ValueDecoder

    frames = pickle.loads(frames_path.read_bytes())
    conn = psycopg.connect(dsn, autocommit=True, options=SESSION_OPTIONS)
    catalog, values = Catalog(conn), ValueDecoder(conn)

    try:  # a checkout whose compiled core takes an INSERT to its key and value in one step
        from cdc.events.codec import EventSources
    except ImportError:
        EventSources = None

    def run_once() -> int:
        streams, txn, rows, sources = {}, None, 0, None
        for raw in frames:
            frame = parse_copy_frame(raw)
            lsn = frame.start_lsn
            payload = bytes(frame.payload)
            if payload[:1] == b"I":  # as cdc.connector.stream does
                encoder = getattr(streams.get(int.from_bytes(payload[1:5], "big")), "insert_encoder", None)
                if encoder is not None:
                    if sources is None or sources.txn is not txn:
                        sources = EventSources("bench", "postgres", "public", "orders", txn, False)
                    if encoder.encode(payload, sources.head, format_lsn(lsn), 0, sources.tail,
                                      time.time_ns() // 1_000_000) is not None:
                        rows += 1
                        continue
            msg = pgoutput.decode(payload, lsn=lsn)
            if isinstance(msg, pgoutput.Insert):
                stream = streams[msg.relation_id]
                for seq, built in enumerate(build.insert_events(stream.row(msg.new, lsn), stream.key_names)):
                    event = ChangeEvent(built.op, built.before, built.after, built.key,
                                        Position(txn.commit_lsn, lsn, seq), format_lsn(lsn), txn)
                    event.encode_value("bench", "postgres", "public", "orders")
                    event.encode_key()
                    rows += 1
            elif isinstance(msg, pgoutput.Begin):
                commit_ts = msg.commit_time.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
                txn = TransactionInfo(msg.final_lsn, format_lsn(msg.final_lsn), msg.xid, commit_ts)
            elif isinstance(msg, pgoutput.Relation):
                types = [catalog.describe_type(c.type_oid, c.type_modifier) for c in msg.columns]
                # A checkout with the compiled core (cdc.native) plans each column's conversion.
                plan = ({"conversions": tuple(values.native_conversion(t) for t in types)}
                        if hasattr(values, "native_conversion") else {})
                streams[msg.relation_id] = TableStream(
                    ref=None, topic="bench", schema=None, names=tuple(c.name for c in msg.columns),
                    converters=tuple(values.converter(t) for t in types), key_names=("id",), headers=[], **plan)
        return rows

    timings = []
    for _ in range(repeat):
        started = time.process_time()
        rows = run_once()
        timings.append(time.process_time() - started)
    return {"rows": rows, "cpu_s": min(timings)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--before", help="another checkout of cdc to run on the same frames")
    parser.add_argument("--repeat", type=int, default=3, help="processes per checkout, alternating")
    parser.add_argument("--replay", type=Path, help=argparse.SUPPRESS)  # the child: frames file
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        print(json.dumps(replay(args.dsn, args.replay, 3)))
        return 0

    from cdc.dev.postgres import LocalPostgres
    # This checkout twice: with its compiled core where it is built (cdc.native), and on its pure-Python path.
    checkouts = {"this": (REPO, {}), "python": (REPO, {"CDC_NATIVE": "0"})}
    if args.before:
        checkouts["before"] = (Path(args.before), {})
    with LocalPostgres() as pg:
        best = compare(pg.dsn(), args.rows, args.batch, checkouts, args.repeat)
    for name, us in best.items():
        print(f"{name:<8} {us:6.2f} CPU us per row (best of {args.repeat})")
    for other in ("python", "before"):
        if other in best:
            print(f"this / {other}: {best[other] / best['this']:.3f} x the rows per CPU second")
    return 0


def compare(dsn: str, rows: int, batch: int, checkouts: dict[str, Path | tuple[Path, dict[str, str]]],
            repeat: int) -> dict[str, float]:
    """Record the frames of a backlog in the database of `dsn`, then replay them in each checkout (its
    path, or its path and environment variables to set), `repeat` processes each in the order ABBA...:
    the best CPU microseconds per row of each."""
    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp) / "frames.pickle"
        record_frames(dsn, rows, batch, frames)
        results: dict[str, list[float]] = {name: [] for name in checkouts}
        for i in range(repeat):
            for name in list(checkouts) if i % 2 == 0 else list(checkouts)[::-1]:
                path, env = checkouts[name] if isinstance(checkouts[name], tuple) else (checkouts[name], {})
                out = subprocess.run([sys.executable, __file__, "--replay", str(frames), "--dsn", dsn],
                                     env=dict(os.environ, PYTHONPATH=str(Path(path).resolve()), **env),
                                     check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                results[name].append(result["cpu_s"] / result["rows"] * 1e6)
                print(f"  hot path, {name}: {results[name][-1]:.2f} CPU us per row", flush=True)
    return {name: min(times) for name, times in results.items()}

if __name__ == "__main__":
    sys.exit(main())
