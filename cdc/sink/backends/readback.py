"""Reading a key range of a target table back into the published JSON form of its rows (for
`cdc verify`): the inverse of cdc.sink.values, one reader per backend.

PostgreSQL: every column is read as the text its type prints, with the walsender's session
settings (DateStyle ISO, TimeZone UTC, extra_float_digits 3, bytea hex), and converted with the
connector's own converters (cdc.source.postgres.values): a target column of the source's type gives
back exactly what the connector published. SQLite: each kind's stored form turned back (integers,
booleans 0/1, numeric text, bytea blobs to base64, json text, arrays as JSON text).

Ranges: ``lo`` exclusive, ``hi`` inclusive, as key values in the published form (None: open); the
bounds are bound with the same converters the sink writes with, so the database compares keys.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson

from cdc.events.codec import _array_item_texts, loads
from cdc.events.schema import Column, TableSchema
from cdc.sink.backends.base import Target
# The connector's own forms of big integers and non-finite floats: read back, values take them again.
from cdc.source.postgres.catalog import TypeDescription
from cdc.source.postgres.values import ValueDecoder, _bigint, _float

ReadBack = Callable[[Any], Any]


def read_range(target: Target, table: str, schema: TableSchema, lo: list[Any] | None,
               hi: list[Any] | None) -> list[dict[str, Any]]:
    """The target's rows of `table` whose key is in (lo, hi], in the published form of `schema`."""
    if target._existing_columns(table) is None:  # nothing applied yet: an empty table
        return []
    dialect = target.dialect
    plan = target._plan(table, schema)  # the columns and converters the sink writes with
    columns = [schema.column(name) for name in plan.columns]
    keys = [plan.columns[i] for i in plan.key_index]
    key_converters = [plan.converters[i] for i in plan.key_index]
    key_sql = ", ".join(dialect.quote(k) for k in keys)
    conditions, params = [], []
    for bound, op in ((lo, ">"), (hi, "<=")):
        if bound is not None:
            marks = ", ".join(dialect.placeholder for _ in bound)
            conditions.append(f"({key_sql}) {op} ({marks})" if len(keys) > 1 else f"{key_sql} {op} {marks}")
            params.extend(convert(v) for convert, v in zip(key_converters, bound))
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    if dialect.name == "postgres":
        selected = ", ".join(dialect.quote(c.name) for c in columns)
        with target._transaction():
            for setting in _PG_SETTINGS:
                target._execute(setting)
            raw_rows = _pg_output_texts(target, f"SELECT {selected} FROM {dialect.quote(table)}{where}", params)
            readers = [_postgres_reader(target, dialect.column_type(c), c) for c in columns]
    else:
        selected = ", ".join(dialect.quote(c.name) for c in columns)
        raw_rows = target._query(f"SELECT {selected} FROM {dialect.quote(table)}{where}", tuple(params))
        readers = [sqlite_reader(c) for c in columns]
    return [{c.name: (None if v is None else read(v)) for c, read, v in zip(columns, readers, row)} for row in raw_rows]


# -- PostgreSQL -------------------------------------------------------------------------------------

_PG_SETTINGS = ("SET LOCAL DateStyle = ISO, YMD", "SET LOCAL IntervalStyle = iso_8601", "SET LOCAL TimeZone = UTC",
                "SET LOCAL extra_float_digits = 3", "SET LOCAL bytea_output = hex")
def _pg_output_texts(target: Target, sql: str, params: list[Any]) -> list[list[bytes | None]]:
    """Each value as its type's output function prints it (what pgoutput sends), not as psycopg
    loads it and not through a cast to text (boolean::text is "true", character(n)::text trims)."""
    with target._conn.cursor() as cur:  # type: ignore[attr-defined]
        cur.execute(sql, params)
        result = cur.pgresult
        assert result is not None
        return [[result.get_value(r, c) for c in range(result.nfields)] for r in range(result.ntuples)]


_pg_readers: dict[tuple[int, str, Column], ReadBack] = {}


def _postgres_reader(target: Target, target_type: str, column: Column) -> ReadBack:
    cache_key = (id(target), target_type, column)
    reader = _pg_readers.get(cache_key)
    if reader is None:
        (oid,) = target._query("SELECT %s::regtype::oid", (target_type,))[0]
        kind = column.kind if column.builtin else "text"
        desc = TypeDescription(target_type, kind, column.array, column.builtin, int(oid),
                               ";" if target_type.startswith("box[") else ",")
        reader = _pg_readers[cache_key] = ValueDecoder(target._conn).converter(desc)  # type: ignore[attr-defined]
    return reader


# -- SQLite -----------------------------------------------------------------------------------------


def _sqlite_scalar(kind: str) -> ReadBack:
    if kind == "boolean":
        return bool
    if kind in ("smallint", "integer"):
        return int
    if kind == "bigint":
        return lambda v: _bigint(int(v))
    if kind in ("real", "double"):
        return _float
    if kind == "bytea":
        return lambda v: base64.b64encode(v).decode("ascii")
    if kind in ("json", "jsonb"):
        return lambda v: orjson.Fragment(v)
    return lambda v: v  # numeric and every string kind are stored as the text published


def _sqlite_element(kind: str) -> ReadBack:
    if kind in ("real", "double"):  # the array's JSON text is read with exact numbers (Decimal)
        return lambda v: v if isinstance(v, str) else _float(float(v))
    if kind == "bigint":
        return lambda v: _bigint(int(v))
    if kind == "numeric":
        return lambda v: v
    return lambda v: v


def sqlite_reader(column: Column) -> ReadBack:
    """What the SQLite dialect stored for a column -> the published JSON value."""
    if not column.array:
        return _sqlite_scalar(column.kind)
    if column.kind in ("json", "jsonb"):  # each element's text as stored (the sink wrote them verbatim)
        return lambda text: [None if v is None else orjson.Fragment(str(v)) for v in _array_item_texts(text, text.index("["))]
    element = _sqlite_element(column.kind)
    nested = column.kind not in ("json", "jsonb")

    def walk(items: list) -> list:
        return [None if v is None else walk(v) if nested and isinstance(v, list) else element(v) for v in items]

    return lambda text: walk(loads(text))
