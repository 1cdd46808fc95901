"""Defaults of added columns: carried in the cdc.schema header, applied by ADD COLUMN ... DEFAULT."""

from __future__ import annotations

import base64
import math
import sqlite3
from decimal import Decimal

import orjson
import pytest

from cdc.errors import SinkError
from cdc.events.schema import Column, TableSchema
from cdc.sink.backends import PostgresDialect, SqliteDialect

PG = PostgresDialect()
LITE = SqliteDialect()


def _header_round_trip(*columns: Column) -> TableSchema:
    schema = TableSchema("public", "t", (Column("id", "integer", "integer", nullable=False), *columns), ("id",))
    return TableSchema.from_json(schema.to_json())


def test_header_carries_defaults_exactly_and_only_when_present():
    doc = orjson.Fragment(b'{"n": 12345678901234567890.123456789}')  # how the connector embeds json
    schema = _header_round_trip(
        Column("price", "numeric(20,8)", "numeric", default="0.00000000"),
        Column("tags", "text[]", "text", array=True, default=["a", None]),
        Column("doc", "jsonb", "jsonb", default=doc),
        Column("plain", "text", "text"),
    )
    assert schema.column("price").default == "0.00000000"
    assert schema.column("tags").default == ["a", None]
    assert schema.column("doc").default == {"n": Decimal("12345678901234567890.123456789")}
    assert schema.column("plain").default is None
    assert b'"default"' not in TableSchema("s", "t", (Column("a", "text", "text"),), ("a",)).to_json()


def test_schema_with_a_list_default_can_key_a_plan_cache():
    schema = _header_round_trip(Column("tags", "text[]", "text", array=True, default=["a"]))
    assert {schema: 1}[_header_round_trip(Column("tags", "text[]", "text", array=True, default=["a"]))] == 1
    assert schema != _header_round_trip(Column("tags", "text[]", "text", array=True, default=["b"]))


@pytest.mark.parametrize(
    "column, postgres, sqlite",
    [
        (Column("note", "text", "text", default="it's 100%"), """DEFAULT 'it''s 100%%'""", """DEFAULT 'it''s 100%'"""),
        (Column("price", "numeric(20,8)", "numeric", default="0.00000001"), "DEFAULT '0.00000001'", "DEFAULT '0.00000001'"),
        (Column("n", "bigint", "bigint", default="9223372036854775807"), "DEFAULT '9223372036854775807'",
         "DEFAULT 9223372036854775807"),
        (Column("on", "boolean", "boolean", default=True), "DEFAULT 'true'", "DEFAULT 1"),
        (Column("r", "double precision", "double", default="-Infinity"), "DEFAULT '-Infinity'", "DEFAULT -9e999"),
        (Column("r", "real", "real", default="NaN"), "DEFAULT 'NaN'", "DEFAULT NULL"),
        (Column("b", "bytea", "bytea", default=base64.b64encode(b"\x00\xff").decode()), "DEFAULT '\\x00ff'",
         "DEFAULT X'00ff'"),
        (Column("xs", "integer[]", "integer", array=True, default=[1, None]), """DEFAULT '{"1",NULL}'""",
         "DEFAULT '[1,null]'"),
        (Column("bx", "box[]", "text", array=True, default=["(1,1),(0,0)", "(3,3),(2,2)"]),
         """DEFAULT '{"(1,1),(0,0)";"(3,3),(2,2)"}'""", """DEFAULT '["(1,1),(0,0)","(3,3),(2,2)"]'"""),
        (Column("m", "mood", "text", builtin=False, default="happy"), "DEFAULT 'happy'", "DEFAULT 'happy'"),
        (Column("plain", "text", "text"), None, None),
    ],
    ids=lambda v: v.name if isinstance(v, Column) else None,
)
def test_add_column_carries_the_default_as_a_literal(column, postgres, sqlite):
    for dialect, expected in ((PG, postgres), (LITE, sqlite)):
        ddl = dialect.add_column("t", column)
        if expected is None:
            assert " DEFAULT " not in ddl
        else:
            assert ddl.endswith(" " + expected), ddl


def test_sqlite_rows_already_there_get_the_default():
    conn = sqlite3.connect(":memory:")
    schema = TableSchema("public", "t", (Column("id", "integer", "integer", nullable=False),), ("id",))
    conn.execute(LITE.create_table("t", schema))
    conn.execute("INSERT INTO t VALUES (1)")
    for column in (
        Column("note", "text", "text", default="it's"),
        Column("r", "double precision", "double", default="Infinity"),
        Column("b", "bytea", "bytea", default=base64.b64encode(b"\x00\xff").decode()),
        Column("xs", "bigint[]", "bigint", array=True, default=["9223372036854775807"]),
    ):
        conn.execute(LITE.add_column("t", column))
    assert conn.execute("SELECT note, r, b, xs FROM t").fetchone() == ("it's", math.inf, b"\x00\xff", "[9223372036854775807]")


def test_a_default_that_does_not_fit_its_column_names_table_and_column():
    with pytest.raises(SinkError) as err:
        PG.add_column("t", Column("n", "integer", "integer", default="secret-value"))
    assert str(err.value).startswith('table "t", column "n"') and "secret-value" not in str(err.value)
