"""Sink targets against a real SQLite file and a real PostgreSQL database (127.0.0.1:5432).

Each PostgreSQL test creates its own database and drops it at the end. PostgreSQL being unreachable
is a test failure, never a skip.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
import uuid
from contextlib import closing
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from cdc.errors import RowRejectedError, SinkError
from cdc.events.schema import Column, TableSchema
from cdc.lsn import Position, parse_lsn
from cdc.sink.backends import PartitionProgress, PostgresTarget, SqliteTarget, TableChanges, open_target


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def pg_url(target_pg):
    return target_pg


class Db:
    """A target under test plus a separate connection that reads what it committed."""

    def __init__(self, kind: str, url: str, sqlite_path: Path | None = None):
        self.kind = kind
        self.url = url
        self.sqlite_path = sqlite_path
        self.target = open_target(url, sqlite_path=sqlite_path)

    def rows(self, sql: str) -> list[tuple]:
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.sqlite_path)) as conn, conn:  # commits, then closes
                return conn.execute(sql).fetchall()
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql).fetchall()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    if request.param == "sqlite":
        path = tmp_path / "nested" / "dir" / "sink.db"
        path.parent.mkdir(parents=True)  # the target never creates directories (the config checks they exist)
        target = Db("sqlite", f"sqlite:///{path}", path)
        assert isinstance(target.target, SqliteTarget)
    else:
        target = Db("postgres", request.getfixturevalue("pg_url"))
        assert isinstance(target.target, PostgresTarget)
    yield target
    target.target.close()


# -- schemas and rows -------------------------------------------------------------------------------

EVERY = TableSchema(
    "public",
    "every",
    (
        Column("id", "bigint", "bigint", nullable=False),
        Column("flag", "boolean", "boolean"),
        Column("small", "smallint", "smallint"),
        Column("int", "integer", "integer"),
        Column("big", "bigint", "bigint"),
        Column("amount", "numeric", "numeric"),
        Column("price", "numeric(30,10)", "numeric"),
        Column("ratio", "real", "real"),
        Column("score", "double precision", "double"),
        Column("name", "character varying(50)", "text"),
        Column("blob", "bytea", "bytea"),
        Column("day", "date", "date"),
        Column("at", "time without time zone", "time"),
        Column("attz", "time with time zone", "timetz"),
        Column("ts", "timestamp without time zone", "timestamp"),
        Column("tstz", "timestamp with time zone", "timestamptz"),
        Column("span", "interval", "interval"),
        Column("uid", "uuid", "uuid"),
        Column("doc", "json", "json"),
        Column("docb", "jsonb", "jsonb"),
        Column("ints", "integer[]", "integer", array=True),
        Column("grid", "bigint[]", "bigint", array=True),
        Column("texts", "text[]", "text", array=True),
        Column("stamps", "timestamp with time zone[]", "timestamptz", array=True),
        Column("amounts", "numeric[]", "numeric", array=True),
        Column("blobs", "bytea[]", "bytea", array=True),
        Column("docs", "jsonb[]", "jsonb", array=True),
        Column("mood", "mood", "text", builtin=False),
        Column("moods", "mood[]", "text", array=True, builtin=False),
    ),
    ("id",),
)

AMOUNT = "123456789012345678901234567890.1234567890123"  # 43 digits
PRICE = "12345678901234567890.1234567890"  # numeric(30,10): 30 digits
BLOB = bytes(range(256))
UNICODE = 'Grüße 🌍 "quoted" back\\slash, {braces} NULL'
JSON_TEXT = '{"big": 98765432109876543210.123456789012345678, "list": [1, "two", null, true], "s": "é"}'


def event_row(i: int, **over) -> dict:
    """A row as the runner hands it over: event JSON parsed with parse_float=Decimal."""
    row = {
        "id": i,
        "flag": True,
        "small": -32768,
        "int": 2147483647,
        "big": str(2**63 - 1),
        "amount": AMOUNT,
        "price": PRICE,
        "ratio": Decimal("0.1"),
        "score": Decimal("3.141592653589793"),
        "name": UNICODE,
        "blob": base64.b64encode(BLOB).decode(),
        "day": "2026-11-26",
        "at": "20:19:10.994151",
        "attz": "20:19:10.994151+02:00",
        "ts": "2026-11-26T20:19:10.994151",
        "tstz": "2026-11-26T20:19:10.994151Z",
        "span": "P1Y2M3DT4H5M6.5S",
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "doc": json.loads(JSON_TEXT, parse_float=Decimal),
        "docb": json.loads(JSON_TEXT, parse_float=Decimal),
        "ints": [1, None, -3],
        "grid": [[1, "9223372036854775807"], [None, -2]],
        "texts": [UNICODE, None, ""],
        "stamps": ["2026-11-26T20:19:10.994151Z", None],
        "amounts": [AMOUNT, "NaN", None],
        "blobs": [base64.b64encode(b"\x00\x01\xff").decode(), None],
        "docs": [{"a": Decimal("1.10")}, [1, 2], None],
        "mood": "happy",
        "moods": ["sad", None],
    }
    row.update(over)
    return row


def null_row(i: int) -> dict:
    return {c.name: None for c in EVERY.columns} | {"id": i}


ORDER_ITEMS = TableSchema(
    "shop",
    "order_items",
    (
        Column("order_id", "bigint", "bigint", nullable=False),
        Column("Line No", "integer", "integer", nullable=False),
        Column("Qty", "numeric(12,2)", "numeric"),
        Column('say "hi"', "text", "text"),
    ),
    ("order_id", "Line No"),
)

TAGS = TableSchema(
    "public", "tags", (Column("post_id", "integer", "integer"), Column("tag", "text", "text")), ("post_id", "tag")
)


def progress(offset: int, lsn: str = "16/B374D848", seq: int = 3, partition: int = 0) -> PartitionProgress:
    # the change record a little before its commit, as in a real stream
    commit = parse_lsn(lsn)
    return PartitionProgress("shop.orders", partition, offset, Position(commit, max(commit - 0x40, 0), seq))


# -- tests ------------------------------------------------------------------------------------------


def test_every_kind_round_trips_exactly(db):
    t = db.target
    t.ensure_table("every", EVERY)
    t.ensure_table("every", EVERY)  # cached: free
    t.apply("c1", [TableChanges("every", EVERY, False, [], [event_row(1), null_row(2), event_row(3)])], [progress(10)])
    t.apply(
        "c1",
        [TableChanges("every", EVERY, False, deletes=[{"id": 3}], upserts=[event_row(1, name="renamed"), null_row(4)])],
        [progress(11)],
    )
    assert db.rows('SELECT "id" FROM "every" ORDER BY "id"') == [(1,), (2,), (4,)]

    if db.kind == "postgres":
        (row,) = db.rows('SELECT * FROM "every" WHERE "id" = 1')
        got = dict(zip([c.name for c in EVERY.columns], row))
        assert got["flag"] is True
        assert got["small"] == -32768 and got["int"] == 2147483647 and got["big"] == 2**63 - 1
        assert got["amount"] == Decimal(AMOUNT) and str(got["amount"]) == AMOUNT
        assert got["price"] == Decimal(PRICE) and str(got["price"]) == PRICE
        assert got["score"] == 3.141592653589793
        assert got["name"] == "renamed"
        assert got["blob"] == BLOB
        assert got["day"] == dt.date(2026, 11, 26)
        assert got["at"] == dt.time(20, 19, 10, 994151)
        assert got["attz"] == dt.time(20, 19, 10, 994151, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        assert got["ts"] == dt.datetime(2026, 11, 26, 20, 19, 10, 994151)
        assert got["tstz"] == dt.datetime(2026, 11, 26, 20, 19, 10, 994151, tzinfo=dt.timezone.utc)
        assert got["uid"] == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        assert got["ints"] == [1, None, -3]
        assert got["grid"] == [[1, 2**63 - 1], [None, -2]]
        assert got["texts"] == [UNICODE, None, ""]
        assert got["stamps"] == [dt.datetime(2026, 11, 26, 20, 19, 10, 994151, tzinfo=dt.timezone.utc), None]
        assert got["amounts"][0] == Decimal(AMOUNT) and got["amounts"][1].is_nan() and got["amounts"][2] is None
        assert got["blobs"] == [b"\x00\x01\xff", None]
        assert got["mood"] == "happy" and got["moods"] == ["sad", None]
        # exact text forms of what Python types would blur
        ((ratio, span, doc, docb, docs),) = db.rows(
            'SELECT "ratio"::text, "span"::text, "doc"::text, "docb"::text, "docs"::text FROM "every" WHERE "id" = 1'
        )
        assert ratio == "0.1"
        assert span == "1 year 2 mons 3 days 04:05:06.5"
        expected = json.loads(JSON_TEXT, parse_float=Decimal)
        assert json.loads(doc, parse_float=Decimal) == expected
        assert json.loads(docb, parse_float=Decimal) == expected
        assert "98765432109876543210.123456789012345678" in docb
        assert docs == '{"{\\"a\\": 1.10}","[1, 2]",NULL}'
        (types,) = db.rows(
            "SELECT array_agg(format_type(atttypid, atttypmod) ORDER BY attnum) FROM pg_attribute "
            "WHERE attrelid = 'every'::regclass AND attnum > 0"
        )
        assert types[0][:3] == ["bigint", "boolean", "smallint"]
        assert types[0][6] == "numeric(30,10)" and types[0][-2:] == ["text", "text[]"]
    else:
        (row,) = db.rows('SELECT * FROM "every" WHERE "id" = 1')
        got = dict(zip([c.name for c in EVERY.columns], row))
        assert got["flag"] == 1
        assert got["small"] == -32768 and got["int"] == 2147483647 and got["big"] == 2**63 - 1
        assert got["amount"] == AMOUNT and Decimal(got["amount"]) == Decimal(AMOUNT)
        assert got["price"] == PRICE
        assert got["ratio"] == 0.1 and got["score"] == 3.141592653589793
        assert got["name"] == "renamed"
        assert got["blob"] == BLOB
        assert got["day"] == "2026-11-26"
        assert got["attz"] == "20:19:10.994151+02:00"
        assert got["tstz"] == "2026-11-26T20:19:10.994151Z"
        assert got["span"] == "P1Y2M3DT4H5M6.5S"
        assert got["uid"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        assert json.loads(got["doc"], parse_float=Decimal) == json.loads(JSON_TEXT, parse_float=Decimal)
        assert "98765432109876543210.123456789012345678" in got["docb"]
        assert got["ints"] == "[1,null,-3]"
        assert got["grid"] == "[[1,9223372036854775807],[null,-2]]"
        assert json.loads(got["texts"]) == [UNICODE, None, ""]
        assert got["amounts"] == f'["{AMOUNT}","NaN",null]'
        assert got["docs"] == '[{"a":1.10},[1,2],null]'
        assert got["mood"] == "happy" and got["moods"] == '["sad",null]'
        types = db.rows("SELECT name, type FROM pragma_table_info('every')")
        assert dict(types) == {
            c.name: ("TEXT" if c.array else
                     {"boolean": "INTEGER", "smallint": "INTEGER", "integer": "INTEGER", "bigint": "INTEGER",
                      "real": "REAL", "double": "REAL", "bytea": "BLOB"}.get(c.kind, "TEXT"))
            for c in EVERY.columns
        }

    # the all-NULL row is NULL everywhere
    (nulls,) = db.rows('SELECT * FROM "every" WHERE "id" = 2')
    assert nulls[0] == 2 and all(v is None for v in nulls[1:])
    assert t.load_positions("c1") == {("shop.orders", 0): progress(11)}


def test_float_specials(db):
    t = db.target
    t.apply("c", [TableChanges("every", EVERY, False, [], [
        null_row(1) | {"score": "NaN", "ratio": "Infinity"},
        null_row(2) | {"score": "-Infinity", "ratio": Decimal("-0.5")},
    ])], [])
    rows = db.rows('SELECT "id", "ratio", "score" FROM "every" ORDER BY "id"')
    if db.kind == "postgres":
        assert rows[0][1] == float("inf") and rows[0][2] != rows[0][2]  # NaN
    else:
        assert rows[0][1] == float("inf") and rows[0][2] is None  # SQLite stores NaN as NULL
    assert rows[1][1:] == (-0.5, float("-inf"))


def test_truncate_deletes_and_upserts_in_one_apply_with_quoted_composite_key(db):
    t = db.target
    items = [
        {"order_id": 1, "Line No": 1, "Qty": "1.50", 'say "hi"': "a"},
        {"order_id": 1, "Line No": 2, "Qty": "2.00", 'say "hi"': "b"},
        {"order_id": 2, "Line No": 1, "Qty": "3.25", 'say "hi"': None},
    ]
    t.apply("c", [
        TableChanges("Order Items", ORDER_ITEMS, False, [], items),
        TableChanges("every", EVERY, False, [], [null_row(1), null_row(2)]),
        TableChanges("Tags", TAGS, False, [], [{"post_id": 1, "tag": "x"}, {"post_id": 1, "tag": "y"}]),
    ], [progress(1)])
    t.apply("c", [
        TableChanges("Order Items", ORDER_ITEMS, False,
                     deletes=[{"order_id": 1, "Line No": 2, "Qty": None, 'say "hi"': None}],
                     upserts=[{"order_id": 1, "Line No": 1, "Qty": "9.99", 'say "hi"': "changed"},
                              {"order_id": 3, "Line No": 7, "Qty": "0.01", 'say "hi"': "new"}]),
        # truncate comes first, then this batch's rows
        TableChanges("every", EVERY, True, deletes=[{"id": 1}], upserts=[null_row(5)]),
        # all columns are key: re-inserting an existing row does nothing
        TableChanges("Tags", TAGS, False, [{"post_id": 1, "tag": "y"}], [{"post_id": 1, "tag": "x"}]),
    ], [progress(2)])

    got = db.rows('SELECT "order_id", "Line No", "Qty", "say ""hi""" FROM "Order Items" ORDER BY 1, 2')
    qty = (lambda s: Decimal(s)) if db.kind == "postgres" else (lambda s: s)
    assert got == [(1, 1, qty("9.99"), "changed"), (2, 1, qty("3.25"), None), (3, 7, qty("0.01"), "new")]
    assert db.rows('SELECT "id" FROM "every"') == [(5,)]
    assert db.rows('SELECT "post_id", "tag" FROM "Tags"') == [(1, "x")]


def test_positions_are_stored_and_loaded_back(db):
    t = db.target
    assert t.load_positions("c") == {}
    t.apply("c", [], [progress(5, "0/1", 0, partition=0), progress(7, "16/B374D848", 12, partition=1)])
    t.apply("other", [], [progress(99, "FFFFFFFF/FFFFFFFF", 2**40, partition=0)])
    t.apply("c", [], [progress(6, "16/B374D900", 0, partition=0)])
    assert t.load_positions("c") == {
        ("shop.orders", 0): progress(6, "16/B374D900", 0, partition=0),
        ("shop.orders", 1): progress(7, "16/B374D848", 12, partition=1),
    }
    assert t.load_positions("other")[("shop.orders", 0)].position == Position(2**64 - 1, 2**64 - 1 - 0x40, 2**40)
    assert ("16/B374D848",) in db.rows('SELECT "commit_lsn" FROM "cdc_sink_positions"')
    # a reopened target sees them too
    t.close()
    db.target = open_target(db.url, sqlite_path=db.sqlite_path)
    assert db.target.load_positions("c")[("shop.orders", 1)].offset == 7


def _snapshot(db) -> tuple:
    return (
        db.rows('SELECT "order_id", "Line No", "Qty" FROM "Order Items" ORDER BY 1, 2'),
        db.rows('SELECT "id", "name" FROM "every" ORDER BY 1'),
        db.rows('SELECT "consumer", "topic", "partition", "kafka_offset", "commit_lsn", "seq" FROM "cdc_sink_positions"'),
    )


def test_failing_apply_rolls_back_rows_and_positions(db):
    t = db.target
    t.apply("c", [
        TableChanges("Order Items", ORDER_ITEMS, False, [], [{"order_id": 1, "Line No": 1, "Qty": "1.00", 'say "hi"': "a"}]),
        TableChanges("every", EVERY, False, [], [null_row(1) | {"name": "kept"}]),
    ], [progress(1)])
    before = _snapshot(db)

    # The database itself rejects the second table's rows, after the first table's statements ran
    # (and after a truncate of "every"): everything must be undone.
    if db.kind == "postgres":
        bad = null_row(2) | {"day": "SECRET-not-a-date"}  # PostgreSQL cannot cast it to date
        column = "day"
    else:
        # SQLite casts nothing, so use a constraint the user added: a unique index on "name".
        db.rows('CREATE UNIQUE INDEX "every_name" ON "every" ("name")')
        bad = null_row(2) | {"name": "SECRET-twice"}
        column = "name"
    with pytest.raises(SinkError) as info:
        t.apply("c", [
            TableChanges("Order Items", ORDER_ITEMS, False, [{"order_id": 1, "Line No": 1}],
                         [{"order_id": 9, "Line No": 9, "Qty": "9.00", 'say "hi"': "z"}]),
            TableChanges("every", EVERY, True, [], [null_row(3) | {"name": "SECRET-twice"}, bad]),
            TableChanges("new table", TAGS, False, [], [{"post_id": 1, "tag": "t"}]),
        ], [progress(2, "17/0", 0)])
    message = str(info.value)
    assert 'table "every"' in message and f'column "{column}"' in message
    assert "SECRET" not in message
    assert info.value.__suppress_context__ and info.value.__cause__ is None
    assert _snapshot(db) == before

    # The table created inside the failed transaction is gone, and gets created again when needed.
    t.apply("c", [TableChanges("new table", TAGS, False, [], [{"post_id": 1, "tag": "t"}])], [])
    assert db.rows('SELECT * FROM "new table"') == [(1, "t")]


def test_value_that_cannot_be_converted_is_refused_before_writing(db):
    t = db.target
    t.ensure_table("Order Items", ORDER_ITEMS)
    t.apply("c", [TableChanges("every", EVERY, False, [], [null_row(1)])], [progress(1)])
    before = _snapshot(db)
    with pytest.raises(SinkError) as info:
        t.apply("c", [
            TableChanges("every", EVERY, True, [], [null_row(2)]),
            TableChanges("Order Items", ORDER_ITEMS, False, [],
                         [{"order_id": 1, "Line No": 1, "Qty": "SECRET-12", 'say "hi"': None}]),
        ], [progress(2)])
    message = str(info.value)
    assert 'table "Order Items"' in message and 'column "Qty"' in message and "numeric" in message
    assert "SECRET" not in message
    assert _snapshot(db) == before


def test_ensure_table_adds_new_columns_and_checks_key(db):
    t = db.target
    v1 = ORDER_ITEMS
    t.apply("c", [TableChanges("Order Items", v1, False, [], [{"order_id": 1, "Line No": 1, "Qty": "1.00", 'say "hi"': "a"}])], [])
    v2 = TableSchema(v1.schema, v1.table, v1.columns + (Column("Note", "text", "text"), Column("at", "date", "date")), v1.key)
    t.ensure_table("Order Items", v2)
    t.apply("c", [TableChanges("Order Items", v2, False, [], [
        {"order_id": 2, "Line No": 1, "Qty": "2.00", 'say "hi"': "b", "Note": "ünïcode", "at": "2026-01-02"},
    ])], [])
    rows = db.rows('SELECT "order_id", "Note", "at" FROM "Order Items" ORDER BY 1')
    at = dt.date(2026, 1, 2) if db.kind == "postgres" else "2026-01-02"
    assert rows == [(1, None, None), (2, "ünïcode", at)]

    # an older schema (fewer columns) still applies: no column is ever dropped
    t.apply("c", [TableChanges("Order Items", v1, False, [], [{"order_id": 3, "Line No": 1, "Qty": "3.00", 'say "hi"': "c"}])], [])
    assert len(db.rows('SELECT * FROM "Order Items"')[0]) == 6

    # a schema whose key column the existing table lacks is refused, naming table and column
    v3 = TableSchema(v1.schema, v1.table, v2.columns + (Column("Batch", "integer", "integer"),), ("order_id", "Batch"))
    with pytest.raises(SinkError, match='table "Order Items".*"Batch"'):
        t.ensure_table("Order Items", v3)
    assert [r[0] for r in db.rows('SELECT "order_id" FROM "Order Items" ORDER BY 1')] == [1, 2, 3]


def test_open_target_urls(tmp_path):
    path = tmp_path / "a" / "b.db"
    with pytest.raises(SinkError, match="cannot open the SQLite target"):  # directories are never created
        open_target(f"sqlite:///{path}")
    assert not path.parent.exists()
    path.parent.mkdir()
    with open_target(f"sqlite:///{path}") as t:  # path from the URL when config did not resolve one
        assert isinstance(t, SqliteTarget)
    assert path.exists()
    with pytest.raises(SinkError) as info:
        open_target("mysql://user:hunter2@host/db")
    assert "hunter2" not in str(info.value)


def test_postgres_scheme_alias(pg_url):
    with open_target(pg_url.replace("postgresql://", "postgres://", 1)) as t:
        assert isinstance(t, PostgresTarget)
        assert t.load_positions("nobody") == {}


# -- one applier per sink, positions of earlier releases, partial rows --------------------------------


def test_commits_do_not_wait_for_the_wal_flush_unless_the_url_asks(pg_url):
    """Rows and positions commit together, so a lost commit is applied again: the session commits
    asynchronously, but a URL that sets synchronous_commit keeps its own setting."""
    own = pg_url + ("&" if "?" in pg_url else "?") + "options=-c%20synchronous_commit%3Dremote_apply"
    for url, expected in [(pg_url, "off"), (own, "remote_apply")]:
        with open_target(url) as target:
            assert target._query("SHOW synchronous_commit") == [(expected,)]


def test_an_apply_with_positions_changed_under_it_writes_nothing(db):
    from cdc.errors import SinkConflictError

    t = db.target
    t.apply("c", [], [progress(5)])
    other = open_target(db.url, sqlite_path=db.sqlite_path)  # a second process of the same sink
    try:
        assert other.load_positions("c")[("shop.orders", 0)].offset == 5
        t.load_positions("c")
        t.apply("c", [TableChanges("Tags", TAGS, False, [], [{"post_id": 1, "tag": "new"}])], [progress(9, seq=9)])
        with pytest.raises(SinkConflictError, match=r"shop.orders\[0\] is no longer the one this process last saw"):
            other.apply("c", [TableChanges("Tags", TAGS, False, [], [{"post_id": 2, "tag": "old"}])], [progress(7, seq=7)])
        # a first position stored meanwhile by another process is not overwritten either
        other.load_positions("c")
        t.apply("c", [], [progress(1, partition=3)])
        with pytest.raises(SinkConflictError):
            other.apply("c", [], [progress(0, partition=3)])
    finally:
        other.close()
    assert db.rows('SELECT "post_id", "tag" FROM "Tags"') == [(1, "new")]
    assert db.rows('SELECT "partition", "kafka_offset" FROM "cdc_sink_positions" ORDER BY 1') == [(0, 9), (3, 1)]


def test_the_lock_is_held_for_the_life_of_the_target(db):
    assert db.target.lock("shop.replica") is None
    other = open_target(db.url, sqlite_path=db.sqlite_path)
    try:
        holder = other.lock("shop.replica")
        assert holder and ("process" in holder)
        assert other.lock("shop.other") is None  # another sink of the same target is independent
    finally:
        other.close()
    db.target.close()
    db.target = open_target(db.url, sqlite_path=db.sqlite_path)
    third = open_target(db.url, sqlite_path=db.sqlite_path)
    try:
        assert third.lock("shop.replica") is None  # released with the first connection
    finally:
        third.close()


def test_a_positions_table_of_the_previous_release_gets_the_origin_columns(db):
    db.target.close()
    old_ddl = ('CREATE TABLE "cdc_sink_positions" ("consumer" text NOT NULL, "topic" text NOT NULL, '
               '"partition" integer NOT NULL, "kafka_offset" bigint NOT NULL, "commit_lsn" text NOT NULL, '
               '"lsn" text NOT NULL, "seq" bigint NOT NULL, "updated_at" text, '
               'PRIMARY KEY ("consumer", "topic", "partition"))')
    insert = "INSERT INTO \"cdc_sink_positions\" VALUES ('c', 'shop.orders', 0, 5, '0/100', '0/80', 0, 'x')"
    if db.kind == "sqlite":
        with closing(sqlite3.connect(db.sqlite_path)) as conn, conn:
            conn.execute('DROP TABLE "cdc_sink_positions"')
            conn.execute(old_ddl)
            conn.execute(insert)
    else:
        with psycopg.connect(db.url, autocommit=True) as conn:
            conn.execute('DROP TABLE "cdc_sink_positions"')
            conn.execute(old_ddl.replace('"updated_at" text', '"updated_at" timestamptz'))
            conn.execute(insert.replace("'x'", "now()"))
    db.target = open_target(db.url, sqlite_path=db.sqlite_path)
    (loaded,) = db.target.load_positions("c").values()
    assert loaded.offset == 5 and loaded.origin is None
    db.target.apply("c", [], [PartitionProgress("shop.orders", 0, 6, Position(0x200, 0x180, 0), ("42", 2))])
    assert db.rows('SELECT "kafka_offset", "system_id", "timeline" FROM "cdc_sink_positions"') == [(6, "42", 2)]


def test_partial_rows_update_present_columns_and_missing_rows_are_counted(db):
    t = db.target
    t.apply("c", [TableChanges("Tags", TAGS, False, [], [{"post_id": 1, "tag": "a"}])], [progress(1)])
    every = [event_row(1), event_row(2)]
    t.apply("c", [TableChanges("every", EVERY, False, [], every)], [progress(2)])
    missing = t.apply("c", [TableChanges("every", EVERY, False, [], [], updates=[
        {"id": 1, "name": "only the name"},
        {"id": 2, "name": "two", "flag": False},
        {"id": 77, "name": "not there"},
    ])], [progress(3)])
    assert missing == {"every": 1}
    got = db.rows('SELECT "id", "name", "flag", "day" FROM "every" ORDER BY 1')
    assert [(r[0], r[1], bool(r[2])) for r in got] == [(1, "only the name", True), (2, "two", False)]
    assert all(r[3] is not None for r in got)  # untouched columns keep their values


# -- schema changes (see also test_schema_changes.py, through a real broker) -----------------------

_ID1 = Column("id", "integer", "integer", nullable=False, attnum=1)


def test_a_column_dropped_and_added_again_under_its_name_is_replaced_not_kept(db):
    t = db.target
    v1 = TableSchema("public", "things", (_ID1, Column("note", "text", "text", attnum=2)), ("id",))
    v2 = TableSchema("public", "things", (_ID1, Column("note", "integer", "integer", attnum=3)), ("id",))
    t.apply("c", [TableChanges("things", v1, False, [], [{"id": 1, "note": "old"}])], [])
    t.apply("c", [TableChanges("things", v2, False, [], [{"id": 2, "note": 5}])], [])
    # the source's rows have no value in the new column: neither has the target's row 1
    assert db.rows('SELECT "id", "note" FROM "things" ORDER BY 1') == [(1, None), (2, 5)]


def test_a_table_of_an_earlier_release_is_adopted_as_it_is(db):
    t = db.target
    v1 = TableSchema("public", "things", (_ID1, Column("note", "text", "text", attnum=2)), ("id",))
    t.apply("c", [TableChanges("things", v1, False, [], [{"id": 1, "note": "a"}])], [])
    t._execute('DELETE FROM "cdc_sink_columns"')  # as an earlier release left it: no record
    t._ready.clear()
    v2 = TableSchema("public", "things", (*v1.columns, Column("qty", "integer", "integer", attnum=3)), ("id",))
    t.apply("c", [TableChanges("things", v2, False, [], [{"id": 2, "note": "b", "qty": 3}])], [])
    assert db.rows('SELECT "id", "note", "qty" FROM "things" ORDER BY 1') == [(1, "a", None), (2, "b", 3)]
    assert sorted(r[0] for r in db.rows('SELECT "column_name" FROM "cdc_sink_columns"')) == ["id", "note", "qty"]


def test_a_key_column_type_change(db):
    t = db.target
    v1 = TableSchema("public", "things", (_ID1, Column("note", "text", "text", attnum=2)), ("id",))
    v2 = TableSchema("public", "things", (Column("id", "text", "text", attnum=1), v1.columns[1]), ("id",))
    t.apply("c", [TableChanges("things", v1, False, [], [{"id": 1, "note": "a"}])], [])
    change = TableChanges("things", v2, False, [], [{"id": "b-2", "note": "b"}], since="t[0]@1 (position 0/2)")
    if db.kind == "postgres":
        t.apply("c", [change], [])
        assert db.rows('SELECT "id", "note" FROM "things" ORDER BY 2') == [("1", "a"), ("b-2", "b")]
    else:  # SQLite cannot rebuild a key column: a named stop, nothing applied
        with pytest.raises(SinkError, match=r'^t\[0\]@1 \(position 0/2\): table "things", column "id" .*from integer to text'):
            t.apply("c", [change], [])
        assert db.rows('SELECT "id", "note" FROM "things"') == [(1, "a")]


def test_events_of_an_older_shape_after_newer_ones_cost_no_values(db):
    """A replay from an earlier position applies older shapes after the target has newer ones."""
    t = db.target
    v1 = TableSchema("public", "things", (_ID1, Column("note", "text", "text", attnum=2)), ("id",))
    v2 = TableSchema("public", "things", (*v1.columns, Column("qty", "integer", "integer", attnum=3)), ("id",))
    t.apply("c", [TableChanges("things", v2, False, [], [{"id": 1, "note": "a", "qty": 1}, {"id": 2, "note": "b", "qty": 2}])], [])
    t.apply("c", [TableChanges("things", v1, False, [], [{"id": 1, "note": "a0"}])], [])  # qty: kept, NULL in row 1
    t.apply("c", [TableChanges("things", v2, False, [], [{"id": 1, "note": "a", "qty": 10}])], [])
    assert db.rows('SELECT "id", "note", "qty" FROM "things" ORDER BY 1') == [(1, "a", 10), (2, "b", 2)]


def test_a_column_retyped_by_hand_is_a_named_stop(db):
    t = db.target
    v1 = TableSchema("public", "things", (_ID1, Column("qty", "integer", "integer", attnum=2)), ("id",))
    t.apply("c", [TableChanges("things", v1, False, [], [{"id": 1, "qty": 1}])], [])
    if db.kind == "postgres":
        t._execute('ALTER TABLE "things" ALTER COLUMN "qty" TYPE text')
    else:
        for sql in t.dialect.alter_type("things", "qty", "TEXT"):
            t._execute(sql)
    t._ready.clear()  # as a new process
    with pytest.raises(SinkError, match='column "qty" has type (text|TEXT) in the target, but the sink created it as'):
        t.apply("c", [TableChanges("things", v1, False, [], [{"id": 2, "qty": 2}])], [])


# -- many rows per table: PostgreSQL stages them (COPY, then one INSERT ... SELECT) ---------------

MANY = PostgresTarget.STAGE_FROM_ROWS + 4  # enough upserts of one table for the staged statement


def _row_texts(db, table: str, key: str) -> dict:
    """Every row as its columns' text, by key: what a reader of the target sees, exactly."""
    if db.kind == "postgres":
        return {k: text for k, text in db.rows(f'SELECT "{key}"::text, t::text FROM "{table}" AS t')}
    return {row[0]: row for row in db.rows(f'SELECT * FROM "{table}"')}


def test_a_batch_of_many_rows_stores_what_single_rows_store(db):
    t = db.target
    varied = [event_row(i, name=f"{UNICODE} {i}", ints=[i, None]) if i % 3 else null_row(i) for i in range(1, MANY + 1)]
    # One row per apply (row by row on every target), then the same rows again as one batch under
    # other keys, then replaced by a second batch: the target holds the same values either way.
    for row in varied:
        t.apply("c", [TableChanges("every", EVERY, False, [], [row])], [])
    t.apply("c", [TableChanges("every", EVERY, False, [], [r | {"id": r["id"] + 1000} for r in varied])], [progress(1)])
    t.apply("c", [TableChanges("every", EVERY, False, [{"id": 1001}], [r | {"id": r["id"] + 1000} for r in varied[1:]])],
            [progress(2)])
    rows = _row_texts(db, "every", "id")
    key = str if db.kind == "postgres" else int
    assert key(1001) not in rows and len(rows) == 2 * MANY - 1
    for i in range(2, MANY + 1):
        single, batched = rows[key(i)], rows[key(i + 1000)]
        if db.kind == "postgres":
            assert batched.replace(f"({i + 1000},", f"({i},", 1) == single
        else:
            assert batched[1:] == single[1:]
    assert t.load_positions("c") == {("shop.orders", 0): progress(2)}


def test_a_bad_value_among_many_rows_rejects_the_batch_as_a_whole(db):
    t = db.target
    t.ensure_table("Order Items", ORDER_ITEMS)
    t.apply("c", [TableChanges("every", EVERY, False, [], [null_row(0) | {"name": "kept"}])], [progress(1)])
    before = _snapshot(db)
    if db.kind == "postgres":
        bad, column = {"day": "SECRET-not-a-date"}, "day"  # PostgreSQL cannot read it as a date
    else:
        db.rows('CREATE UNIQUE INDEX "every_name" ON "every" ("name")')
        bad, column = {"name": "kept"}, "name"  # the index the user added refuses it
    rows = [null_row(i) for i in range(1, MANY)] + [null_row(MANY) | bad]
    with pytest.raises(RowRejectedError) as info:  # the dead-letter bisection halves such a batch
        t.apply("c", [TableChanges("every", EVERY, False, [], rows)], [progress(2)])
    message = str(info.value)
    assert 'table "every"' in message and f'column "{column}"' in message and "SECRET" not in message
    if db.kind == "postgres":
        assert "[SQLSTATE 22" in message
    assert _snapshot(db) == before
    # Without the bad row the same batch goes in, with its positions.
    t.apply("c", [TableChanges("every", EVERY, False, [], rows[:-1])], [progress(2)])
    assert len(db.rows('SELECT "id" FROM "every"')) == MANY


def test_keys_one_to_the_target_but_two_in_the_batch_are_applied_in_order(db):
    # numeric keys 1.0 and 1.00 are two keys in the events and one in a PostgreSQL numeric column
    # (SQLite stores the text: two rows there, as before).
    prices = TableSchema("public", "prices", (Column("p", "numeric", "numeric", nullable=False),
                                              Column("note", "text", "text")), ("p",))
    rows = [{"p": "1.0", "note": "first"}, {"p": "1.00", "note": "second"}]
    rows += [{"p": str(i), "note": f"n{i}"} for i in range(2, MANY)]
    db.target.apply("c", [TableChanges("prices", prices, False, [], rows)], [progress(1)])
    got = dict(db.rows('SELECT CAST("p" AS text), "note" FROM "prices"'))
    if db.kind == "postgres":
        assert got["1.0"] == "second" and len(got) == MANY - 1  # the later row wins, as row by row
    else:
        assert got["1.0"] == "first" and got["1.00"] == "second" and len(got) == MANY
    assert db.target.load_positions("c") == {("shop.orders", 0): progress(1)}


def test_a_role_that_may_not_create_temporary_tables_applies_many_rows_row_by_row(pg_url, caplog):
    from urllib.parse import urlsplit

    role = f"cdc_no_temp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        database = conn.info.dbname
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'secret'")
        conn.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
        conn.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
    parts = urlsplit(pg_url)
    url = parts._replace(netloc=f"{role}:secret@{parts.hostname}:{parts.port or 5432}").geturl()
    try:
        with open_target(url) as t:
            for batch in range(2):  # the second batch does not try again
                rows = [{"post_id": batch * 100 + i, "tag": "t"} for i in range(MANY)]
                t.apply("c", [TableChanges("tags", TAGS, False, [], rows)], [progress(batch + 1)])
            assert t.load_positions("c") == {("shop.orders", 0): progress(2)}
        with psycopg.connect(pg_url) as conn:
            assert conn.execute('SELECT count(*) FROM "tags"').fetchone() == (2 * MANY,)
        warnings = [r for r in caplog.records if "may not create temporary tables" in r.getMessage()]
        assert len(warnings) == 1 and "secret" not in warnings[0].getMessage()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
