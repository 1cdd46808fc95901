"""The compiled event reader (cdc._native.EventReader) against cdc.events.codec's Python readers, on the
records the connector makes of what PostgreSQL really sends (the changes of test_native_differential:
every type of the types table and its array, escapes, non-ASCII, NULLs, an unchanged TOASTed value,
key changes, the bench's orders): each record value read with the table's json columns and without,
both ways must give the same event and position, type for type, also as a sink reads them (without
source and ts_ms). On PostgreSQL 15 and 18."""

from __future__ import annotations

from json.encoder import encode_basestring

import orjson
import psycopg
import pytest

from cdc import native
from cdc.source.postgres.replication import SESSION_OPTIONS
from tests.integration.test_native_differential import records, written_changes
from tests.unit.test_event_reader import compiled, python_reading, typed

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(native.built is None, reason=f"the compiled core is not built: {native.describe()}")]

JSON_COLUMNS = """
    SELECT c.relname, a.attname, t.typname IN ('json', 'jsonb'), coalesce(e.typname IN ('json', 'jsonb'), false)
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
    WHERE c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped"""


def test_compiled_and_python_readers_read_the_connectors_records_alike(source_db):
    with psycopg.connect(source_db, autocommit=True, options=SESSION_OPTIONS) as conn:
        tables, payloads = written_changes(conn, "reader_diff")
        values = [value for _, value in records(conn, payloads)[0]]
        json_columns = {}  # table -> cdc.events.codec.JsonColumns, as the sink reads them from the schema
        for table, column, scalar, array in conn.execute(JSON_COLUMNS, (tables,)).fetchall():
            scalars, arrays = json_columns.get(table, (frozenset(), frozenset()))[:2]
            scalars, arrays = scalars | ({column} if scalar else set()), arrays | ({column} if array else set())
            json_columns[table] = (scalars, arrays, tuple((n, encode_basestring(n)) for n in sorted(scalars | arrays)))

    assert len(values) > 2000 and all(json_columns[t][0] for t in ("everything", "orders"))
    read_compiled = 0
    for value in values:
        table = orjson.loads(value)["source"]["table"]
        for columns in (json_columns.get(table), None):
            for lean in (False, True):  # as any reader reads them, and as a sink does (without source, ts_ms)
                got, expected = compiled(value, columns, lean), python_reading(value, columns, lean)
                assert isinstance(expected, tuple), expected  # every record the connector makes is an event
                if got is not None:
                    assert typed(got) == typed(expected), value
                    read_compiled += 1
                else:
                    assert table == "everything", value  # only odd values step aside (json text with lone surrogates)
    assert read_compiled >= 4 * len(values) - 40
