"""What a target dialect provides, and the per-table plan built from it.

A :class:`Dialect` only generates SQL text and value converters; it never touches a connection, so
everything here is unit-testable without a database. :class:`TablePlan` is the compiled form of one
(target table, source schema) pair: statements and converters, built once and reused per batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cache
from dataclasses import dataclass, replace
from typing import Any

from sqlglot import exp

from cdc.errors import RowRejectedError, SinkError
from cdc.events.schema import Column, TableSchema
from cdc.sink.values import Converter, ValueProblem, Verbatim, json_type

POSITIONS_TABLE = "cdc_sink_positions"
POSITION_KEY = ("consumer", "topic", "partition")
POSITION_STATE = ("kafka_offset", "commit_lsn", "lsn", "seq")  # what an apply compares-and-sets
# The source history the stored position belongs to (see cdc.events.origin); NULL when the events
# carried none. Added to positions tables of earlier releases on open.
ORIGIN_COLUMNS = ("system_id", "timeline")
# How many events of the stored position's commit the partition applied up to that position: with
# the END record's counts, whether a source transaction applied in pieces (or by a replay) is
# complete. NULL in rows that earlier releases wrote; added to their positions tables on open.
COUNT_COLUMNS = ("commit_events",)
# Where the operator deliberately skipped a record that is no cdc event (`cdc sink --skip-record`):
# written by that skip only, kept by later applies. Added to earlier positions tables on open.
SKIP_COLUMNS = ("skipped_offset",)
ADDED_COLUMNS = (*ORIGIN_COLUMNS, *COUNT_COLUMNS, *SKIP_COLUMNS)  # not in positions tables of the first release
POSITION_COLUMNS = (*POSITION_KEY, *POSITION_STATE, *ORIGIN_COLUMNS, *COUNT_COLUMNS)
# What the sink made of each target table: one row per column it created or adopted, with the source
# column it holds (attnum: the source's identity of the column, NULL if the events carry none) and
# the target type it has. Lets the sink tell a source RENAME or type change from a column changed by
# hand in the target, also across restarts. `kept` = 1: the source dropped the column and the sink
# keeps it (on_column_drop: keep). `created_as`: the column's name when the sink made it, which
# is how a sink's kept-column list names it even after renames.
COLUMNS_TABLE = "cdc_sink_columns"
COLUMNS_RECORD = ("target_table", "column_name", "attnum", "source_type", "target_type", "kept", "created_as")


class Dialect(ABC):
    name: str  # sqlglot dialect name
    placeholder: str  # DB-API parameter marker of the driver
    alters_key_types = True  # whether alter_type works on a primary key column

    def quote(self, name: str) -> str:
        """A quoted identifier: keeps case, spaces and quotes exactly as in the source."""
        return exp.to_identifier(name, quoted=True).sql(dialect=self.name)

    @abstractmethod
    def column_type(self, column: Column) -> str:
        """DDL type of the target column for a source column."""

    @abstractmethod
    def converter(self, column: Column) -> Converter:
        """Event value -> driver parameter, for a column of :meth:`column_type`."""

    def verbatim(self, column: Column, *, key: bool) -> Verbatim | None:
        """Which batches of a column's values :meth:`converter` returns unchanged (None: never)."""
        return None

    @abstractmethod
    def literal(self, value: Any) -> str:
        """SQL literal of a driver parameter that :meth:`converter` made, for DDL (column defaults)."""

    @abstractmethod
    def truncate(self, table: str) -> str: ...

    @abstractmethod
    def create_positions(self) -> str: ...

    @abstractmethod
    def added_column_type(self, name: str) -> str:
        """DDL type of one of :data:`ADDED_COLUMNS` in the positions table."""

    @abstractmethod
    def widens(self, old_type: str, new_type: str) -> bool:
        """Whether a target column of ``old_type`` can be altered to ``new_type`` keeping every
        value it holds exactly (both are :meth:`column_type` results)."""

    @abstractmethod
    def alter_type(self, table: str, column: str, new_type: str) -> list[str]:
        """Statements that change the column's type to ``new_type`` keeping its values, where
        :meth:`widens` allows it."""

    def same_type(self, a: str, b: str) -> bool:
        return a.lower() == b.lower()

    # Shared SQL: the same text in both dialects, up to quoting and parameter markers.

    def create_columns_record(self) -> str:
        q = self.quote
        return (
            f"CREATE TABLE IF NOT EXISTS {q(COLUMNS_TABLE)} (\n"
            f"  {q('target_table')} TEXT NOT NULL,\n"
            f"  {q('column_name')} TEXT NOT NULL,\n"
            f"  {q('attnum')} INTEGER,\n"
            f"  {q('source_type')} TEXT NOT NULL,\n"
            f"  {q('target_type')} TEXT NOT NULL,\n"
            f"  {q('kept')} INTEGER NOT NULL DEFAULT 0,\n"
            f"  {q('created_as')} TEXT NOT NULL,\n"
            f"  PRIMARY KEY ({q('target_table')}, {q('column_name')})\n"
            ")"
        )

    def select_columns_record(self) -> str:
        cols = ", ".join(self.quote(c) for c in COLUMNS_RECORD[1:])
        return f"SELECT {cols} FROM {self.quote(COLUMNS_TABLE)} WHERE {self.quote('target_table')} = {self.placeholder}"

    def delete_columns_record(self) -> str:
        return f"DELETE FROM {self.quote(COLUMNS_TABLE)} WHERE {self.quote('target_table')} = {self.placeholder}"

    def insert_columns_record(self) -> str:
        return self._insert_head(COLUMNS_TABLE, COLUMNS_RECORD)

    def rename_column(self, table: str, old: str, new: str) -> str:
        # PostgreSQL, and SQLite since 3.25
        return f"ALTER TABLE {self.quote(table)} RENAME COLUMN {self.quote(old)} TO {self.quote(new)}"

    def drop_column(self, table: str, column: str) -> str:
        # PostgreSQL, and SQLite since 3.35
        return f"ALTER TABLE {self.quote(table)} DROP COLUMN {self.quote(column)}"

    def rewrite_column(self, table: str, column: Column, new_type: str) -> list[str]:
        """Statements that give a (non-key) column ``new_type`` and NULL in every row: for a type
        change that rewrote the column in the source, whose connector then re-reads the table."""
        # SQLite cannot alter a column's type: the column is made again (it moves to the end).
        return [self.drop_column(table, column.name), self.add_column(table, replace(column, default=None))]

    def upsert(self, table: str, columns: tuple[str, ...], key: tuple[str, ...], nulled: tuple[str, ...] = ()) -> str:
        """INSERT of one row that replaces the row with the same key. Written by hand, not
        transpiled: PostgreSQL and SQLite (3.24+) share this ``ON CONFLICT ... EXCLUDED`` form.
        ``nulled``: columns the source dropped that the target keeps; a replaced row has NULL there,
        as a new row has."""
        conflict = f"ON CONFLICT ({', '.join(self.quote(k) for k in key)})"
        rest = [c for c in columns if c not in key]
        if not rest and not nulled:
            return f"{self._insert_head(table, columns)} {conflict} DO NOTHING"
        sets = ", ".join([f"{self.quote(c)} = EXCLUDED.{self.quote(c)}" for c in rest]
                         + [f"{self.quote(c)} = NULL" for c in nulled])
        return f"{self._insert_head(table, columns)} {conflict} DO UPDATE SET {sets}"

    @cache  # once per dialect: every batch stores its positions with it
    def insert_position(self) -> str:
        """First position of a partition. Parameters: :data:`POSITION_COLUMNS`, then ``updated_at``
        (ISO-8601 UTC text). Inserts nothing if another process stored one meanwhile: the caller
        checks the row count."""
        return f"{self._insert_head(POSITIONS_TABLE, (*POSITION_COLUMNS, 'updated_at'))} ON CONFLICT DO NOTHING"

    @cache
    def update_position(self) -> str:
        """Compare-and-set of a stored position. Parameters: the new :data:`POSITION_STATE`, the new
        :data:`ORIGIN_COLUMNS` and :data:`COUNT_COLUMNS`, ``updated_at``, then :data:`POSITION_KEY` and the :data:`POSITION_STATE`
        that the caller last saw. Updates nothing if the row changed meanwhile."""
        p = self.placeholder
        sets = ", ".join(f"{self.quote(c)} = {p}" for c in (*POSITION_STATE, *ORIGIN_COLUMNS, *COUNT_COLUMNS, "updated_at"))
        where = " AND ".join(f"{self.quote(c)} = {p}" for c in (*POSITION_KEY, *POSITION_STATE))
        return f"UPDATE {self.quote(POSITIONS_TABLE)} SET {sets} WHERE {where}"

    @cache
    def skip_position(self) -> str:
        """Compare-and-set of a stored position past a record skipped on purpose (see
        :data:`SKIP_COLUMNS`). Parameters: the new ``kafka_offset``, ``skipped_offset`` and
        ``updated_at``, then :data:`POSITION_KEY` and the :data:`POSITION_STATE` the caller last saw."""
        p = self.placeholder
        sets = ", ".join(f"{self.quote(c)} = {p}" for c in ("kafka_offset", *SKIP_COLUMNS, "updated_at"))
        where = " AND ".join(f"{self.quote(c)} = {p}" for c in (*POSITION_KEY, *POSITION_STATE))
        return f"UPDATE {self.quote(POSITIONS_TABLE)} SET {sets} WHERE {where}"

    def update(self, table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
        """UPDATE of some columns of the row with the given key (partial rows)."""
        p = self.placeholder
        sets = ", ".join(f"{self.quote(c)} = {p}" for c in columns)
        where = " AND ".join(f"{self.quote(k)} = {p}" for k in key)
        return f"UPDATE {self.quote(table)} SET {sets} WHERE {where}"

    def column_def(self, column: Column, *, key: bool) -> str:
        # NOT NULL only on key columns: a target must accept whatever the source accepts later,
        # and nullability is the constraint most often relaxed on a source.
        return f"{self.quote(column.name)} {self.column_type(column)}" + (" NOT NULL" if key else "")

    def create_table(self, table: str, schema: TableSchema) -> str:
        check_schema(table, schema)
        defs = [self.column_def(c, key=c.name in schema.key) for c in schema.columns]
        defs.append(f"PRIMARY KEY ({', '.join(self.quote(k) for k in schema.key)})")
        body = ",\n  ".join(defs)
        return f"CREATE TABLE IF NOT EXISTS {self.quote(table)} (\n  {body}\n)"

    def add_column(self, table: str, column: Column) -> str:
        # Added columns are never key columns (a missing key column is an error), so: nullable.
        ddl = f"ALTER TABLE {self.quote(table)} ADD COLUMN {self.column_def(column, key=False)}"
        if column.default is None:
            return ddl
        # The source added the column with a default that rows older than it hold without any WAL:
        # the rows already in the target are those rows, so they get it the same way.
        try:
            value = self.converter(column)(column.default)
        except ValueProblem as exc:
            raise SinkError(f'table "{table}", column "{column.name}": cannot use the default: {exc}') from None
        return f"{ddl} DEFAULT {self.literal(value)}"

    def delete(self, table: str, key: tuple[str, ...]) -> str:
        where = " AND ".join(f"{self.quote(k)} = {self.placeholder}" for k in key)
        return f"DELETE FROM {self.quote(table)} WHERE {where}"

    def select_positions(self) -> str:
        cols = ", ".join(self.quote(c) for c in (*POSITION_COLUMNS[1:], *SKIP_COLUMNS))
        return (
            f"SELECT {cols} FROM {self.quote(POSITIONS_TABLE)} "
            f"WHERE {self.quote('consumer')} = {self.placeholder}"
        )

    def _insert_head(self, table: str, columns: tuple[str, ...]) -> str:
        names = ", ".join(self.quote(c) for c in columns)
        marks = ", ".join([self.placeholder] * len(columns))
        return f"INSERT INTO {self.quote(table)} ({names}) VALUES ({marks})"

    def plan(self, table: str, schema: TableSchema) -> "TablePlan":
        check_schema(table, schema)
        columns = tuple(c.name for c in schema.columns)
        return TablePlan(
            table=table,
            schema=schema,
            columns=columns,
            key_index=tuple(columns.index(k) for k in schema.key),
            truncate_sql=self.truncate(table),
            delete_sql=self.delete(table, schema.key),
            upsert_sql=self.upsert(table, columns, schema.key),
            converters=tuple(
                _not_null(self.converter(c)) if c.name in schema.key else self.converter(c)
                for c in schema.columns
            ),
            dialect=self,
            verbatim=tuple(self.verbatim(c, key=c.name in schema.key) for c in schema.columns),
        )


def _not_null(convert: Converter) -> Converter:
    # A NULL key would match no row on delete, and SQLite turns a NULL INTEGER PRIMARY KEY into a
    # fresh rowid instead of refusing it: stop it here, for every dialect alike.
    def convert_key(value: Any) -> Any:
        if value is None:
            raise ValueProblem("a null key value")
        return convert(value)

    return convert_key


def check_schema(table: str, schema: TableSchema) -> None:
    names = [c.name for c in schema.columns]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SinkError(f'table "{table}": the schema lists column "{dup}" twice')
    if not schema.key:
        raise SinkError(
            f'table "{table}": the source table {schema.schema}.{schema.table} has no key; '
            "a sink table needs a primary key to apply updates and deletes"
        )
    for k in schema.key:
        if k not in names:
            raise SinkError(f'table "{table}": key column "{k}" is not among the schema columns')


@dataclass(frozen=True)
class TablePlan:
    """Statements and converters for one (target table, source schema); parameters follow ``columns``."""

    table: str
    schema: TableSchema
    columns: tuple[str, ...]
    key_index: tuple[int, ...]  # positions of the key columns in ``columns``
    truncate_sql: str
    delete_sql: str
    upsert_sql: str
    converters: tuple[Converter, ...]
    dialect: "Dialect"  # for statements that depend on the row (partial updates)
    # per column: which batches of values the converter returns unchanged (bound as they are)
    verbatim: tuple[Verbatim | None, ...] = ()

    def upsert_params(self, rows: list[dict]) -> list[tuple]:
        return self._params(rows, range(len(self.columns)))

    def update_params(self, rows: list[dict]) -> list[tuple[str, list[tuple]]]:
        """Partial rows (some columns plus the key) -> (UPDATE statement, parameters) per column set."""
        groups: dict[tuple[int, ...], list[dict]] = {}
        for row in rows:
            set_index = tuple(i for i, c in enumerate(self.columns) if c in row and i not in self.key_index)
            groups.setdefault(set_index, []).append(row)
        updates = []
        for set_index, group in groups.items():
            if not set_index:  # only key columns: nothing to change
                continue
            sql = self.update_sql(tuple(self.columns[i] for i in set_index))
            updates.append((sql, self._params(group, (*set_index, *self.key_index))))
        return updates

    def move_params(self, moves: list[tuple[dict, dict]]) -> list[tuple[str, list[tuple]]]:
        """Key changes (old key, partial row under the new key) -> (UPDATE setting the key and the
        present columns WHERE the old key, parameters) per column set."""
        groups: dict[tuple[int, ...], list[tuple[dict, dict]]] = {}
        for old_key, row in moves:
            set_index = tuple(i for i, c in enumerate(self.columns) if c in row)
            groups.setdefault(set_index, []).append((old_key, row))
        out = []
        for set_index, group in groups.items():
            sql = self.update_sql(tuple(self.columns[i] for i in set_index))
            sets = self._params([row for _, row in group], set_index)
            wheres = self._params([old for old, _ in group], self.key_index)
            out.append((sql, [s + w for s, w in zip(sets, wheres)]))
        return out

    def update_sql(self, columns: tuple[str, ...]) -> str:
        return self.dialect.update(self.table, columns, self.schema.key)

    def delete_params(self, rows: list[dict]) -> list[tuple]:
        return self._params(rows, self.key_index)

    def _params(self, rows: list[dict], indexes: Any) -> list[tuple]:
        """The rows' values of the columns at `indexes` as driver parameters, a tuple per row.
        Column by column: a column's values are converted in one pass, or taken as they are."""
        pairs = [(self.columns[i], self.converters[i]) for i in indexes]
        try:
            columns = []
            for i in indexes:
                name, verbatim = self.columns[i], self.verbatim[i] if self.verbatim else None
                values = [row[name] for row in rows]
                columns.append(values if verbatim is not None and verbatim(values) else list(map(self.converters[i], values)))
            return list(zip(*columns)) if columns else [() for _ in rows]
        except Exception:
            pass
        # Slow path, only on failure: find the row and column again to say which one it was.
        for row in rows:
            for name, conv in pairs:
                if name not in row:
                    raise SinkError(f'table "{self.table}": an event row has no column "{name}"') from None
                try:
                    conv(row[name])
                except ValueProblem as exc:
                    raise self.value_error(name, f"cannot store {exc}") from None
                except Exception as exc:  # not ours: its message might quote the value
                    raise self.value_error(
                        name, f"cannot convert a JSON {json_type(row[name])} ({type(exc).__name__})"
                    ) from None
        raise AssertionError("conversion failed once but not twice")

    def value_error(self, column: str, problem: str) -> SinkError:
        col = self.schema.column(column)
        kind = col.kind + ("[]" if col.array else "")
        return RowRejectedError(f'table "{self.table}", column "{column}" (kind {kind}): {problem}')
