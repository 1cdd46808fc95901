"""PostgreSQL values -> event JSON, through the same text the walsender sends and psycopg's loaders."""

from __future__ import annotations

import base64
import json
from decimal import Decimal

import orjson
import psycopg
import pytest

from cdc.source.postgres.catalog import Catalog
from cdc.source.postgres.replication import SESSION_OPTIONS
from cdc.source.postgres.values import ValueDecoder

CASES = [
    # (type, SQL literal, expected JSON form, expected kind)
    ("boolean", "true", True, "boolean"),
    ("smallint", "'-32768'", -32768, "smallint"),
    ("integer", "2147483647", 2147483647, "integer"),
    ("bigint", "9007199254740992", 9007199254740992, "bigint"),
    ("bigint", "9007199254740993", "9007199254740993", "bigint"),
    ("bigint", "'-9223372036854775808'", "-9223372036854775808", "bigint"),
    ("numeric(40,20)", "12345678901234567890.12345678901234567890", "12345678901234567890.12345678901234567890", "numeric"),
    ("numeric", "'NaN'", "NaN", "numeric"),
    ("numeric(6,2)", "1.5", "1.50", "numeric"),
    ("real", "0.1", Decimal("0.1"), "real"),
    ("double precision", "'-Infinity'", "-Infinity", "double"),
    ("double precision", "0.1", Decimal("0.1"), "double"),
    ("text", "E'Zoë \\u00e9 🚀 \"q\"'", 'Zoë é 🚀 "q"', "text"),
    ("character varying(5)", "'abc'", "abc", "text"),
    ("bytea", "'\\x00ff10'", base64.b64encode(b"\x00\xff\x10").decode(), "bytea"),
    ("date", "'2026-11-26'", "2026-11-26", "date"),
    ("date", "'infinity'", "infinity", "date"),
    ("time without time zone", "'20:19:10.5'", "20:19:10.500000", "time"),
    ("time with time zone", "'20:19:10+02'", "20:19:10+02:00", "timetz"),
    ("timestamp without time zone", "'2026-11-26 20:19:10.994151'", "2026-11-26T20:19:10.994151", "timestamp"),
    ("timestamp with time zone", "'2026-11-26 22:19:10.994151+02'", "2026-11-26T20:19:10.994151Z", "timestamptz"),
    ("timestamp with time zone", "'-infinity'", "-infinity", "timestamptz"),
    ("interval", "'1 year 2 months 3 days 04:05:06.5'", "P1Y2M3DT4H5M6.5S", "interval"),
    ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "uuid"),
    ("jsonb", """'{"n": 12345678901234567890.123456789, "a": [1, null]}'""",
     {"a": [1, None], "n": Decimal("12345678901234567890.123456789")}, "jsonb"),
    ("json", """'{"b":  1.10}'""", {"b": Decimal("1.10")}, "json"),
    ("integer[]", "'{{1,2},{3,NULL}}'", [[1, 2], [3, None]], "integer"),
    ("text[]", """ARRAY['a', 'b,c', NULL, 'd"e']""", ["a", "b,c", None, 'd"e'], "text"),
    ("numeric[]", "'{1.10,NaN}'", ["1.10", "NaN"], "numeric"),
    ("bigint[]", "'{1,9223372036854775807}'", [1, "9223372036854775807"], "bigint"),
    ("timestamp with time zone[]", "ARRAY['2026-01-01 00:00:00+01'::timestamptz]", ["2025-12-31T23:00:00Z"], "timestamptz"),
    ("interval[]", "ARRAY['1 mon'::interval]", ["P1M"], "interval"),
    ("jsonb[]", """ARRAY['{"x": 1.5}'::jsonb]""", [{"x": Decimal("1.5")}], "jsonb"),
    ("mood", "'happy'", "happy", "text"),
    ("mood[]", "'{happy,sad}'", ["happy", "sad"], "text"),
    ("positive_int", "7", 7, "integer"),
]


@pytest.fixture(scope="module")
def conn(request):
    from tests.conftest import TARGET_DSN, _drop_database, _fresh_database

    name, dsn = _fresh_database(TARGET_DSN, "cdc_values")
    request.addfinalizer(lambda: _drop_database(TARGET_DSN, name))
    with psycopg.connect(dsn, autocommit=True, options=SESSION_OPTIONS) as c:
        c.execute("CREATE TYPE mood AS ENUM ('happy', 'sad'); CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0)")
        yield c


@pytest.mark.parametrize("pg_type, literal, expected, kind", CASES, ids=[f"{c[0]}:{c[1][:20]}" for c in CASES])
def test_value_reaches_json_exactly(conn, pg_type, literal, expected, kind):
    catalog = Catalog(conn)
    # A column of the type, as a Relation message describes it: type OID and modifier.
    conn.execute("DROP TABLE IF EXISTS probe")
    conn.execute(f"CREATE TABLE probe (v {pg_type})")
    conn.execute(f"INSERT INTO probe VALUES ({literal})")
    oid, typmod = conn.execute(
        "SELECT atttypid, atttypmod FROM pg_attribute WHERE attrelid = 'probe'::regclass AND attname = 'v'"
    ).fetchone()
    (text,) = conn.execute("SELECT v::text FROM probe").fetchone()
    desc = catalog.describe_type(oid, typmod)
    assert desc.kind == kind
    value = ValueDecoder(conn).converter(desc)(text.encode())
    # Read back the way a sink does: exact decimals inside json values.
    assert json.loads(orjson.dumps(value), parse_float=Decimal) == expected


def test_type_descriptions_keep_modifiers_and_mark_user_types(conn):
    catalog = Catalog(conn)
    conn.execute("CREATE TABLE IF NOT EXISTS described (n numeric(30,10), v varchar(50), m mood, d positive_int, a mood[])")
    rows = conn.execute(
        "SELECT attname, atttypid, atttypmod FROM pg_attribute WHERE attrelid = 'described'::regclass AND attnum > 0 ORDER BY attnum"
    ).fetchall()
    got = {name: catalog.describe_type(oid, mod) for name, oid, mod in rows}
    assert (got["n"].type, got["n"].kind, got["n"].builtin) == ("numeric(30,10)", "numeric", True)
    assert (got["v"].type, got["v"].kind) == ("character varying(50)", "text")
    assert (got["m"].kind, got["m"].builtin) == ("text", False)
    assert (got["d"].type, got["d"].kind, got["d"].builtin) == ("integer", "integer", True)  # domain -> its base
    assert (got["a"].array, got["a"].kind, got["a"].builtin) == (True, "text", False)
