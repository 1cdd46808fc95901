"""PostgreSQL values -> event JSON, through the text PostgreSQL prints and the connector's ValueDecoder,
on both source servers (PostgreSQL 15 and 18)."""

from __future__ import annotations

import json
from decimal import Decimal

import orjson
import psycopg
import pytest

from cdc.source.postgres.catalog import Catalog
from cdc.source.postgres.replication import SESSION_OPTIONS
from cdc.source.postgres.values import ValueDecoder
from tests.integration.types_cases import CASES, SETUP, has_libxml


@pytest.fixture(scope="module")
def conn(source_cluster):
    from tests.conftest import _drop_database, _fresh_database

    admin = source_cluster.dsn()
    name, dsn = _fresh_database(admin, "cdc_values")
    with psycopg.connect(dsn, autocommit=True, options=SESSION_OPTIONS, prepare_threshold=None) as c:
        c.execute(SETUP)
        yield c
    _drop_database(admin, name)


def _column(conn: psycopg.Connection, pg_type: str, literal: str) -> tuple[int, int, str]:
    """A column of the type, as a Relation message describes it (type OID and modifier), and the text
    PostgreSQL prints for the literal (what pgoutput sends)."""
    conn.execute("DROP TABLE IF EXISTS probe")
    conn.execute(f"CREATE TABLE probe (v {pg_type})")
    conn.execute(f"INSERT INTO probe VALUES ({literal})")
    oid, typmod = conn.execute(
        "SELECT atttypid, atttypmod FROM pg_attribute WHERE attrelid = 'probe'::regclass AND attname = 'v'"
    ).fetchone()
    # format() prints with the type's output function, as pgoutput does (a ::text cast prints "true", not "t").
    (text,) = conn.execute("SELECT format('%s', v) FROM probe").fetchone()
    return oid, typmod, text


@pytest.mark.parametrize("pg_type, literal, expected, kind", CASES, ids=[f"{c[0]}:{c[1][:20]}" for c in CASES])
def test_value_reaches_json_exactly(conn, pg_type, literal, expected, kind):
    if pg_type.startswith("xml") and not has_libxml(conn):
        with pytest.raises(psycopg.errors.FeatureNotSupported):  # no xml value can exist on this server
            _column(conn, pg_type, literal)
        return
    oid, typmod, text = _column(conn, pg_type, literal)
    desc = Catalog(conn).describe_type(oid, typmod)
    assert desc.kind == kind
    assert desc.array == pg_type.endswith("[]") or pg_type == "int_list"
    value = ValueDecoder(conn).converter(desc)(text.encode())
    # Read back the way a sink does: exact decimals inside json values.
    assert json.loads(orjson.dumps(value), parse_float=Decimal) == expected


def test_type_descriptions_keep_modifiers_and_mark_user_types(conn):
    catalog = Catalog(conn)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS described (n numeric(30,10), v varchar(50), m mood, d positive_int, a mood[],"
        " p pair, c citext, b box[], iv int2vector, l int_list)"
    )
    rows = conn.execute(
        "SELECT attname, atttypid, atttypmod FROM pg_attribute WHERE attrelid = 'described'::regclass AND attnum > 0 ORDER BY attnum"
    ).fetchall()
    got = {name: catalog.describe_type(oid, mod) for name, oid, mod in rows}
    assert (got["n"].type, got["n"].kind, got["n"].builtin) == ("numeric(30,10)", "numeric", True)
    assert (got["v"].type, got["v"].kind) == ("character varying(50)", "text")
    assert (got["m"].kind, got["m"].builtin) == ("text", False)
    assert (got["d"].type, got["d"].kind, got["d"].builtin) == ("integer", "integer", True)  # domain -> its base
    assert (got["a"].array, got["a"].kind, got["a"].builtin) == (True, "text", False)
    assert (got["p"].kind, got["p"].builtin, got["c"].builtin) == ("text", False, False)
    assert (got["b"].type, got["b"].array, got["b"].delimiter) == ("box[]", True, ";")
    assert (got["iv"].type, got["iv"].array, got["iv"].kind) == ("int2vector", False, "text")
    assert (got["l"].type, got["l"].array, got["l"].kind) == ("integer[]", True, "integer")


def test_added_column_default_is_what_old_rows_read(conn):
    """ADD COLUMN ... DEFAULT writes no WAL: the catalog's missing value is what older rows hold."""
    conn.execute("DROP TABLE IF EXISTS widened")
    conn.execute("CREATE TABLE widened (id int PRIMARY KEY)")
    conn.execute("INSERT INTO widened VALUES (1)")
    conn.execute(
        "ALTER TABLE widened ADD COLUMN price numeric(20,8) DEFAULT 0, ADD COLUMN tags text[] DEFAULT '{a,\"b c\"}',"
        " ADD COLUMN b box DEFAULT '((1,1),(0,0))', ADD COLUMN plain text"
    )
    conn.execute("ALTER TABLE widened ADD COLUMN at timestamptz DEFAULT '2026-01-01 00:00+01'")
    oid = conn.execute("SELECT 'widened'::regclass::oid").fetchone()[0]
    assert Catalog(conn).missing_values(oid) == {
        "price": "0.00000000", "tags": '{a,"b c"}', "b": "(1,1),(0,0)", "at": "2025-12-31 23:00:00+00",
    }
    # A volatile default rewrites the table: every row then holds its own value, none is "missing".
    conn.execute("ALTER TABLE widened ADD COLUMN r float8 DEFAULT random()")
    assert Catalog(conn).missing_values(oid) == {}


def test_timestamptz_and_date_are_each_instant_in_iso_8601(conn):
    """The converters read the text PostgreSQL prints without a datetime where they can (the fast path):
    over random instants of the whole range and the edges of the fraction, each value is what the
    instant's datetime prints, and what no datetime holds stays as PostgreSQL printed it."""
    rows = conn.execute(
        """SELECT v, v::text, v::date, v::date::text FROM (
               SELECT timestamptz '0001-01-01 00:00:00+00'
                      + random() * (timestamptz '9999-12-31 23:59:59.999999+00' - timestamptz '0001-01-01 00:00:00+00')
               FROM generate_series(1, 3000)
               UNION ALL SELECT timestamptz '2000-01-01 00:00:00+00' + n * interval '1 microsecond'
               FROM unnest(ARRAY[0, 1, 10, 100000, 120000, 999999, 1000000, 86399999999]) n
               UNION ALL SELECT timestamptz '9999-12-31 23:59:59.999999+00'
           ) s(v)"""
    ).fetchall()
    decoder, catalog = ValueDecoder(conn), Catalog(conn)
    timestamptz, date = (decoder.converter(catalog.describe_type(oid, -1)) for oid in (1184, 1082))
    for instant, text, day, day_text in rows:
        assert timestamptz(text.encode()) == instant.replace(tzinfo=None).isoformat() + "Z", text
        assert date(day_text.encode()) == day.isoformat(), day_text
    for text in ("infinity", "-infinity", "0044-03-15 12:00:00+00 BC", "10000-01-01 00:00:00+00"):
        assert timestamptz(text.encode()) == text
    assert date(b"0044-03-15 BC") == "0044-03-15 BC"
