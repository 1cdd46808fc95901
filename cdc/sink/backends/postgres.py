"""PostgreSQL target dialect.

Column types
============

A PostgreSQL target keeps the source types wherever every PostgreSQL has them:

==========================================  ===================================================
source column                               target column
==========================================  ===================================================
built-in type (``Column.builtin``)          the same type, verbatim as ``format_type()`` prints
                                            it: ``numeric(30,10)``, ``character varying(50)``,
                                            ``timestamp with time zone``, ``integer[]``...
enum, domain, extension or other user type  ``text`` (``text[]`` for arrays), holding the value's
                                            text as the event carries it
==========================================  ===================================================

Key columns are ``NOT NULL`` and form the ``PRIMARY KEY``; every other column is nullable. A column
added later gets ``DEFAULT`` the source's value for older rows (``Column.default``), as a string
literal that the column type's input function reads, like the bound values below. A source type
change alters the column (``USING col::new``) when every old value is a value of the new type
(:func:`cdc.events.schema.keeps_values`); otherwise the source rewrote the values, its connector
re-reads the table, and the column is rewritten (``USING NULL``, then the ``r`` events fill it);
a key column stops the sink.

Values
======

Values are bound with psycopg 3 (see :func:`cdc.sink.values.postgres_converter`). Strings are sent
with the *unknown* type, so PostgreSQL parses them with the column type's own input function:

* dates, times, timestamps, intervals, uuids and every type without a kind of its own (inet,
  ranges, geometry, money...): the event string as is (ISO-8601 forms, ``infinity``, PostgreSQL's text);
* json / jsonb: the value's text as the source sent it (a ``json`` value byte for byte, with its
  duplicate keys, key order and whitespace; a ``jsonb`` value as PostgreSQL prints it);
* real / double: decimal text (``"NaN"``, ``"Infinity"`` too), read straight into the column type;
* arrays: a PostgreSQL array literal (``{"1","2",NULL}``) built from the JSON list, so element
  types never depend on how a driver guesses a Python list's type. Nested lists are dimensions,
  except for json/jsonb arrays, which are one-dimensional (a list element is a JSON array value).

smallint/integer/bigint go as ``int``, numeric as ``Decimal``, boolean as ``bool``, bytea as
``bytes``. A JSON ``null`` is SQL NULL, also in json/jsonb columns.

The generated statements are psycopg query strings: ``%s`` parameters, a literal ``%`` doubled.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from sqlglot import exp

from cdc.errors import SinkError
from cdc.events.schema import Column
from cdc.events.schema import keeps_values as _widens
from cdc.sink.dialects.base import POSITIONS_TABLE, Dialect
from cdc.sink.values import Converter, postgres_converter

# A built-in type as format_type() prints it. The type text comes from an event header and is put
# into DDL verbatim, so only accept type-name shapes: a name (or "char"), further words only from
# the multi-word built-in names, typmods of digits, and array brackets.
_TYPE_WORDS = r"(?:varying|precision|with|without|time|zone|year|month|day|hour|minute|second|to)"
_BUILTIN_TYPE = re.compile(
    rf'(?:"char"|[a-z_][a-z0-9_]*)(?:\(\d+(?:,\d+)?\))?(?: {_TYPE_WORDS}(?:\(\d+\))?)*(?:\[\])*'
)


class PostgresDialect(Dialect):
    name = "postgres"
    placeholder = "%s"

    def quote(self, name: str) -> str:
        # Statements are psycopg query strings, always executed with a parameter sequence, where
        # a literal % must be written %% (an identifier like "share %" is legal in PostgreSQL).
        return super().quote(name).replace("%", "%%")

    def column_type(self, column: Column) -> str:
        if not column.builtin:
            return "text[]" if column.array else "text"
        if not _BUILTIN_TYPE.fullmatch(column.type):
            raise SinkError(f'column "{column.name}": unexpected type name {column.type!r} in the event schema')
        return column.type

    def converter(self, column: Column) -> Converter:
        return postgres_converter(column)

    def literal(self, value: Any) -> str:
        # A string literal of the parameter's text: PostgreSQL reads it with the column type's input
        # function, as it reads the bound parameters (bytea as its hex text).
        if value is None:
            return "NULL"
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, bytes):
            text = "\\x" + value.hex()
        elif isinstance(value, Decimal):
            text = format(value, "f")  # "0.00000001", not "1E-8" (the same number, but as PostgreSQL prints it)
        else:
            text = str(value)
        return exp.Literal.string(text).sql(dialect=self.name).replace("%", "%%")

    def widens(self, old_type: str, new_type: str) -> bool:
        return _widens(old_type, new_type)

    def alter_type(self, table: str, column: str, new_type: str) -> list[str]:
        # USING: integer -> text has no implicit cast for ALTER TYPE; the text form is what the source sends.
        q = self.quote(column)
        return [f"ALTER TABLE {self.quote(table)} ALTER COLUMN {q} TYPE {new_type} USING {q}::{new_type}"]

    def rewrite_column(self, table: str, column: Column, new_type: str) -> list[str]:
        q = self.quote(column.name)
        return [f"ALTER TABLE {self.quote(table)} ALTER COLUMN {q} TYPE {new_type} USING NULL"]  # keeps its place

    def truncate(self, table: str) -> str:
        return f"TRUNCATE TABLE {self.quote(table)}"

    def added_column_type(self, name: str) -> str:
        return "text" if name == "system_id" else "bigint"

    def create_positions(self) -> str:
        q = self.quote
        return (
            f"CREATE TABLE IF NOT EXISTS {q(POSITIONS_TABLE)} (\n"
            f"  {q('consumer')} text NOT NULL,\n"
            f"  {q('topic')} text NOT NULL,\n"
            f"  {q('partition')} integer NOT NULL,\n"
            f"  {q('kafka_offset')} bigint NOT NULL,\n"
            f"  {q('commit_lsn')} text NOT NULL,\n"
            f"  {q('lsn')} text NOT NULL,\n"
            # bigint: one source transaction can hold more than 2**31 changes
            f"  {q('seq')} bigint NOT NULL,\n"
            f"  {q('system_id')} {self.added_column_type('system_id')},\n"
            f"  {q('timeline')} {self.added_column_type('timeline')},\n"
            f"  {q('commit_events')} {self.added_column_type('commit_events')},\n"
            f"  {q('skipped_offset')} {self.added_column_type('skipped_offset')},\n"
            f"  {q('updated_at')} timestamp with time zone NOT NULL DEFAULT now(),\n"
            f"  PRIMARY KEY ({q('consumer')}, {q('topic')}, {q('partition')})\n"
            ")"
        )
