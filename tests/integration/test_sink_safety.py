"""The sink never loses silently: real `cdc sink` processes, the real broker, real targets.

Events are published here by the test itself (with the `cdc.origin` header the connector will
send), so each test controls exactly what the sink sees: another source history, a partial row, a
broker that restarts empty, a second process of the same sink.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from cdc.config import load_pipeline
from cdc.dev.broker import LocalBroker
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.events.schema import Column, TableSchema
from cdc.publish.admin import ensure_topics
from cdc.lsn import format_lsn
from cdc.redact import redact
from tests.integration.harness import CdcProcess, wait_until, write_pipeline

ITEMS = TableSchema(
    "public", "items",
    (Column("id", "integer", "integer", nullable=False), Column("name", "text", "text"),
     Column("notes", "text", "text")),
    ("id",),
)
ORIGIN_A = SourceOrigin("7301234567890123456", 1, 0)


def change(i: int, commit: int, *, op: str = "c", name: str = "n", notes: str | None = "long text",
           unchanged: list[str] | None = None) -> tuple[bytes, bytes]:
    after = {"id": i, "name": name, "notes": notes}
    event: dict = {"op": op, "before": None if op != "d" else {"id": i}, "after": after if op != "d" else None,
                   "source": {"pipeline": "p", "db": "src", "schema": "public", "table": "items",
                              "commit_lsn": format_lsn(commit), "lsn": format_lsn(commit - 0x40), "seq": 0,
                              "txid": 700, "commit_ts": "2026-11-26T20:19:10Z", "snapshot": False},
                   "ts_ms": 1}
    if unchanged:
        event["unchanged"] = unchanged
        for column in unchanged:
            after.pop(column)
    return json.dumps({"id": i}).encode(), json.dumps(event).encode()


class Pipeline:
    def __init__(self, tmp_path: Path, bootstrap: str, url: str, *, idempotence: bool = True,
                 sink_options: dict | None = None):
        self.name = f"p{uuid.uuid4().hex[:8]}"
        self.consumer = f"{self.name}.replica"
        self.topic = f"{self.name}.public.items"
        self.url = url
        self.file = write_pipeline(
            tmp_path / f"{self.name}.yaml", pipeline=self.name, bootstrap=bootstrap,
            source_dsn="postgresql://nobody@127.0.0.1:1/unused", tables=["public.items"],
            sinks={"replica": {"url": url, **(sink_options or {})}}, idempotence=idempotence,
        )
        self.config = load_pipeline(self.file)
        self.sqlite_path = self.config.sinks["replica"].sqlite_path

    def publish(self, events: list[tuple[bytes, bytes]], origin: SourceOrigin | None = ORIGIN_A) -> None:
        async def send() -> None:
            await ensure_topics(self.config.kafka, [self.topic])
            producer = AIOKafkaProducer(bootstrap_servers=self.config.kafka.bootstrap_servers,
                                        enable_idempotence=self.config.kafka.idempotence)
            await producer.start()
            try:
                headers = [(SCHEMA_HEADER, ITEMS.to_json())]
                if origin is not None:
                    headers.append((ORIGIN_HEADER, origin.to_json()))
                for key, value in events:
                    await producer.send_and_wait(self.topic, value, key=key, headers=headers)
            finally:
                await producer.stop()

        asyncio.run(send())

    def publish_all(self, events: list[tuple[bytes, bytes]]) -> None:
        """Like publish, without waiting for each record's acknowledgement: for many events."""
        async def send() -> None:
            await ensure_topics(self.config.kafka, [self.topic])
            producer = AIOKafkaProducer(bootstrap_servers=self.config.kafka.bootstrap_servers,
                                        enable_idempotence=True)  # in order, whatever the retries
            await producer.start()
            try:
                headers = [(SCHEMA_HEADER, ITEMS.to_json()), (ORIGIN_HEADER, ORIGIN_A.to_json())]
                for key, value in events:
                    await producer.send(self.topic, value, key=key, headers=headers)
                await producer.flush()
            finally:
                await producer.stop()

        asyncio.run(send())

    def rows(self) -> list[tuple]:
        sql = 'SELECT "id", "name", "notes" FROM "items" ORDER BY "id"'
        if self.sqlite_path is not None:
            if not self.sqlite_path.exists():
                return []
            with closing(sqlite3.connect(self.sqlite_path)) as conn:
                try:
                    return conn.execute(sql).fetchall()
                except sqlite3.OperationalError:
                    return []
        with psycopg.connect(self.url) as conn:
            try:
                return conn.execute(sql).fetchall()
            except psycopg.errors.UndefinedTable:
                return []

    def stored(self, columns: str = '"kafka_offset", "commit_lsn", "system_id", "timeline"') -> tuple | None:
        """The partition's row of the sink's positions (None before there is one)."""
        sql = f'SELECT {columns} FROM "cdc_sink_positions" WHERE "consumer" = '
        if self.sqlite_path is not None:
            with closing(sqlite3.connect(self.sqlite_path)) as conn:
                try:
                    return conn.execute(sql + "?", (self.consumer,)).fetchone()
                except sqlite3.OperationalError:  # not created yet
                    return None
        with psycopg.connect(self.url) as conn:
            try:
                return conn.execute(sql + "%s", (self.consumer,)).fetchone()
            except psycopg.errors.UndefinedTable:
                return None

    def stored_count(self) -> tuple | None:
        """(Kafka offset, commit LSN, events of that commit applied) stored for the partition."""
        return self.stored('"kafka_offset", "commit_lsn", "commit_events"')

    def sink(self, *args: str, log: str = "sink") -> "SinkProcess":
        return SinkProcess(self.file, args, log)


class SinkProcess(CdcProcess):
    """`cdc sink FILE ARGS...`, its output in its own log file."""

    def __init__(self, pipeline_file: Path, args: tuple[str, ...], log: str):
        super().__init__(pipeline_file, "sink")
        self.args = args
        self.log_path = pipeline_file.with_suffix(f".{log}.log")

    def start(self) -> "SinkProcess":
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cdc.cli", "sink", str(self.pipeline_file), *self.args],
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def exit_code(self, timeout: float = 60) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            raise AssertionError(f"cdc sink did not exit within {timeout}s:\n{self.log()}")

    def error_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.startswith("error:")]


@pytest.fixture(params=["sqlite", "postgres"])
def target_url(request, tmp_path):
    if request.param == "sqlite":
        return "sqlite:///replica.db"  # relative to the YAML file's directory
    return request.getfixturevalue("target_pg")


# -- one applier per sink ---------------------------------------------------------------------------


def test_a_second_sink_process_fails_fast_and_the_first_keeps_applying(tmp_path, broker, target_url):
    p = Pipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.publish([change(i, 0x1000 + 0x100 * i) for i in range(1, 6)])
    with p.sink(log="first") as first:
        wait_until(lambda: len(p.rows()) == 5, process=first, what="5 rows")
        second = p.sink(log="second").start()
        assert second.exit_code() == 5
        (line,) = second.error_lines()
        # The target as the user wrote it, but for its password (and the database of this test).
        where = p.sqlite_path if p.sqlite_path else redact(target_url).rsplit("/", 1)[0] + "/"
        assert line.startswith(f"error: sink {p.consumer} is already running against {where}")
        credentials = urlsplit(target_url).netloc.rpartition("@")[0]  # user:password of a PostgreSQL target
        assert not credentials or credentials not in second.log()
        # the first one was not disturbed
        p.publish([change(6, 0x2000)])
        wait_until(lambda: len(p.rows()) == 6, process=first, what="the 6th row")
        assert p.stored()[0] == 5
    # once the first has stopped, the lock is free again
    with p.sink(log="third") as third:
        p.publish([change(7, 0x2100)])
        wait_until(lambda: len(p.rows()) == 7, process=third, what="the 7th row")


# -- source history ---------------------------------------------------------------------------------


def test_another_source_history_is_refused_until_accepted_deliberately(tmp_path, broker, target_url):
    p = Pipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.publish([change(1, 0x5000), change(2, 0x5100)])
    # a later timeline that branched after everything applied: continues by itself
    promoted = SourceOrigin(ORIGIN_A.system_id, 2, 0x5200)
    p.publish([change(3, 0x5300)], origin=promoted)
    with p.sink() as sink:
        wait_until(lambda: len(p.rows()) == 3, process=sink, what="3 rows")
        wait_until(lambda: p.stored() == (2, "0/5300", ORIGIN_A.system_id, 2), process=sink, what="origin stored")

    # a timeline that branched before what was applied: the target holds changes the new history lacks
    forked = SourceOrigin(ORIGIN_A.system_id, 3, 0x5100)
    p.publish([change(4, 0x5180, name="forked")], origin=forked)
    refused = p.sink(log="refused").start()
    assert refused.exit_code() == 4
    (line,) = refused.error_lines()
    assert f"sink {p.consumer}: {p.topic}[0]@3:" in line and "timeline 3" in line
    assert f"cdc sink {p.file} --name replica --accept-source-history" in line
    assert len(p.rows()) == 3 and p.stored()[0] == 2  # nothing applied

    # another cluster altogether: refused as well
    other = SourceOrigin("7309999999999999999", 1, 0)
    with p.sink("--name", "replica", "--accept-source-history", log="accept") as accepting:
        # the forked event is applied although its position is below the stored one
        wait_until(lambda: (4, "forked", "long text") in p.rows(), process=accepting, what="the forked row")
        wait_until(lambda: p.stored() == (3, "0/5180", ORIGIN_A.system_id, 3), process=accepting, what="new origin")
    p.publish([change(5, 0x100)], origin=other)
    refused = p.sink(log="refused2").start()
    assert refused.exit_code() == 4
    assert "another database cluster" in refused.error_lines()[0]
    assert len(p.rows()) == 4


def test_events_without_origin_are_accepted_and_keep_the_stored_origin(tmp_path, broker):
    p = Pipeline(tmp_path, broker.bootstrap_servers, "sqlite:///replica.db")
    p.publish([change(1, 0x1000)])
    p.publish([change(2, 0x1100)], origin=None)  # an older connector
    with p.sink() as sink:
        wait_until(lambda: len(p.rows()) == 2, process=sink, what="2 rows")
        wait_until(lambda: p.stored() == (1, "0/1100", ORIGIN_A.system_id, 1), process=sink, what="positions")


# -- partial rows ------------------------------------------------------------------------------------


def test_partial_rows_update_only_their_columns_and_a_missing_row_is_named_not_invented(tmp_path, broker, target_url):
    p = Pipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.publish([change(1, 0x1000, notes="kept"), change(2, 0x1100, notes="kept")])
    with p.sink() as sink:
        wait_until(lambda: len(p.rows()) == 2, process=sink, what="2 rows")
        p.publish([
            change(1, 0x1200, op="u", name="renamed", unchanged=["notes"]),  # row in the target
            change(3, 0x1300, notes="full"), change(3, 0x1400, op="u", name="three", unchanged=["notes"]),
            change(9, 0x1500, op="u", name="secret-name", unchanged=["notes"]),  # the target lacks row 9
        ])
        wait_until(lambda: p.stored() and p.stored()[0] == 5, process=sink, what="the partial rows applied")
        assert p.rows() == [(1, "renamed", "kept"), (2, "n", "kept"), (3, "three", "full")]
        warning = wait_until(lambda: [x for x in sink.log().splitlines() if "found no row" in x], process=sink,
                             what="a warning")
        assert "1 partial rows for table items (key id)" in warning[0]
        assert "secret-name" not in sink.log() and "9" not in warning[0].split("items")[1]


# -- a broker that came back without its data --------------------------------------------------------


def test_a_broker_that_lost_its_data_stops_the_sink_with_what_is_missing(tmp_path, target_url):
    broker = LocalBroker().start()  # tansu keeps nothing: a restart is a broker that lost its data
    try:
        p = Pipeline(tmp_path, broker.bootstrap_servers, target_url, idempotence=False)
        p.publish([change(i, 0x1000 + 0x100 * i) for i in range(1, 6)])
        sink = p.sink().start()
        wait_until(lambda: len(p.rows()) == 5, process=sink, what="5 rows")
        wait_until(lambda: p.stored() and p.stored()[0] == 4, process=sink, what="offset 4 stored")
        # memory-only broker: a restart loses every topic; then a connector publishes again
        broker.stop()
        broker = LocalBroker(port=broker.port).start()
        p.publish([change(i, 0x9000 + 0x100 * i) for i in range(6, 8)])
        assert sink.exit_code() == 4
        (line,) = sink.error_lines()
        assert line.startswith(f"error: sink {p.consumer}: {p.topic}[0]: the sink applied up to offset 4 ")
        assert "partition ends at offset 1" in line
        # and a sink started now refuses at once, on assignment
        again = p.sink(log="again").start()
        assert again.exit_code() == 4
        assert "the sink applied up to offset 4" in again.error_lines()[0]
        assert len(p.rows()) == 5
    finally:
        broker.stop()


def test_a_recreated_topic_with_other_events_at_the_stored_offset_is_detected(tmp_path):
    broker = LocalBroker().start()
    try:
        p = Pipeline(tmp_path, broker.bootstrap_servers, "sqlite:///replica.db", idempotence=False)
        p.publish([change(i, 0x1000 + 0x100 * i) for i in range(1, 4)])
        with p.sink() as sink:
            wait_until(lambda: p.stored() and p.stored()[0] == 2, process=sink, what="offset 2 stored")
        broker.stop()
        broker = LocalBroker(port=broker.port).start()
        # more events than before, all later than what was applied: offsets 0..4 exist again
        p.publish([change(i, 0x9000 + 0x100 * i) for i in range(10, 15)])
        again = p.sink(log="again").start()
        assert again.exit_code() == 4
        assert "offset 2 holds position 0/9C00" in again.error_lines()[0]
        assert len(p.rows()) == 3
    finally:
        broker.stop()


# -- errors a user can act on ------------------------------------------------------------------------


def test_unreachable_target_and_missing_database_are_one_line_naming_the_sink(tmp_path, broker, target_pg):
    missing_db = target_pg.rsplit("/", 1)[0] + "/no_such_database_here"
    for url, words in ((missing_db, 'database "no_such_database_here" does not exist'),
                       ("postgresql://cdc_test:s3cret-pw@127.0.0.1:1/x?connect_timeout=3", "127.0.0.1")):
        # give_up_after_s 0: an address that refuses connections is reported at once, not waited out
        p = Pipeline(tmp_path, broker.bootstrap_servers, url, sink_options={"retry": {"give_up_after_s": 0}})
        proc = p.sink().start()
        assert proc.exit_code() == 1
        (line,) = proc.error_lines()
        assert line.startswith(f"error: sink {p.consumer}: cannot use target postgresql://cdc_test:***@127.0.0.1:")
        assert words in line
        assert "s3cret" not in proc.log() and "cdc_test:cdc_test" not in proc.log()
        assert "Traceback" not in proc.log()


def test_a_value_the_target_rejects_names_sink_table_and_column_not_the_value(tmp_path, broker, target_pg):
    p = Pipeline(tmp_path, broker.bootstrap_servers, target_pg)
    with psycopg.connect(target_pg, autocommit=True) as conn:
        # a target table of the user's with a stricter type than the source's
        conn.execute('CREATE TABLE items (id integer PRIMARY KEY, name text, notes date)')
    p.publish([change(1, 0x1000, notes="private-value")])
    proc = p.sink().start()
    assert proc.exit_code() == 1
    (line,) = proc.error_lines()
    assert line.startswith(f'error: sink {p.consumer}: table "items", column "notes"')
    assert "private-value" not in proc.log()


# -- batches assembled while the one before is applied ---------------------------------------------


def change_in(i: int, commit: int, *, name: Any = "n") -> tuple[bytes, bytes]:
    """Change `i` of the source transaction that commits at `commit` (its own WAL record, before it)."""
    key, value = change(i, commit, name=name)
    event = json.loads(value)
    event["source"]["lsn"] = format_lsn(commit - 0x100000 + i * 0x40)
    return key, json.dumps(event).encode()


def test_a_transaction_longer_than_a_batch_is_counted_on_from_batch_to_batch(tmp_path, broker, target_url):
    """While a batch is applied, the next one is assembled against the positions that one stores:
    the stored count of the source transaction's events goes on from batch to batch, as a restart
    in the middle of the transaction needs it (cdc.sink.transactions)."""
    p = Pipeline(tmp_path, broker.bootstrap_servers, target_url, sink_options={"batch_size": 100})
    commit = 0x5000000
    p.publish_all([change_in(i, commit) for i in range(1, 2501)])
    proc = p.sink().start()
    try:
        wait_until(lambda: p.stored_count() == (2499, format_lsn(commit), 2500) or f"stored: {p.stored_count()}",
                   process=proc, what="the whole transaction applied")
    finally:
        proc.stop()
    assert [row[0] for row in p.rows()] == list(range(1, 2501))


def test_a_value_that_does_not_convert_stops_the_sink_after_every_batch_before_it(tmp_path, broker, target_url):
    """The batches before a value the target cannot take are committed whole, with their positions,
    though the batch holding it was converted while the one before it was still being applied."""
    p = Pipeline(tmp_path, broker.bootstrap_servers, target_url, sink_options={"batch_size": 100})
    p.publish_all([change_in(i, 0x5000000 + i * 0x100000, name=12345 if i == 700 else "n") for i in range(1, 1001)])
    proc = p.sink().start()
    assert proc.exit_code() == 1
    (line,) = proc.error_lines()
    assert line.startswith(f'error: sink {p.consumer}: table "items", column "name"'), line
    offset, commit_lsn, _ = p.stored_count()
    assert offset < 699  # record 700 (offset 699) is not passed
    assert [row[0] for row in p.rows()] == list(range(1, offset + 2))  # every row up to the stored offset, no other


# -- a record that is not a cdc event ---------------------------------------------------------------


def test_a_record_that_is_no_event_stops_the_sink_until_skipped_deliberately(tmp_path, broker, target_url):
    """Invalid JSON, then `[]`: each stops the sink (exit 4, at every restart) with one line naming
    the record and the command that skips it; that command skips exactly that record, says so in
    the log and in the positions table, and the sink goes on."""
    p = Pipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.publish([change(1, 0x1000), (b'{"id": 2}', b"{not json"), change(2, 0x1100), (b'{"id": 3}', b"[]"),
               change(3, 0x1200)])
    for attempt in ("first", "restart"):
        stopped = p.sink(log=attempt).start()
        assert stopped.exit_code() == 4, stopped.log()
        (line,) = stopped.error_lines()
        assert f"sink {p.consumer}: {p.topic}[0]@1: not a cdc change event" in line
        skip = f"cdc sink {p.file} --name replica --skip-record {p.topic}:0:1 --yes"
        assert skip in line
    assert p.rows() == [(1, "n", "long text")]

    # Refused, skipping nothing: a record that is an event, one already applied, no --yes
    for args, says in ((f"{p.topic}:0:2", "is a cdc event"), (f"{p.topic}:0:0", "applied up to offset 0")):
        refused = p.sink("--name", "replica", "--skip-record", args, "--yes", log=f"refused-{args}").start()
        assert refused.exit_code() == 2 and says in refused.error_lines()[0], refused.log()
    refused = p.sink("--name", "replica", "--skip-record", f"{p.topic}:0:1", log="no-yes").start()
    assert refused.exit_code() == 2 and "--yes" in refused.error_lines()[0]

    skipping = p.sink(*skip.split()[3:], log="skip-1").start()
    assert skipping.exit_code() == 4  # past the first, it stops at the next one
    assert "skipping one record as asked" in skipping.log() and f"{p.topic}[0]@1" in skipping.log()
    assert f"{p.topic}[0]@3: not a cdc change event" in skipping.error_lines()[0]
    assert p.rows() == [(1, "n", "long text"), (2, "n", "long text")]
    with p.sink("--name", "replica", "--skip-record", f"{p.topic}:0:3", "--yes", log="skip-3") as sink:
        wait_until(lambda: len(p.rows()) == 3, process=sink, what="the event after the skipped record")
    assert p.stored()[0] == 4
    # Recorded, and a normal sink reads past both records again without stopping.
    with p.sink(log="after") as sink:
        p.publish([change(4, 0x1300)])
        wait_until(lambda: len(p.rows()) == 4, process=sink, what="a later event")
    assert skipped_offset(p) == 3


def skipped_offset(p: Pipeline) -> int | None:
    sql = 'SELECT "skipped_offset" FROM "cdc_sink_positions" WHERE "consumer" = '
    if p.sqlite_path is not None:
        with closing(sqlite3.connect(p.sqlite_path)) as conn:
            return conn.execute(sql + "?", (p.consumer,)).fetchone()[0]
    with psycopg.connect(p.url) as conn:
        return conn.execute(sql + "%s", (p.consumer,)).fetchone()[0]
