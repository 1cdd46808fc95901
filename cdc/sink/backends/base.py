"""The sink's backend interface (:class:`Target`): apply batches of row state to a target database.

A batch is a list of :class:`TableChanges` (per target table: truncate, deletes by key, upserts of
full rows) plus the sink's :class:`PartitionProgress` per Kafka topic partition. :meth:`Target.apply`
writes both in ONE transaction, so after a crash the target's rows and its recorded positions
always agree: the sink resumes from :meth:`Target.load_positions` and re-applies nothing twice
(re-applying would be harmless anyway: every write is an idempotent upsert/delete by key).

Targets: PostgreSQL (``postgresql://`` / ``postgres://`` URLs, psycopg 3) and SQLite (``sqlite:///``
URLs). Tables are created on first use with a primary key on the source key, and follow the source's
schema changes inside the apply transaction, between the rows around them
(:mod:`cdc.sink.backends.schema_sync`, README "Schema evolution"): new columns are added, renamed
ones (same attnum) renamed, retyped ones altered when the target can hold old and new values (else a
named stop), dropped ones kept or dropped per ``on_column_drop``. What the sink made of each table
is recorded in ``cdc_sink_columns``, so a table changed by hand is a named stop, never silently
repaired. How source types map to target columns and how values are stored is documented per
dialect: :mod:`cdc.sink.backends.postgres`, :mod:`cdc.sink.backends.sqlite`.

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
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Literal, NoReturn

from cdc import failpoints
from cdc.errors import SinkConflictError, SinkError
from cdc.events.schema import TableSchema
from cdc.lsn import Position, format_lsn, parse_position
from cdc.sink.backends.schema_sync import RecordedColumn, sync_table
from cdc.sink.backends.sql import ADDED_COLUMNS, POSITIONS_TABLE, Dialect, TablePlan

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


def _step(plan: TablePlan, tc: TableChanges) -> _Step:
    return _Step(plan, tc.truncate, plan.delete_params(tc.deletes), plan.upsert_params(tc.upserts),
                 plan.update_params(tc.updates), len(tc.updates) + len(tc.moves), plan.move_params(tc.moves), tc.since)


@dataclass(frozen=True)
class Prepared:
    """A batch's changes converted ahead of :meth:`Target.apply` (:meth:`Target.prepare`)."""

    changes: list[TableChanges]
    steps: list[_Step]


class Target(ABC):
    """A target database: the one interface between the sink and a database.

    The sink calls: :meth:`connect` (through ``open_target``), :meth:`lock`, :meth:`load_positions`, :meth:`created_names`,
    :meth:`ensure_table`, :meth:`prepare`, :meth:`apply`, :meth:`record_skip`, :meth:`close`.
    Everything except connect, lock and close is built here from the per-database primitives below,
    so a MySQL/MariaDB backend is one module with a :class:`~cdc.sink.backends.sql.Dialect` (types,
    quoting, upsert, DDL) and a subclass implementing: connect, lock, close, _transaction, _execute,
    _executemany, _query, _existing_columns, _existing_types and _sink_error (see postgres.py and
    sqlite.py). Not thread-safe: one sink runner drives it from one task at a time (:meth:`prepare`
    may run beside :meth:`apply`: it reads only what apply has made ready).
    """

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

    @classmethod
    @abstractmethod
    def connect(cls, url: str, *, sqlite_path: Path | None = None) -> "Target":
        """Open the target named by ``url`` (``sqlite_path``: the resolved file of a SQLite URL);
        TargetError naming it without its password if it cannot be reached or opened."""

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
        return {r.attnum: r.created_as for r in map(RecordedColumn._make, rows) if r.attnum is not None and not r.kept}

    def load_positions(self, consumer: str) -> dict[tuple[str, int], PartitionProgress]:
        progress = {}
        rows = self._query(self.dialect.select_positions(), (consumer,))
        for topic, partition, offset, commit_lsn, lsn, seq, system_id, timeline, commit_events, skipped in rows:
            position = parse_position(commit_lsn, lsn, seq)
            origin = (str(system_id), int(timeline)) if system_id is not None and timeline is not None else None
            p = PartitionProgress(topic, int(partition), int(offset), position, origin,
                                  None if commit_events is None else int(commit_events),
                                  None if skipped is None else int(skipped))
            progress[(p.topic, p.partition)] = p
        self._seen[consumer] = dict(progress)
        return progress

    def prepare(self, changes: list[TableChanges]) -> Prepared | None:
        """The changes converted for :meth:`apply` while the batch before them is applied; None where
        apply must convert them itself: a table it has not yet made to match its schema (the plan may
        change), or a value that does not convert (apply raises for it, after the batches before)."""
        plans = [self._plans.get(k) if (k := (tc.table, tc.schema)) in self._ready else None for tc in changes]
        try:
            return None if None in plans else Prepared(changes, [_step(plan, tc) for plan, tc in zip(plans, changes)])
        except Exception:
            return None

    def apply(self, consumer: str, changes: list[TableChanges], progress: list[PartitionProgress],
              prepared: Prepared | None = None) -> dict[str, int]:
        """Write all changes and the progress rows in one transaction; on error roll back and raise.
        `prepared`: :meth:`prepare` of the same changes, if it gave them.

        Returns, per table, how many partial rows found no row to update (the target lacks them).
        Raises SinkConflictError, having written nothing, if a stored position is no longer the one
        this process last loaded or wrote: another process applies the same consumer.
        """
        # Convert every value before touching the database: bad values fail with nothing to undo.
        if prepared is not None and prepared.changes is changes:
            steps = prepared.steps
        else:
            steps = [_step(self._plan(tc.table, tc.schema), tc) for tc in changes]
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
            kept = sync_table(self, plan)
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
        """After a failed apply: the named stop :func:`~cdc.sink.backends.schema_sync.sync_table` gives for the step's table, if it
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


class _LookedOnly(Exception):
    """Rolls back a transaction that only looked."""
