"""The database side of the sink: apply batches of row state to a target database.

A batch is a list of :class:`TableChanges` (per target table: truncate, deletes by key, upserts of
full rows) plus the sink's :class:`PartitionProgress` per Kafka topic partition. :meth:`Target.apply`
writes both in ONE transaction, so after a crash the target's rows and its recorded positions
always agree: the sink resumes from :meth:`Target.load_positions` and re-applies nothing twice
(re-applying would be harmless anyway: every write is an idempotent upsert/delete by key).

Targets: PostgreSQL (``postgresql://`` / ``postgres://`` URLs, psycopg 3) and SQLite (``sqlite:///``
URLs). Tables are created on first use with a primary key on the source key, and follow the
source's schema changes inside the apply transaction, between the rows around them (:meth:`Target._ensure`,
README "Schema evolution"): new columns are added, renamed ones (same attnum) renamed, retyped ones
altered when the target can hold old and new values (else a named stop), dropped ones kept or
dropped per ``on_column_drop``. What the sink made of each table is recorded in ``cdc_sink_columns``,
so a table changed by hand is a named stop, never silently repaired. How source types map to target
columns and how values are stored is documented per dialect:
:mod:`cdc.sink.dialects.postgres`, :mod:`cdc.sink.dialects.sqlite`.

Positions live in ``cdc_sink_positions`` (created on open)::

    consumer TEXT, topic TEXT, partition INTEGER, kafka_offset BIGINT,
    commit_lsn TEXT ('16/B374D848'), lsn TEXT, seq BIGINT,
    system_id TEXT, timeline BIGINT (the source history of the position; NULL if unknown),
    updated_at (UTC timestamp), PRIMARY KEY (consumer, topic, partition)

One process applies a consumer at a time: :meth:`Target.lock` holds a lock for the life of the
sink, and every apply compares-and-sets the stored positions it last saw, so even a lock lost
silently can never move a position backwards or apply a batch twice.

Errors caused by the data (a value that does not fit its column, a table without a key column...)
raise :class:`~cdc.errors.SinkError` naming the table, the column and the column's kind, never the
value: rows may hold private data and error messages end up in logs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import socket
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Literal, NamedTuple, NoReturn

import psycopg

from cdc import failpoints
from cdc.errors import RowRejectedError, SinkConflictError, SinkError, TargetError
from cdc.events.schema import Column, TableSchema, keeps_values
from cdc.lsn import Position, format_lsn, parse_lsn
from cdc.redact import one_line, redact, scrub
from cdc.sink.dialects import POSITIONS_TABLE, Dialect, PostgresDialect, SqliteDialect, TablePlan
from cdc.sink.dialects.base import ADDED_COLUMNS
from cdc.sqlnames import ascii_lower

log = logging.getLogger(__name__)


@dataclass
class TableChanges:
    table: str  # target table name (unqualified; created in the connection's default schema)
    schema: TableSchema  # type info of the source table
    truncate: bool  # empty the table before applying the rows below
    deletes: list[dict]  # rows in event-JSON form holding at least the key columns: delete by key
    upserts: list[dict]  # full rows in event-JSON form: insert, or replace the row with the same key
    # Partial rows (the key and the columns that changed; unchanged TOAST values left out): update
    # those columns of an existing row, after the deletes and upserts.
    updates: list[dict] = field(default_factory=list)
    # Key changes of rows only the target holds in full: (old key, new key plus changed columns).
    moves: list[tuple[dict, dict]] = field(default_factory=list)
    # Where the first event of these changes is (topic[partition]@offset, position), for errors
    # about the schema change it brings.
    since: str | None = None


# The source history a stored position belongs to: (system_id, timeline), see cdc.events.origin.
HistoryId = tuple[str, int]


@dataclass(frozen=True)
class PartitionProgress:
    topic: str
    partition: int
    offset: int  # Kafka offset of the last message consumed
    position: Position  # position of the last event applied (or skipped)
    origin: HistoryId | None = None  # history of `position`; None for events without a cdc.origin header
    # Events of position.commit_lsn applied from this partition up to `position` (None: not known,
    # a row of an earlier release). See cdc.sink.transactions.
    commit_events: int | None = None
    skipped_offset: int | None = None  # the last record skipped on purpose (`cdc sink --skip-record`)


@dataclass
class _Step:
    """One table's share of an apply, values already converted to driver parameters."""

    plan: TablePlan
    truncate: bool = False
    deletes: list[tuple] = field(default_factory=list)
    upserts: list[tuple] = field(default_factory=list)
    updates: list[tuple[str, list[tuple]]] = field(default_factory=list)  # (UPDATE, params) per column set
    update_rows: int = 0  # partial rows in `updates` and `moves`
    moves: list[tuple[str, list[tuple]]] = field(default_factory=list)  # (UPDATE, params) per column set
    since: str | None = None  # TableChanges.since


class Target(ABC):
    """A target database. Not thread-safe: one sink runner drives it from one task at a time."""

    dialect: Dialect
    db_errors: tuple[type[Exception], ...]  # the driver's exceptions
    description: str  # where the target is, safe to print (no password)
    # A column the source drops: kept in the target (NULL in rows written from then on) or dropped.
    on_column_drop: Literal["keep", "drop"] = "keep"

    def __init__(self) -> None:
        self._plans: dict[tuple[str, TableSchema], TablePlan] = {}
        self._ready: set[tuple[str, TableSchema]] = set()  # tables known to match their schema
        # Per consumer: the positions as last loaded or written by this process. Each apply
        # compares-and-sets against them.
        self._seen: dict[str, dict[tuple[str, int], PartitionProgress]] = {}

    @abstractmethod
    def lock(self, consumer: str) -> str | None:
        """Take the consumer's lock for the life of this target connection. None when taken, else
        who holds it (safe to print)."""

    # -- public API -------------------------------------------------------------------------------

    def ensure_table(self, table: str, schema: TableSchema) -> None:
        """Create the table, or add the columns it lacks. Free after the first call per schema."""
        if (table, schema) in self._ready:
            return
        step = _Step(self._plan(table, schema))
        try:
            with self._transaction():
                self._ensure_step(step)
        except self.db_errors as exc:
            self._raise_sink_error(exc, step)
        self._mark_ready([(table, schema)])

    def created_names(self, table: str) -> dict[int, str]:
        """attnum -> the name the column had when the sink made it, for the source columns the
        table holds (a sink's kept-column list names columns so, whatever their names now)."""
        rows = self._query(self.dialect.select_columns_record(), (table,))
        return {r.attnum: r.created_as for r in map(_Recorded._make, rows) if r.attnum is not None and not r.kept}

    def load_positions(self, consumer: str) -> dict[tuple[str, int], PartitionProgress]:
        progress = {}
        rows = self._query(self.dialect.select_positions(), (consumer,))
        for topic, partition, offset, commit_lsn, lsn, seq, system_id, timeline, commit_events, skipped in rows:
            position = Position(parse_lsn(commit_lsn), parse_lsn(lsn), int(seq))
            origin = (str(system_id), int(timeline)) if system_id is not None and timeline is not None else None
            p = PartitionProgress(topic, int(partition), int(offset), position, origin,
                                  None if commit_events is None else int(commit_events),
                                  None if skipped is None else int(skipped))
            progress[(p.topic, p.partition)] = p
        self._seen[consumer] = dict(progress)
        return progress

    def apply(self, consumer: str, changes: list[TableChanges], progress: list[PartitionProgress]) -> dict[str, int]:
        """Write all changes and the progress rows in one transaction; on error roll back and raise.

        Returns, per table, how many partial rows found no row to update (the target lacks them).
        Raises SinkConflictError, having written nothing, if a stored position is no longer the one
        this process last loaded or wrote: another process applies the same consumer.
        """
        # Convert every value before touching the database: bad values fail with nothing to undo.
        steps = []
        for tc in changes:
            plan = self._plan(tc.table, tc.schema)
            steps.append(_Step(plan, tc.truncate, plan.delete_params(tc.deletes), plan.upsert_params(tc.upserts),
                               plan.update_params(tc.updates), len(tc.updates) + len(tc.moves),
                               plan.move_params(tc.moves), tc.since))
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        seen = self._seen.setdefault(consumer, {})
        ensured = []
        missing: dict[str, int] = {}
        step = None
        try:
            with self._transaction():
                for step in steps:
                    if (step.plan.table, step.plan.schema) not in self._ready:
                        # Inside the transaction, between the rows before and after the schema
                        # change: rolled back with them.
                        self._ensure_step(step)
                        ensured.append((step.plan.table, step.plan.schema))
                    plan = step.plan
                    if step.truncate:
                        self._execute(plan.truncate_sql)
                    if step.deletes:
                        self._executemany(plan.delete_sql, step.deletes)
                    if step.upserts:
                        self._upsert(plan, step.upserts)
                    if step.updates or step.moves:
                        updated = sum(self._executemany(sql, params) for sql, params in step.updates + step.moves)
                        if updated < step.update_rows:
                            missing[plan.table] = missing.get(plan.table, 0) + step.update_rows - updated
                step = None
                for p in progress:
                    self._store_position(consumer, seen.get((p.topic, p.partition)), p, now)
                failpoints.reached("sink.applied")
        except self.db_errors as exc:
            # Check the tables again next time: the failure may be a table dropped or altered
            # behind our back. If so, say what differs rather than what the statement hit.
            self._ready.clear()
            if step is not None and self._sink_error(exc, step) is not None:  # not a lost connection...
                drift = self._changed_by_hand(step)
                if drift is not None:
                    raise drift from None
            self._raise_sink_error(exc, step)
        self._mark_ready(ensured)  # only now: a rolled-back CREATE/ALTER is gone again
        for p in progress:
            seen[(p.topic, p.partition)] = p
        return missing

    def record_skip(self, consumer: str, progress: PartitionProgress) -> None:
        """Store `progress.skipped_offset` (a record skipped on purpose) in the partition's row,
        creating the row as `progress` if there is none. Compare-and-set, like apply()."""
        seen = self._seen.setdefault(consumer, {})
        old = seen.get((progress.topic, progress.partition))
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        state = (progress.offset, format_lsn(progress.position.commit_lsn), format_lsn(progress.position.lsn),
                 progress.position.seq)
        try:
            with self._transaction():
                if old is None:
                    self._store_position(consumer, None, progress, now)
                changed = self._executemany(self.dialect.skip_position(), [
                    (progress.offset, progress.skipped_offset, now, consumer, progress.topic, progress.partition, *state)])
                if changed != 1:
                    raise SinkConflictError(
                        f"the stored position of consumer {consumer} for {progress.topic}[{progress.partition}] "
                        f"changed under this process: another process applies the same sink; nothing was skipped")
        except self.db_errors as exc:
            self._raise_sink_error(exc, None)
        seen[(progress.topic, progress.partition)] = progress

    def _store_position(self, consumer: str, old: PartitionProgress | None, new: PartitionProgress, now: str) -> None:
        """Compare-and-set one partition's position, inside the apply transaction."""
        state = (new.offset, format_lsn(new.position.commit_lsn), format_lsn(new.position.lsn), new.position.seq)
        added = (*(new.origin or (None, None)), new.commit_events)
        key = (consumer, new.topic, new.partition)
        if old is None:
            changed = self._executemany(self.dialect.insert_position(), [(*key, *state, *added, now)])
        else:
            seen = (old.offset, format_lsn(old.position.commit_lsn), format_lsn(old.position.lsn), old.position.seq)
            changed = self._executemany(self.dialect.update_position(), [(*state, *added, now, *key, *seen)])
        if changed != 1:
            # Raised inside the transaction: the rows of this batch are rolled back with it.
            last = f"offset {old.offset}, position {old.position}" if old else "no position"
            raise SinkConflictError(
                f"the stored position of consumer {consumer} for {new.topic}[{new.partition}] is no longer "
                f"the one this process last saw ({last}): another process applies the same sink to "
                f"{self.description}; nothing of this batch was written"
            )

    def _prepare_positions(self) -> None:
        """Create the positions table, or add the columns an earlier release did not have."""
        with self._transaction():
            self._execute(self.dialect.create_positions())
            self._execute(self.dialect.create_columns_record())
            have = {self._fold(c) for c in self._existing_columns(POSITIONS_TABLE) or ()}
            for name in ADDED_COLUMNS:
                if self._fold(name) not in have:
                    q = self.dialect.quote
                    self._execute(
                        f"ALTER TABLE {q(POSITIONS_TABLE)} ADD COLUMN {q(name)} {self.dialect.added_column_type(name)}"
                    )

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared machinery -------------------------------------------------------------------------

    def _plan(self, table: str, schema: TableSchema) -> TablePlan:
        plan = self._plans.get((table, schema))
        if plan is None:
            plan = self._plans[(table, schema)] = self.dialect.plan(table, schema)
        return plan

    def _ensure_step(self, step: _Step) -> None:
        """Make the step's table match its schema; the step then also writes NULL into the kept
        columns the source dropped."""
        plan = step.plan
        try:
            kept = self._ensure(plan)
        except SinkError as exc:
            if step.since is None:
                raise
            raise SinkError(f"{step.since}: {exc}") from None
        upsert_sql = self.dialect.upsert(plan.table, plan.columns, plan.schema.key, kept)
        if upsert_sql != plan.upsert_sql:
            plan = replace(plan, upsert_sql=upsert_sql)
            self._plans[(plan.table, plan.schema)] = step.plan = plan

    def _upsert(self, plan: TablePlan, rows: list[tuple]) -> None:
        """Insert or replace full rows (converted parameters), inside the apply transaction."""
        self._executemany(plan.upsert_sql, rows)

    def _changed_by_hand(self, step: _Step) -> SinkError | None:
        """After a failed apply: the named stop :meth:`_ensure` gives for the step's table, if it
        was changed by hand since the sink last checked it. Only looks: rolled back."""
        try:
            with self._transaction():
                self._ensure_step(step)
                raise _LookedOnly
        except SinkError as exc:
            return exc
        except (_LookedOnly, *self.db_errors):
            return None

    def _mark_ready(self, ensured: list[tuple[str, TableSchema]]) -> None:
        # A table just changed to one schema no longer matches the others it was ready for.
        last = {table: (table, schema) for table, schema in ensured}
        self._ready = {ready for ready in self._ready if ready[0] not in last}
        self._ready.update(last.values())

    def _ensure(self, plan: TablePlan) -> tuple[str, ...]:
        """Make the table match the plan's schema, inside the caller's transaction: create it, or
        apply the source's schema changes (see README, Schema evolution) after checking that the
        table still is what the sink made of it. Returns the kept columns the source dropped."""
        table, schema, dialect = plan.table, plan.schema, self.dialect
        actual = self._existing_types(table)
        recorded = [_Recorded(*row) for row in self._query(dialect.select_columns_record(), (table,))]
        if actual is None:
            self._execute(dialect.create_table(table, schema))
            self._write_record(table, [_Recorded.of(c, dialect.column_type(c)) for c in schema.columns])
            return ()
        # A kept column of a source that dropped it may go by hand: nothing of the source is lost.
        recorded = [r for r in recorded if not r.kept or self._fold(r.column_name) in actual]
        matches = self._matches(schema, recorded)
        for column, r in matches:
            if column.name in schema.key and r is None and self._fold(column.name) not in actual:
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
            have = actual.get(self._fold(r.column_name))
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
        record: list[_Recorded] = []
        kept: list[str] = []
        new_names = {self._fold(c.name) for c, r in matches if r is None}
        for r in recorded:
            if id(r) in matched:
                continue
            if self._fold(r.column_name) in new_names:
                # Dropped and added again under the same name in the source (a new attnum): the
                # target column is replaced, as the source's was.
                self._execute(dialect.drop_column(table, r.column_name))
                del actual[self._fold(r.column_name)]
            elif r.kept or self.on_column_drop == "keep":  # dropped in the source: it stays, NULL from now on
                record.append(r._replace(kept=1))
                kept.append(r.column_name)
            else:
                self._execute(dialect.drop_column(table, r.column_name))
        for position, (column, r) in enumerate(matches, 1):
            target_type = dialect.column_type(column)
            if r is None:
                if self._fold(column.name) not in actual:
                    self._execute(dialect.add_column(table, column))
                else:
                    target_type = actual[self._fold(column.name)]  # made before the record existed: adopt
                record.append(_Recorded.of(column, target_type))
                continue
            if r.column_name != column.name:
                self._execute(dialect.rename_column(table, r.column_name, column.name))
            have = actual[self._fold(r.column_name)]
            if not dialect.same_type(have, target_type):
                if column.name not in schema.key and not keeps_values(r.source_type, column.type):
                    # The source rewrote the column (e.g. ALTER ... TYPE integer USING length(d)) and
                    # its connector re-reads the table: no old value stays, the r events refill it;
                    # also where the target could hold the old values (SQLite INTEGER -> TEXT): they
                    # are not the source's any more.
                    for sql in dialect.rewrite_column(table, column, target_type):
                        self._execute(sql)
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
                        self._execute(sql)
            record.append(_Recorded.of(column, target_type, r.created_as))
        self._write_record(table, record)
        return tuple(kept)

    def _matches(self, schema: TableSchema, recorded: list["_Recorded"]) -> list[tuple[Column, "_Recorded | None"]]:
        """Each schema column with the recorded target column that holds it (None: a new column).

        A column is the same column as a recorded one with the same attnum (whatever its name now:
        a RENAME), else with the same name when either side has no attnum (older connectors). A
        name whose attnum changed is a column dropped and added again: a new column. A kept column
        (dropped in the source) that comes back is the same column again: events of an older shape
        after newer ones (a replay from an earlier position) never cost the values it holds.
        """
        by_attnum = {r.attnum: r for r in recorded if r.attnum is not None}
        by_name = {self._fold(r.column_name): r for r in recorded}
        out = []
        for column in schema.columns:
            r = by_attnum.get(column.attnum) if column.attnum is not None else None
            if r is None:
                same_name = by_name.get(self._fold(column.name))
                if same_name is not None and (same_name.attnum is None or column.attnum is None):
                    r = same_name
            out.append((column, r))
        return out

    def _write_record(self, table: str, record: list["_Recorded"]) -> None:
        self._execute(self.dialect.delete_columns_record(), (table,))
        if record:
            self._executemany(self.dialect.insert_columns_record(), [(table, *r) for r in record])

    def _fold(self, name: str) -> str:
        """The form in which the database compares identifiers."""
        return name

    def _raise_sink_error(self, exc: Exception, step: _Step | None) -> NoReturn:
        error = self._sink_error(exc, step)
        if error is None:
            raise exc  # not about the data (connection lost, disk full...): the caller decides
        raise error from None  # not chained: the driver's message may quote the value

    # -- per driver -------------------------------------------------------------------------------

    @abstractmethod
    def _transaction(self) -> ContextManager[Any]:
        """Commit on normal exit, roll back on exception."""

    @abstractmethod
    def _execute(self, sql: str, params: tuple = ()) -> None: ...

    @abstractmethod
    def _executemany(self, sql: str, params: list[tuple]) -> int:
        """Run the statement once per parameter tuple; return the number of rows changed."""

    @abstractmethod
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]: ...

    @abstractmethod
    def _existing_columns(self, table: str) -> list[str] | None:
        """Column names of the table in the default schema, or None if there is no such table."""

    @abstractmethod
    def _existing_types(self, table: str) -> dict[str, str] | None:
        """Folded column name -> column type as :meth:`Dialect.column_type` writes it, or None if
        there is no such table."""

    @abstractmethod
    def _sink_error(self, exc: Exception, step: _Step | None) -> SinkError | None:
        """A driver error as SinkError when the data caused it, else None. Never quotes values."""


# --------------------------------------------------------------------------------------------------
# PostgreSQL

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
        self.description = redact(url)
        self._prepare_positions()

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

    def apply(self, consumer: str, changes: list[TableChanges], progress: list[PartitionProgress]) -> dict[str, int]:
        try:
            try:
                missing = self._apply_staging(consumer, changes, progress,
                                              self.STAGE_FROM_ROWS if self._may_stage else None)
            except _StagedTwice:
                # Two rows of the batch are one row to PostgreSQL (keys equal in the column type but
                # not in the event: 1.0 and 1.00...): nothing was written; again, row by row, in order.
                missing = self._apply_staging(consumer, changes, progress, None)
            except _MayNotStage:
                log.warning("target %s: the role may not create temporary tables (TEMPORARY privilege): upserts "
                            "go row by row, which is slower", self.description)
                self._may_stage = False
                missing = self._apply_staging(consumer, changes, progress, None)
        except BaseException:
            self._staged.clear()  # rolled back, or the connection is gone: made again on next use
            raise
        self._staged |= self._staging  # committed
        return missing

    def _apply_staging(self, consumer: str, changes: list[TableChanges], progress: list[PartitionProgress],
                       stage_from_rows: int | None) -> dict[str, int]:
        self._staging, self._stage_from_rows = set(), stage_from_rows
        return super().apply(consumer, changes, progress)

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


class _LookedOnly(Exception):
    """Rolls back a transaction that only looked."""


class _Recorded(NamedTuple):
    """One row of the columns record (:data:`cdc.sink.dialects.base.COLUMNS_TABLE`), without the table name."""

    column_name: str
    attnum: int | None
    source_type: str
    target_type: str
    kept: int
    created_as: str

    @classmethod
    def of(cls, column: Column, target_type: str, created_as: str | None = None) -> "_Recorded":
        return cls(column.name, column.attnum, column.type, target_type, 0, created_as or column.name)


def _param_text(value: Any) -> str:
    """A psycopg parameter as PostgreSQL input text (for the failure diagnosis only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    return str(value)


# --------------------------------------------------------------------------------------------------
# SQLite

class SqliteTarget(Target):
    dialect = SqliteDialect()
    db_errors = (sqlite3.Error,)

    def __init__(self, path: Path):
        super().__init__()
        # isolation_level=None: no implicit transactions, _transaction() issues BEGIN/COMMIT itself.
        # check_same_thread=False: the async runner may call from a worker thread (never two at once).
        # The directory is never created: the pipeline file names an existing one (checked at load).
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SinkError(f"cannot open the SQLite target {path}: {exc}") from None
        self.path = path
        self.description = str(path)
        self._lock_files: list[Any] = []
        self._prepare_positions()

    def close(self) -> None:
        self._conn.close()
        for f in self._lock_files:
            f.close()  # releases the lock
        self._lock_files.clear()

    def lock(self, consumer: str) -> str | None:
        # SQLite has no session locks. An OS lock (flock) on a side file is held as long as this
        # process has the file open and is released by the OS when the process dies, even on
        # SIGKILL, so a crash never leaves a stale lock to clean up by hand (a lock row in the
        # database would need a liveness check of its holder). Like SQLite's own locking, it needs
        # a local file system.
        lock_path = self.path.with_name(f"{self.path.name}.{consumer}.lock")
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            return holder or "another process"
        f.truncate(0)
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock_files.append(f)
        return None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: no SQLITE_BUSY half-way through a batch.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:  # some errors (disk full...) already rolled back
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _execute(self, sql: str, params: tuple = ()) -> None:
        self._conn.execute(sql, params)

    def _executemany(self, sql: str, params: list[tuple]) -> int:
        return self._conn.executemany(sql, params).rowcount  # summed over the statements

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def _existing_columns(self, table: str) -> list[str] | None:
        names = [name for (name,) in self._query("SELECT name FROM pragma_table_info(?)", (table,))]
        return names or None  # an SQLite table always has a column

    def _existing_types(self, table: str) -> dict[str, str] | None:
        rows = self._query("SELECT name, type FROM pragma_table_info(?)", (table,))
        return {self._fold(name): type_ for name, type_ in rows} or None

    def _fold(self, name: str) -> str:
        return ascii_lower(name)  # SQLite identifiers are ASCII case-insensitive

    def _sink_error(self, exc: Exception, step: _Step | None) -> SinkError | None:
        message = str(exc)
        schema_problem = isinstance(exc, sqlite3.OperationalError) and (
            message.startswith("no such") or "has no column" in message or "duplicate column" in message
        )
        data_problem = isinstance(
            exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError, sqlite3.InterfaceError)
        )
        if not (schema_problem or data_problem):
            return None  # locked, I/O, disk full: not about the data
        # SQLite's messages name tables and columns ('UNIQUE constraint failed: t.c'), not values.
        table = step.plan.table if step else POSITIONS_TABLE
        where = f'table "{table}"'
        if step is not None:
            failed = re.findall(r"(?:^|[ ,])" + re.escape(table) + r"\.([^,]+)", message.partition(": ")[2])
            for name in failed:
                if name in step.plan.columns:
                    col = step.plan.schema.column(name)
                    where += f', column "{name}" (kind {col.kind}{"[]" if col.array else ""})'
                    break
        # Constraint and type errors (CHECK, NOT NULL, UNIQUE, a STRICT column's type) are the row's.
        error = RowRejectedError if step is not None and data_problem else SinkError
        return error(f"{where}: SQLite rejected the change: {message}")


# --------------------------------------------------------------------------------------------------


def open_target(url: str, *, sqlite_path: Path | None = None,
                on_column_drop: Literal["keep", "drop"] = "keep") -> Target:
    target = _open_target(url, sqlite_path=sqlite_path)
    target.on_column_drop = on_column_drop
    return target


def _open_target(url: str, *, sqlite_path: Path | None = None) -> Target:
    """Connect to the target named by ``url``; for SQLite, ``sqlite_path`` is the resolved file.

    A target that cannot be reached or opened raises TargetError naming it without its password.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("postgresql", "postgres"):
        where = redact(url)
        try:
            return PostgresTarget(url)
        except psycopg.Error as exc:
            raise TargetError(f"cannot use target {where}: {scrub(one_line(exc), url)}") from None
    if scheme == "sqlite":
        if sqlite_path is None:
            # 'sqlite:///relative.db', 'sqlite:////absolute.db' (config normally resolves this)
            rest = url[len("sqlite:"):]
            if not rest.startswith("///") or len(rest) == 3:
                raise SinkError("a SQLite target URL looks like sqlite:///path/to/file.db")
            sqlite_path = Path(rest[3:])
        try:
            return SqliteTarget(Path(sqlite_path))
        except (sqlite3.Error, OSError) as exc:
            raise TargetError(f"cannot use target {sqlite_path}: {scrub(one_line(exc), url)}") from None
    # Name only the scheme: the rest of a URL may hold a password.
    what = f"scheme {scheme!r}" if scheme else "URL without a scheme"
    raise SinkError(f"unsupported target {what}: use postgresql://... or sqlite:///...")


def _lock_key(consumer: str) -> int:
    """A stable signed 64-bit advisory lock key for a consumer name."""
    digest = hashlib.blake2b(f"cdc sink {consumer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
