"""SQLite target dialect.

Column types
============

SQLite has five storage classes; each source kind gets the nearest column affinity that keeps every
value exactly:

======================================  ===============  =============================================
source kind                             SQLite column    stored value
======================================  ===============  =============================================
boolean                                 INTEGER          0 / 1
smallint, integer, bigint               INTEGER          64-bit integer
real, double                            REAL             8-byte float; NaN is stored as NULL (SQLite
                                                         has no NaN), +-Infinity as +-Inf
numeric                                 TEXT             the exact decimal text, as PostgreSQL printed
                                                         it ("12.50", "NaN"): NUMERIC or REAL
                                                         affinity would round beyond 15 digits
bytea                                   BLOB             the bytes
date, time, timetz, timestamp,          TEXT             the ISO-8601 text of the event
timestamptz, interval                                    ("2026-11-26T20:19:10.994151Z", "P1Y2M3D")
uuid, text, enums and other types       TEXT             the string
json, jsonb                             TEXT             the JSON text as the source sent it: json
                                                         byte for byte, jsonb as PostgreSQL prints it
any array                               TEXT             JSON text of the list (nested per dimension);
                                                         elements as in the event, except bigint
                                                         elements, always JSON numbers
======================================  ===============  =============================================

Key columns are ``NOT NULL`` and form the ``PRIMARY KEY``. A column added later gets ``DEFAULT`` the
source's value for older rows (``Column.default``) as a constant, stored as above. SQLite folds identifier case (ASCII), so
two source columns that differ only in case cannot share one SQLite table.

Type changes: SQLite cannot retype a column, and mostly need not. A source type change that keeps
the affinity (int -> bigint, varchar(n) -> text, numeric(10,2) -> numeric(14,4)) changes nothing
in the table; stored values stay as written (a numeric keeps the text the source printed then).
INTEGER -> TEXT rebuilds the column (see :meth:`SqliteDialect.alter_type`); any other change of
affinity stops the sink (see :meth:`SqliteDialect.widens`).
"""

from __future__ import annotations

import math
from typing import Any

from sqlglot import exp

from cdc.events.schema import Column
from cdc.sink.dialects.base import POSITIONS_TABLE, Dialect
from cdc.sink.values import Converter, sqlite_converter

_AFFINITY = {
    "boolean": "integer", "smallint": "integer", "integer": "integer", "bigint": "integer",
    "real": "real", "double": "real",
    "bytea": "blob",
}  # every other kind, and every array, is TEXT

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"  # UTC, ISO-8601 with milliseconds


class SqliteDialect(Dialect):
    name = "sqlite"
    placeholder = "?"
    alters_key_types = False  # the rebuild in alter_type drops the column, which SQLite refuses for a key

    def column_type(self, column: Column) -> str:
        affinity = "text" if column.array else _AFFINITY.get(column.kind, "text")
        return exp.DataType.build(affinity).sql(dialect=self.name)

    def converter(self, column: Column) -> Converter:
        return sqlite_converter(column)

    def literal(self, value: Any) -> str:
        # SQLite's ADD COLUMN takes a constant default: the parameter the converter made, as a literal.
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "NULL"  # NaN binds as NULL too
        if isinstance(value, float) and math.isinf(value):
            return "9e999" if value > 0 else "-9e999"  # SQLite reads these as +-Inf
        if isinstance(value, bytes):
            return f"X'{value.hex()}'"
        if isinstance(value, str):
            return exp.Literal.string(value).sql(dialect=self.name)
        return repr(value) if isinstance(value, float) else str(int(value))

    def widens(self, old_type: str, new_type: str) -> bool:
        # The same affinity holds the new values as it held the old ones (int -> bigint, varchar ->
        # text, numeric(10,2) -> numeric(14,4) are all the same affinity: nothing to do). INTEGER ->
        # TEXT: the integers' decimal text is what the source now sends for them.
        return self.same_type(old_type, new_type) or (old_type.upper(), new_type.upper()) == ("INTEGER", "TEXT")

    def alter_type(self, table: str, column: str, new_type: str) -> list[str]:
        # SQLite cannot retype a column: add one of the new type, copy the values over, drop the old
        # one and take its name (the column moves to the end of the table). Never a key column:
        # key types keep their affinity (integer kinds stay INTEGER).
        t, c, tmp = self.quote(table), self.quote(column), self.quote(f"{column} (cdc retype)")
        return [
            f"ALTER TABLE {t} ADD COLUMN {tmp} {new_type}",
            f"UPDATE {t} SET {tmp} = CAST({c} AS {new_type})",
            f"ALTER TABLE {t} DROP COLUMN {c}",
            f"ALTER TABLE {t} RENAME COLUMN {tmp} TO {c}",
        ]

    def truncate(self, table: str) -> str:
        return f"DELETE FROM {self.quote(table)}"  # SQLite has no TRUNCATE (this is its fast path)

    def added_column_type(self, name: str) -> str:
        return "TEXT" if name == "system_id" else "INTEGER"

    def create_positions(self) -> str:
        q = self.quote
        return (
            f"CREATE TABLE IF NOT EXISTS {q(POSITIONS_TABLE)} (\n"
            f"  {q('consumer')} TEXT NOT NULL,\n"
            f"  {q('topic')} TEXT NOT NULL,\n"
            f"  {q('partition')} INTEGER NOT NULL,\n"
            f"  {q('kafka_offset')} INTEGER NOT NULL,\n"
            f"  {q('commit_lsn')} TEXT NOT NULL,\n"
            f"  {q('lsn')} TEXT NOT NULL,\n"
            f"  {q('seq')} INTEGER NOT NULL,\n"
            f"  {q('system_id')} {self.added_column_type('system_id')},\n"
            f"  {q('timeline')} {self.added_column_type('timeline')},\n"
            f"  {q('commit_events')} {self.added_column_type('commit_events')},\n"
            f"  {q('skipped_offset')} {self.added_column_type('skipped_offset')},\n"
            f"  {q('updated_at')} TEXT NOT NULL DEFAULT ({_NOW}),\n"
            f"  PRIMARY KEY ({q('consumer')}, {q('topic')}, {q('partition')})\n"
            ")"
        )
