"""PostgreSQL backend: the dialect (types, values, DDL) and the target (connection, staging upserts, lock).

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

Over 400 lines: one module per database by design (the dialect, documented above, and the backend
that uses it), so that a new database is one new module.
"""

from __future__ import annotations

import hashlib
import logging
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, ContextManager

import psycopg
from sqlglot import exp

from cdc import native
from cdc.errors import RowRejectedError, SinkError, TargetError
from cdc.events.schema import Column, TableSchema
from cdc.events.schema import keeps_values as _widens
from cdc.redact import one_line, redact, scrub
from cdc.sink.backends.base import PartitionProgress, Prepared, TableChanges, Target, _Step
from cdc.sink.backends.sql import POSITIONS_TABLE, Dialect, TablePlan
from cdc.sink.values import Converter, Verbatim, postgres_converter, postgres_verbatim

log = logging.getLogger(__name__)

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

    def verbatim(self, column: Column, *, key: bool) -> Verbatim | None:
        return postgres_verbatim(column, key=key)

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


# --------------------------------------------------------------------------------------------------
# The backend: connection, staging upserts, advisory lock, error diagnosis

# SQLSTATE classes caused by the data or the target's schema, not by the connection or server.
_DATA_CLASSES = {"22": "data exception", "23": "integrity constraint violation",
                 "42": "schema or privilege problem", "0A": "feature not supported"}
_ROW_CLASSES = ("22", "23")  # of those, the ones a single row causes: dead-lettered with `on_error: dlq`


class PostgresTarget(Target):
    dialect = PostgresDialect()
    db_errors = (psycopg.Error,)

    # From this many rows on, a table's upserts go through a staging table: COPY, then one
    # INSERT ... SELECT ... ON CONFLICT. Fewer go as pipelined statements (fewer round trips).
    STAGE_FROM_ROWS = 16

    def __init__(self, url: str):
        super().__init__()
        # Staging tables (session temporary tables, see _upsert), per (table, schema, upsert SQL):
        # the table's name and statements; `_staged` holds the ones known to exist as built, for
        # the tables' current types; `_staging` those made or used by the transaction under way.
        self._stages: dict[tuple[str, TableSchema, str], tuple[str, str, str, str]] = {}
        self._staged: set[tuple[str, TableSchema, str]] = set()
        self._staging: set[tuple[str, TableSchema, str]] = set()
        self._stage_from_rows: int | None = self.STAGE_FROM_ROWS  # None: row by row
        self._may_stage = True  # False once the role may not create temporary tables
        # autocommit: every unit of work is an explicit conn.transaction() block.
        self._conn = psycopg.connect(url, autocommit=True)  # open_target reports failures, without the password
        self._cur = self._conn.cursor()
        if "synchronous_commit" not in url:  # unless the URL asks for its own (options=-c synchronous_commit=on)
            # The rows and the positions commit together: a server crash may undo the last few
            # commits, both alike, and the sink applies them again from Kafka. So no commit waits
            # for its WAL flush (PostgreSQL's "asynchronous commit").
            self._cur.execute("SET synchronous_commit = off")
        self.description = redact(url)
        self._prepare_positions()

    @classmethod
    def connect(cls, url: str, *, sqlite_path: Path | None = None) -> "PostgresTarget":
        where = redact(url)
        try:
            return cls(url)
        except psycopg.Error as exc:
            raise TargetError(f"cannot use target {where}: {scrub(one_line(exc), url)}") from None

    def close(self) -> None:
        self._conn.close()

    def _transaction(self) -> ContextManager[Any]:
        return self._conn.transaction()

    # Parameters are always passed (maybe empty) so psycopg always reads '%%' as '%': identifiers
    # are quoted with % doubled, see PostgresDialect.quote.
    def _execute(self, sql: str, params: tuple = ()) -> None:
        self._cur.execute(sql, params)

    def _executemany(self, sql: str, params: list[tuple]) -> int:
        self._cur.executemany(sql, params)  # psycopg 3 pipelines the statements: one round trip
        return self._cur.rowcount  # summed over the statements

    def apply(self, consumer: str, changes: list[TableChanges], progress: list[PartitionProgress],
              prepared: Prepared | None = None) -> dict[str, int]:
        try:
            try:
                missing = self._apply_staging(consumer, changes, progress, prepared,
                                              self.STAGE_FROM_ROWS if self._may_stage else None)
            except _StagedTwice:
                # Two rows of the batch are one row to PostgreSQL (keys equal in the column type but
                # not in the event: 1.0 and 1.00...): nothing was written; again, row by row, in order.
                missing = self._apply_staging(consumer, changes, progress, prepared, None)
            except _MayNotStage:
                log.warning("target %s: the role may not create temporary tables (TEMPORARY privilege): upserts "
                            "go row by row, which is slower", self.description)
                self._may_stage = False
                missing = self._apply_staging(consumer, changes, progress, prepared, None)
        except BaseException:
            self._staged.clear()  # rolled back, or the connection is gone: made again on next use
            raise
        self._staged |= self._staging  # committed
        return missing

    def _apply_staging(self, consumer: str, changes: list[TableChanges], progress: list[PartitionProgress],
                       prepared: Prepared | None, stage_from_rows: int | None) -> dict[str, int]:
        self._staging, self._stage_from_rows = set(), stage_from_rows
        return super().apply(consumer, changes, progress, prepared)

    def _ensure_step(self, step: _Step) -> None:
        super()._ensure_step(step)
        # The table may have new column types: its staging tables are made again on next use.
        self._staged = {k for k in self._staged if k[0] != step.plan.table}
        self._staging = {k for k in self._staging if k[0] != step.plan.table}

    def _upsert(self, plan: TablePlan, rows: list[tuple]) -> None:
        """Upserts as one statement per batch and table: COPY the rows into a temporary table made
        like the target's columns (so each value is read by the same input function as a bound
        parameter: a bad one is a class-22 error of this statement, as before), then INSERT ...
        SELECT ... ON CONFLICT with the same conflict clause as the row-by-row statement."""
        if self._stage_from_rows is None or len(rows) < self._stage_from_rows:
            super()._upsert(plan, rows)
            return
        key = (plan.table, plan.schema, plan.upsert_sql)
        stage = self._stages.get(key)
        if stage is None:
            # In the session's own schema (pg_temp): never a user's table, whatever its name.
            name = "pg_temp." + self.dialect.quote(f"cdc_stage_{len(self._stages) + 1}")
            names = ", ".join(self.dialect.quote(c) for c in plan.columns)
            values = "VALUES (" + ", ".join(["%s"] * len(plan.columns)) + ")"  # a lone % is only ever a parameter
            assert values in plan.upsert_sql
            stage = self._stages[key] = (
                name,
                f"CREATE TEMPORARY TABLE {name} ON COMMIT DELETE ROWS"
                f" AS SELECT {names} FROM {self.dialect.quote(plan.table)} WITH NO DATA",
                # COPY takes no parameters, so its %% are not read as %: the names as they are.
                f"COPY {name} ({names}) FROM STDIN".replace("%%", "%"),
                plan.upsert_sql.replace(values, f"SELECT {names} FROM {name}", 1),
            )
        name, create, copy_sql, insert = stage
        if key not in self._staged and key not in self._staging:
            self._execute(f"DROP TABLE IF EXISTS {name}")
            try:
                self._execute(create)
            except psycopg.errors.InsufficientPrivilege:
                raise _MayNotStage from None
        elif key in self._staging:
            self._execute(f"TRUNCATE {name}")  # used before in this transaction
        self._staging.add(key)
        with self._cur.copy(copy_sql) as copy:
            data = _copy_text(rows) if self._conn.info.encoding == "utf-8" else None
            if data is not None:
                copy.write(data)  # the rows as psycopg would write them, in one call of the compiled core
            else:
                for row in rows:
                    copy.write_row(row)
        try:
            self._execute(insert)
        except psycopg.errors.CardinalityViolation:
            raise _StagedTwice from None

    def lock(self, consumer: str) -> str | None:
        # A session advisory lock: held until this connection ends, released by the server when
        # the process dies or the connection drops (the compare-and-set in apply covers that gap).
        key = _lock_key(consumer)
        if self._query("SELECT pg_try_advisory_lock(%s)", (key,))[0][0]:
            return None
        holder = self._query(
            "SELECT a.pid, host(a.client_addr) FROM pg_catalog.pg_locks l"
            " JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "   (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())"
            " AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        )
        if not holder:
            return "another session"
        pid, addr = holder[0]
        return f"server process {pid}" + (f" of a client at {addr}" if addr else "")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        self._cur.execute(sql, params)
        return self._cur.fetchall()

    def _existing_columns(self, table: str) -> list[str] | None:
        rows = self._query(
            "SELECT a.attname FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_catalog.pg_attribute a"
            "   ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE n.nspname = current_schema() AND c.relname = %s",
            (table,),
        )
        return [name for (name,) in rows if name is not None] if rows else None

    def _existing_types(self, table: str) -> dict[str, str] | None:
        rows = self._query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_catalog.pg_attribute a"
            "   ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE n.nspname = current_schema() AND c.relname = %s",
            (table,),
        )
        return {name: type_ for name, type_ in rows if name is not None} if rows else None

    def _sink_error(self, exc: Exception, step: _Step | None) -> SinkError | None:
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate[:2] not in _DATA_CLASSES:
            # Client-side psycopg errors about data (no SQLSTATE) are DataError/ProgrammingError.
            if sqlstate or not isinstance(exc, (psycopg.DataError, psycopg.ProgrammingError)):
                return None
        diag = getattr(exc, "diag", None)
        message = (diag.message_primary if diag is not None else None) or str(exc).splitlines()[0]
        table = step.plan.table if step else POSITIONS_TABLE
        column = diag.column_name if diag is not None else None
        if sqlstate.startswith("22"):
            # Data exceptions quote the value ('invalid input syntax for type date: "..."'): cut
            # from the first to the last double quote, whatever the value itself contains.
            message = re.sub(r'".*"', '"…"', message, flags=re.DOTALL)
            if column is None and step is not None:
                column = self._find_bad_column(step)
        where = f'table "{table}"'
        if column is not None and step is not None and column in step.plan.columns:
            col = step.plan.schema.column(column)
            where += f', column "{column}" (kind {col.kind}{"[]" if col.array else ""}, type {col.type})'
        elif column is not None:
            where += f', column "{column}"'
        code = f" [SQLSTATE {sqlstate}]" if sqlstate else ""
        # Data exceptions and integrity constraint violations are about the rows; a schema or
        # privilege problem (42, 0A) is about the table and would refuse every row alike.
        error = RowRejectedError if step is not None and sqlstate[:2] in _ROW_CLASSES else SinkError
        return error(f"{where}: PostgreSQL rejected the change: {message}{code}")

    def _find_bad_column(self, step: _Step) -> str | None:
        """After a failed apply: cast each column's values on their own to see which one failed.

        Runs only on failure, in autocommit, so nothing is written; the casts use the table's real
        column types when it exists (it may have been created by the rolled-back transaction).
        """
        plan = step.plan
        try:
            types = dict(
                self._query(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a"
                    " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                    (self.dialect.quote(plan.table).replace("%%", "%"),),
                )
            )
            key_pos = {i: j for j, i in enumerate(plan.key_index)}
            for i, name in enumerate(plan.columns):
                texts = [_param_text(row[i]) for row in step.upserts if row[i] is not None]
                if i in key_pos:
                    texts += [_param_text(row[key_pos[i]]) for row in step.deletes if row[key_pos[i]] is not None]
                if not texts:
                    continue
                type_sql = types.get(name) or self.dialect.column_type(plan.schema.column(name))
                try:
                    self._cur.execute(
                        f"SELECT count(CAST(v AS {type_sql.replace('%', '%%')})) FROM unnest(%s::text[]) AS u(v)",
                        (texts,),
                    )
                except psycopg.Error as exc:
                    if (exc.sqlstate or "").startswith("22"):  # class 22: data exception
                        return name
                    raise
        except psycopg.Error:
            pass  # the diagnosis is best effort; the error itself is reported anyway
        return None


class _StagedTwice(Exception):
    """A staged upsert met one target row twice: the apply is rolled back and done row by row."""


class _MayNotStage(Exception):
    """The role may not create the staging table: the apply is rolled back and done row by row."""


def _param_text(value: Any) -> str:
    """A psycopg parameter as PostgreSQL input text (for the failure diagnosis only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    return str(value)


def _copy_text(rows: list[tuple]) -> bytes | None:
    """COPY data for `rows` from the compiled core (native/src/copy_text.rs), or None where psycopg
    writes them: without the core, or for values other than str, int and None."""
    if native.core is None or type(rows) is not list:
        return None
    return native.core.copy_text(rows)


def _lock_key(consumer: str) -> int:
    """A stable signed 64-bit advisory lock key for a consumer name."""
    digest = hashlib.blake2b(f"cdc sink {consumer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
