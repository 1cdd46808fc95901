"""Keeping a target table what the sink made of it while the source's schema changes (README "Schema evolution").

:func:`sync_table` runs inside the backend's apply transaction (between the rows before and after a
schema change) and uses only the backend's primitives and its dialect's DDL, so every backend gets
it for free: create the table, or add new columns, rename renamed ones (same attnum), alter retyped
ones when the target can hold old and new values (else a named stop), keep or drop dropped ones
(``on_column_drop``). What the sink made of each table is recorded in ``cdc_sink_columns``, so a
table changed by hand is a named stop, never silently repaired.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

from cdc.errors import SinkError
from cdc.events.schema import Column, TableSchema, keeps_values
from cdc.sink.backends.sql import Dialect, TablePlan


class _Database(Protocol):
    """What the sync needs of a backend (cdc.sink.backends.base.Target): its dialect and primitives."""

    dialect: Dialect
    on_column_drop: Literal["keep", "drop"]

    def _existing_types(self, table: str) -> dict[str, str] | None: ...
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]: ...
    def _execute(self, sql: str, params: tuple = ()) -> None: ...
    def _executemany(self, sql: str, params: list[tuple]) -> int: ...
    def _fold(self, name: str) -> str: ...


class RecordedColumn(NamedTuple):
    """One row of the columns record (:data:`cdc.sink.backends.sql.COLUMNS_TABLE`), without the table name."""

    column_name: str
    attnum: int | None
    source_type: str
    target_type: str
    kept: int
    created_as: str

    @classmethod
    def of(cls, column: Column, target_type: str, created_as: str | None = None) -> "RecordedColumn":
        return cls(column.name, column.attnum, column.type, target_type, 0, created_as or column.name)


def sync_table(db: _Database, plan: TablePlan) -> tuple[str, ...]:
    """Make the table match the plan's schema, inside the caller's transaction: create it, or
    apply the source's schema changes (see README, Schema evolution) after checking that the
    table still is what the sink made of it. Returns the kept columns the source dropped."""
    table, schema, dialect = plan.table, plan.schema, db.dialect
    actual = db._existing_types(table)
    recorded = [RecordedColumn(*row) for row in db._query(dialect.select_columns_record(), (table,))]
    if actual is None:
        db._execute(dialect.create_table(table, schema))
        _write_record(db, table, [RecordedColumn.of(c, dialect.column_type(c)) for c in schema.columns])
        return ()
    # A kept column of a source that dropped it may go by hand: nothing of the source is lost.
    recorded = [r for r in recorded if not r.kept or db._fold(r.column_name) in actual]
    matches = _matches(db, schema, recorded)
    for column, r in matches:
        if column.name in schema.key and r is None and db._fold(column.name) not in actual:
            raise SinkError(
                f'table "{table}" exists but has no column "{column.name}", a key column of '
                f"{schema.schema}.{schema.table}: drop or rename the table, or map the "
                "source to another table"
            )
    matched = {id(r) for _, r in matches if r is not None}
    wanted = {id(r): dialect.column_type(c) for c, r in matches if r is not None}
    # The target must still hold every column the sink made, with the type it gave it (or the
    # new type, when the operator altered it by hand as the way forward from a type change).
    for r in recorded:
        have = actual.get(db._fold(r.column_name))
        if have is None:
            raise SinkError(
                f'table "{table}": column "{r.column_name}" (source type {r.source_type}), which the sink '
                "created, is missing from the target: it was dropped or renamed by hand. The sink does not "
                "re-create it (its rows would hold NULL there). Way forward: restore the column as it was "
                f"(type {r.target_type}, values from the source), or drop the target table and re-snapshot "
                "the source table into it"
            )
        if not dialect.same_type(have, r.target_type) and not dialect.same_type(have, wanted.get(id(r), r.target_type)):
            raise SinkError(
                f'table "{table}": column "{r.column_name}" has type {have} in the target, but the sink created '
                f"it as {r.target_type} (source type {r.source_type}): it was altered by hand. Way forward: "
                f"alter it back to {r.target_type}, or drop the target table and re-snapshot the source table into it"
            )
    record: list[RecordedColumn] = []
    kept: list[str] = []
    new_names = {db._fold(c.name) for c, r in matches if r is None}
    for r in recorded:
        if id(r) in matched:
            continue
        if db._fold(r.column_name) in new_names:
            # Dropped and added again under the same name in the source (a new attnum): the
            # target column is replaced, as the source's was.
            db._execute(dialect.drop_column(table, r.column_name))
            del actual[db._fold(r.column_name)]
        elif r.kept or db.on_column_drop == "keep":  # dropped in the source: it stays, NULL from now on
            record.append(r._replace(kept=1))
            kept.append(r.column_name)
        else:
            db._execute(dialect.drop_column(table, r.column_name))
    for position, (column, r) in enumerate(matches, 1):
        target_type = dialect.column_type(column)
        if r is None:
            if db._fold(column.name) not in actual:
                db._execute(dialect.add_column(table, column))
            else:
                target_type = actual[db._fold(column.name)]  # made before the record existed: adopt
            record.append(RecordedColumn.of(column, target_type))
            continue
        if r.column_name != column.name:
            db._execute(dialect.rename_column(table, r.column_name, column.name))
        have = actual[db._fold(r.column_name)]
        if not dialect.same_type(have, target_type):
            if column.name not in schema.key and not keeps_values(r.source_type, column.type):
                # The source rewrote the column (e.g. ALTER ... TYPE integer USING length(d)) and
                # its connector re-reads the table: no old value stays, the r events refill it;
                # also where the target could hold the old values (SQLite INTEGER -> TEXT): they
                # are not the source's any more.
                for sql in dialect.rewrite_column(table, column, target_type):
                    db._execute(sql)
            elif not dialect.widens(have, target_type) or (column.name in schema.key and not dialect.alters_key_types):
                raise SinkError(
                    f'table "{table}", column "{column.name}" (position {position} of '
                    f"{schema.schema}.{schema.table}): the source changed its type from {r.source_type} to "
                    f"{column.type}, and the target column ({have}) cannot be altered to {target_type} keeping "
                    "every value it holds; nothing of the change was applied. Way forward: alter the target "
                    f"column to {target_type} yourself (deciding what becomes of values that do not fit) and "
                    "start the sink again, or drop the target table and re-snapshot the source table into it"
                )
            else:
                for sql in dialect.alter_type(table, column.name, target_type):
                    db._execute(sql)
        record.append(RecordedColumn.of(column, target_type, r.created_as))
    _write_record(db, table, record)
    return tuple(kept)

def _matches(db: _Database, schema: TableSchema,
             recorded: list[RecordedColumn]) -> list[tuple[Column, RecordedColumn | None]]:
    """Each schema column with the recorded target column that holds it (None: a new column).

    A column is the same column as a recorded one with the same attnum (whatever its name now:
    a RENAME), else with the same name when either side has no attnum (older connectors). A
    name whose attnum changed is a column dropped and added again: a new column. A kept column
    (dropped in the source) that comes back is the same column again: events of an older shape
    after newer ones (a replay from an earlier position) never cost the values it holds.
    """
    by_attnum = {r.attnum: r for r in recorded if r.attnum is not None}
    by_name = {db._fold(r.column_name): r for r in recorded}
    out = []
    for column in schema.columns:
        r = by_attnum.get(column.attnum) if column.attnum is not None else None
        if r is None:
            same_name = by_name.get(db._fold(column.name))
            if same_name is not None and (same_name.attnum is None or column.attnum is None):
                r = same_name
        out.append((column, r))
    return out

def _write_record(db: _Database, table: str, record: list[RecordedColumn]) -> None:
    db._execute(db.dialect.delete_columns_record(), (table,))
    if record:
        db._executemany(db.dialect.insert_columns_record(), [(table, *r) for r in record])
