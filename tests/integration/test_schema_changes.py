"""Source schema changes reach the targets as the source made them: real `cdc sink` processes, the
real broker, real SQLite and PostgreSQL targets.

The events are published here with the `cdc.schema` header each one would carry, attnum included
(the source's identity of a column across RENAME and ALTER TYPE), so each test controls exactly the
shape in force at every event, also inside one source transaction.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from cdc.config import load_pipeline
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.events.schema import Column, TableSchema
from cdc.publish.admin import ensure_topics
from cdc.lsn import format_lsn
from tests.integration.harness import CdcProcess, wait_for_slot, wait_until, write_pipeline

ORIGIN = SourceOrigin("7301234567890123456", 1, 0)
ID = Column("id", "integer", "integer", nullable=False, attnum=1)


def items(*columns: Column) -> TableSchema:
    return TableSchema("public", "items", (ID, *columns), ("id",))


class Stream:
    """One table topic and one sink `replica` of it; events published with their own schema header."""

    def __init__(self, tmp_path: Path, bootstrap: str, url: str, **sink_options):
        self.name = f"p{uuid.uuid4().hex[:8]}"
        self.consumer = f"{self.name}.replica"
        self.topic = f"{self.name}.public.items"
        self.url = url
        self.file = write_pipeline(
            tmp_path / f"{self.name}.yaml", pipeline=self.name, bootstrap=bootstrap,
            source_dsn="postgresql://nobody@127.0.0.1:1/unused", tables=["public.items"],
            sinks={"replica": {"url": url, **sink_options}},
        )
        self.config = load_pipeline(self.file)
        self.sqlite_path = self.config.sinks["replica"].sqlite_path
        self.commit = 0x1000
        self.published = 0

    def transaction(self, *changes: tuple[TableSchema, str, dict]) -> None:
        """Publish one source transaction: (schema in force, op, row) per event, in order."""
        self.commit += 0x1000
        events = []
        for seq, (schema, op, row) in enumerate(changes):
            event = {"op": op, "before": {"id": row["id"]} if op == "d" else None, "after": None if op == "d" else row,
                     "source": {"pipeline": self.name, "db": "src", "schema": "public", "table": "items",
                                "commit_lsn": format_lsn(self.commit), "lsn": format_lsn(self.commit - 0x800 + seq),
                                "seq": seq, "txid": 700, "commit_ts": "2026-11-26T20:19:10Z", "snapshot": False},
                     "ts_ms": 1}
            headers = [(SCHEMA_HEADER, schema.to_json()), (ORIGIN_HEADER, ORIGIN.to_json())]
            events.append((json.dumps({"id": row["id"]}).encode(), json.dumps(event).encode(), headers))

        async def send() -> None:
            await ensure_topics(self.config.kafka, [self.topic])
            producer = AIOKafkaProducer(bootstrap_servers=self.config.kafka.bootstrap_servers, enable_idempotence=True)
            await producer.start()
            try:
                for key, value, headers in events:
                    await producer.send_and_wait(self.topic, value, key=key, headers=headers)
            finally:
                await producer.stop()

        asyncio.run(send())
        self.published += len(events)

    def query(self, sql: str) -> list[tuple]:
        if self.sqlite_path is not None:
            with closing(sqlite3.connect(self.sqlite_path)) as conn:
                return conn.execute(sql).fetchall()
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql).fetchall()

    def execute(self, sql: str) -> None:
        if self.sqlite_path is not None:
            with closing(sqlite3.connect(self.sqlite_path)) as conn:
                conn.execute(sql)
                conn.commit()
        else:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(sql)

    def columns(self) -> list[str]:
        if self.sqlite_path is not None:
            return [name for (name,) in self.query("SELECT name FROM pragma_table_info('items')")]
        return [name for (name,) in self.query(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped"
            " ORDER BY attnum")]

    def applied(self) -> int | None:
        """Kafka offset of the last event the sink applied."""
        try:
            rows = self.query(f"SELECT kafka_offset FROM cdc_sink_positions WHERE consumer = '{self.consumer}'")
        except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
            return None
        return rows[0][0] if rows else None

    def all_applied(self) -> bool:
        return self.applied() == self.published - 1

    def sink(self) -> CdcProcess:
        return CdcProcess(self.file, "sink")

    def stopped(self, sink: CdcProcess) -> tuple[int, str]:
        """The exit code of a sink that must stop by itself, and its error line."""
        assert sink.proc is not None
        code = sink.proc.wait(60)
        errors = [line for line in sink.log().splitlines() if line.startswith("error:")]
        assert errors, sink.log()
        return code, errors[-1]


@pytest.fixture(params=["sqlite", "postgres"])
def target_url(request):
    if request.param == "sqlite":
        return "sqlite:///replica.db"  # relative to the YAML file's directory
    return request.getfixturevalue("target_pg")


def test_rename_keeps_the_values_also_inside_a_transaction_that_writes_rows(tmp_path, broker, target_url):
    before = items(Column("name", "text", "text", attnum=2), Column("qty", "integer", "integer", attnum=3))
    after = items(Column("label", "text", "text", attnum=2), Column("qty", "integer", "integer", attnum=3))
    s = Stream(tmp_path, broker.bootstrap_servers, target_url)
    s.transaction(*[(before, "c", {"id": i, "name": f"n{i}", "qty": i}) for i in (1, 2, 3)])
    # BEGIN; UPDATE ...; ALTER TABLE items RENAME name TO label; INSERT ...; UPDATE ...; COMMIT
    s.transaction((before, "u", {"id": 1, "name": "one", "qty": 10}),
                  (after, "c", {"id": 4, "label": "four", "qty": 4}),
                  (after, "u", {"id": 2, "label": "two", "qty": 20}))
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="every event applied")
        assert s.columns() == ["id", "label", "qty"]
        assert s.query("SELECT id, label, qty FROM items ORDER BY id") == [
            (1, "one", 10), (2, "two", 20), (3, "n3", 3), (4, "four", 4)]
        # and on after a restart: the next events of the new shape go to the renamed column
        sink.stop()
        s.transaction((after, "u", {"id": 3, "label": "three", "qty": 30}))
        sink.start()
        wait_until(s.all_applied, process=sink, what="the event after the restart applied")
    assert s.query("SELECT id, label FROM items WHERE id = 3") == [(3, "three")]


def test_widening_type_changes_alter_the_target_column_and_keep_every_value(tmp_path, broker, target_url):
    before = items(Column("qty", "integer", "integer", attnum=2),
                   Column("name", "character varying(5)", "text", attnum=3),
                   Column("price", "numeric(10,2)", "numeric", attnum=4),
                   Column("code", "integer", "integer", attnum=5))
    after = items(Column("qty", "bigint", "bigint", attnum=2),
                  Column("name", "text", "text", attnum=3),
                  Column("price", "numeric(14,4)", "numeric", attnum=4),
                  Column("code", "text", "text", attnum=5))
    s = Stream(tmp_path, broker.bootstrap_servers, target_url)
    s.transaction((before, "c", {"id": 1, "qty": 5, "name": "short", "price": "12.50", "code": 7}))
    s.transaction((after, "c", {"id": 2, "qty": 2**31 + 7, "name": "much longer than five", "price": "12345.6789",
                                "code": "A-7"}))
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="every event applied")
    rows = s.query("SELECT id, qty, name, price, code FROM items ORDER BY id")
    if s.sqlite_path is None:
        from decimal import Decimal
        # PostgreSQL converts the old values as the source did (12.50 -> 12.5000)
        assert rows == [(1, 5, "short", Decimal("12.5000"), "7"),
                        (2, 2**31 + 7, "much longer than five", Decimal("12345.6789"), "A-7")]
        types = dict(s.query("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                             " WHERE attrelid = 'items'::regclass AND attnum > 0"))
        assert (types["qty"], types["name"], types["price"], types["code"]) == ("bigint", "text", "numeric(14,4)", "text")
    else:
        # SQLite: numeric stays the text the source printed when the row was written
        assert rows == [(1, 5, "short", "12.50", "7"), (2, 2**31 + 7, "much longer than five", "12345.6789", "A-7")]
        assert s.query("SELECT typeof(code) FROM items ORDER BY id") == [("text",), ("text",)]


def test_a_type_change_that_rewrote_the_values_empties_the_column_until_the_re_read_fills_it(tmp_path, broker,
                                                                                             target_url):
    """text -> integer (ALTER ... USING length(code)): the source rewrote every value, so the old
    ones must not stay; the connector's re-read of the table (r events) fills the column again."""
    before = items(Column("code", "text", "text", attnum=2), Column("other", "text", "text", attnum=3))
    after = items(Column("code", "integer", "integer", attnum=2), Column("other", "text", "text", attnum=3))
    s = Stream(tmp_path, broker.bootstrap_servers, target_url)
    s.transaction((before, "c", {"id": 1, "code": "seventeen", "other": "a"}),
                  (before, "c", {"id": 3, "code": "three", "other": "c"}))
    s.transaction((after, "c", {"id": 2, "code": 18, "other": "b"}))
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="the change applied")
        assert s.query("SELECT id, code, other FROM items ORDER BY id") == [(1, None, "a"), (2, 18, "b"), (3, None, "c")]
        s.transaction((after, "r", {"id": 1, "code": 9, "other": "a"}), (after, "r", {"id": 3, "code": 5, "other": "c"}))
        wait_until(s.all_applied, process=sink, what="the re-read rows applied")
    assert s.query("SELECT id, code, other FROM items ORDER BY id") == [(1, 9, "a"), (2, 18, "b"), (3, 5, "c")]


def test_a_rewrite_the_target_could_hold_as_text_still_empties_the_column(tmp_path, broker, target_url):
    """integer -> date (ALTER ... USING date '2026-01-01' + n): SQLite could keep the integers as
    text (INTEGER -> TEXT), but they are no longer the source's values: the column is emptied like
    any other rewrite, never shows '1' as a date, and the re-read fills it."""
    before = items(Column("n", "integer", "integer", attnum=2))
    after = items(Column("n", "date", "date", attnum=2))
    s = Stream(tmp_path, broker.bootstrap_servers, target_url)
    s.transaction((before, "c", {"id": 1, "n": 1}), (before, "c", {"id": 3, "n": 3}))
    s.transaction((after, "c", {"id": 2, "n": "2026-01-03"}))
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="the change applied")
        assert [(i, str(n) if n is not None else None) for i, n in s.query("SELECT id, n FROM items ORDER BY id")] == [
            (1, None), (2, "2026-01-03"), (3, None)]
        s.transaction((after, "r", {"id": 1, "n": "2026-01-02"}), (after, "r", {"id": 3, "n": "2026-01-04"}))
        wait_until(s.all_applied, process=sink, what="the re-read rows applied")
    assert [(i, str(n)) for i, n in s.query("SELECT id, n FROM items ORDER BY id")] == [
        (1, "2026-01-02"), (2, "2026-01-03"), (3, "2026-01-04")]


def test_a_key_type_change_the_target_cannot_hold_is_a_named_stop_with_the_way_forward(tmp_path, broker, target_pg):
    """A key column is never emptied: integer -> smallint of the key stops the sink, named."""
    before = items(Column("code", "text", "text", attnum=2))
    after = TableSchema("public", "items", (Column("id", "smallint", "smallint", nullable=False, attnum=1),
                                            Column("code", "text", "text", attnum=2)), ("id",))
    s = Stream(tmp_path, broker.bootstrap_servers, target_pg)
    s.transaction((before, "c", {"id": 1, "code": "17"}))
    s.transaction((after, "c", {"id": 2, "code": "18"}))
    sink = s.sink().start()
    code, error = s.stopped(sink)
    assert code == 1
    assert 'table "items", column "id"' in error and "from integer to smallint" in error
    assert f"{s.topic}[0]@1" in error  # where the change is in the stream
    assert "Way forward" in error and "re-snapshot" in error
    assert s.query("SELECT id, code FROM items") == [(1, "17")]  # nothing of the change applied
    # a restart stops the same way: never silently on
    sink = s.sink().start()
    assert s.stopped(sink)[1] == error
    # the way forward: alter the target column by hand, then start the sink again
    s.execute("ALTER TABLE items ALTER COLUMN id TYPE smallint")
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="the change applied")
    assert s.query("SELECT id, code FROM items ORDER BY id") == [(1, "17"), (2, "18")]


@pytest.mark.parametrize("on_column_drop", ["keep", "drop"])
def test_a_dropped_column_is_kept_with_null_or_dropped_per_sink(tmp_path, broker, target_url, on_column_drop):
    before = items(Column("name", "text", "text", attnum=2), Column("notes", "text", "text", attnum=3))
    after = items(Column("name", "text", "text", attnum=2))
    s = Stream(tmp_path, broker.bootstrap_servers, target_url, on_column_drop=on_column_drop)
    s.transaction((before, "c", {"id": 1, "name": "a", "notes": "x"}), (before, "c", {"id": 2, "name": "b", "notes": "y"}))
    s.transaction((after, "u", {"id": 1, "name": "a2"}), (after, "c", {"id": 3, "name": "c"}))
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="every event applied")
    if on_column_drop == "keep":
        assert s.columns() == ["id", "name", "notes"]
        # rows written after the drop hold NULL there, as the source has no value for them
        assert s.query("SELECT id, name, notes FROM items ORDER BY id") == [(1, "a2", None), (2, "b", "y"), (3, "c", None)]
    else:
        assert s.columns() == ["id", "name"]
        assert s.query("SELECT id, name FROM items ORDER BY id") == [(1, "a2"), (2, "b"), (3, "c")]


def test_a_column_dropped_by_hand_in_the_target_is_a_named_stop_not_re_added_with_nulls(tmp_path, broker, target_url):
    schema = items(Column("name", "text", "text", attnum=2), Column("notes", "text", "text", attnum=3))
    s = Stream(tmp_path, broker.bootstrap_servers, target_url)
    s.transaction(*[(schema, "c", {"id": i, "name": f"n{i}", "notes": f"x{i}"}) for i in (1, 2)])
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="the first rows applied")
        s.execute('ALTER TABLE items DROP COLUMN notes')
        s.transaction((schema, "c", {"id": 3, "name": "n3", "notes": "x3"}))
        code, error = s.stopped(sink)  # the insert finds no column "notes": said as what differs
    assert code == 1
    assert 'table "items": column "notes"' in error and "dropped or renamed by hand" in error
    for _ in range(2):  # on restart, and again: a named stop, the column is not re-created
        sink = s.sink().start()
        code, error = s.stopped(sink)
        assert code == 1
        assert 'table "items": column "notes"' in error and "dropped or renamed by hand" in error
        assert "Way forward" in error
        assert s.columns() == ["id", "name"]
        assert s.query("SELECT id, name FROM items ORDER BY id") == [(1, "n1"), (2, "n2")]


def test_a_kept_column_list_follows_a_rename(tmp_path, broker, target_url):
    before = items(Column("name", "text", "text", attnum=2), Column("secret", "text", "text", attnum=3))
    after = items(Column("label", "text", "text", attnum=2), Column("secret", "text", "text", attnum=3))
    s = Stream(tmp_path, broker.bootstrap_servers, target_url, tables={"public.items": {"columns": ["name"]}})
    s.transaction((before, "c", {"id": 1, "name": "a", "secret": "s1"}))
    s.transaction((after, "u", {"id": 1, "label": "a2", "secret": "s2"}), (after, "c", {"id": 2, "label": "b", "secret": "s3"}))
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="every event applied")
    assert s.columns() == ["id", "label"]
    assert s.query("SELECT id, label FROM items ORDER BY id") == [(1, "a2"), (2, "b")]
    # a new process sees only the new name: the target remembers which kept column it is
    s.transaction((after, "u", {"id": 2, "label": "b2", "secret": "s4"}))
    with s.sink() as sink:
        wait_until(s.all_applied, process=sink, what="the event after the restart applied")
    assert s.query("SELECT id, label FROM items ORDER BY id") == [(1, "a2"), (2, "b2")]


# -- through the real connector ---------------------------------------------------------------------


def test_type_changes_and_a_drop_inside_transactions_that_write_rows_through_cdc_run(tmp_path, source_db, target_pg, broker):
    """The issue's reproduction: ALTER TYPE integer -> bigint, then a value above 2**31, under
    `cdc run` (capture stopped with the sink before). Both sinks apply whole source transactions."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, qty integer, name varchar(5), notes text)")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")  # full rows for the sinks
    name = f"sc_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(
        tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
        bootstrap=broker.bootstrap_servers,
        sinks={"pg": {"url": target_pg, "apply": "transactional"},
               "lite": {"url": "sqlite:///replica.db", "apply": "transactional"}},
    )
    sqlite_file = tmp_path / "replica.db"
    # notes, dropped last, is kept: the rows hold what they had, row 1 (written after the drop) NULL
    expected = [(1, 2**40, "one", None), (2, 2, "two", "c"), (3, 2**31 + 9, "longer than five", "d")]

    def rows_pg():
        with psycopg.connect(target_pg) as conn:
            try:
                return conn.execute("SELECT id, qty, name, notes FROM items ORDER BY id").fetchall()
            except psycopg.errors.UndefinedTable:
                return None

    def rows_lite():
        if not sqlite_file.exists():
            return None
        with closing(sqlite3.connect(sqlite_file)) as conn:
            try:
                return conn.execute("SELECT id, qty, name, notes FROM items ORDER BY id").fetchall()
            except sqlite3.OperationalError:
                return None

    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db) as conn:  # one transaction per `with`
            conn.execute("INSERT INTO items VALUES (1, 1, 'one', 'a'), (2, 2, 'two', 'b')")
        with psycopg.connect(source_db) as conn:
            conn.execute("UPDATE items SET notes = 'c' WHERE id = 2")
            conn.execute("ALTER TABLE items ALTER COLUMN qty TYPE bigint, ALTER COLUMN name TYPE text")
            conn.execute("INSERT INTO items VALUES (3, %s, 'longer than five', 'd')", (2**31 + 9,))
            conn.execute("UPDATE items SET qty = %s WHERE id = 1", (2**40,))
            conn.execute("ALTER TABLE items DROP COLUMN notes")
            conn.execute("UPDATE items SET name = 'one' WHERE id = 1")
        wait_until(lambda: rows_pg() == expected or f"{rows_pg()}", process=cdc, what="the PostgreSQL sink to hold every change")
        wait_until(lambda: rows_lite() == expected or f"{rows_lite()}", process=cdc, what="the SQLite sink to hold every change")
        assert cdc.stop() == 0, cdc.log()
    with psycopg.connect(target_pg) as conn:
        types = dict(conn.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                                  " WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped").fetchall())
    assert types == {"id": "integer", "qty": "bigint", "name": "text", "notes": "text"}  # notes kept (on_column_drop: keep)


def test_a_column_renamed_while_streaming_keeps_its_values_in_both_sinks_through_cdc_run(tmp_path, source_db, target_pg,
                                                                                          broker):
    """The issue's first reproduction: RENAME COLUMN n TO n2 mid-stream left n2 empty beside the old
    n in both sinks. The connector names the column's identity (attnum), so the sinks rename."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n text)")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    name = f"sc_{uuid.uuid4().hex[:8]}"
    sqlite_file = tmp_path / "replica.db"
    path = write_pipeline(
        tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
        bootstrap=broker.bootstrap_servers, sinks={"pg": {"url": target_pg}, "lite": {"url": f"sqlite:///{sqlite_file}"}},
    )

    def rows(query_pg: bool):
        try:
            if query_pg:
                with psycopg.connect(target_pg) as conn:
                    return conn.execute("SELECT id, n2 FROM items ORDER BY id").fetchall()
            with closing(sqlite3.connect(sqlite_file)) as conn:
                return conn.execute("SELECT id, n2 FROM items ORDER BY id").fetchall()
        except (psycopg.Error, sqlite3.Error):
            return None

    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT i, 'before ' || i FROM generate_series(1, 50) i")
            conn.execute("ALTER TABLE items RENAME COLUMN n TO n2")
            conn.execute("INSERT INTO items VALUES (51, 'after')")
            conn.execute("UPDATE items SET n2 = 'changed' WHERE id = 2")
        expected = [(i, "before " + str(i)) for i in range(1, 51)] + [(51, "after")]
        expected[1] = (2, "changed")
        wait_until(lambda: rows(True) == expected, process=cdc, what="the PostgreSQL sink renamed, values kept")
        wait_until(lambda: rows(False) == expected, process=cdc, what="the SQLite sink renamed, values kept")
        assert cdc.stop() == 0, cdc.log()
    with psycopg.connect(target_pg) as conn:
        columns = [r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'items'::regclass"
                                              " AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]
    assert columns == ["id", "n2"]  # renamed, not an empty column beside the old one
