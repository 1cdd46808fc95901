"""The database side of the sink: apply batches of row state to a target database.

A batch is a list of :class:`TableChanges` (per target table: truncate, deletes by key, upserts of
full rows) plus the sink's :class:`PartitionProgress` per Kafka topic partition. :meth:`Target.apply`
writes both in ONE transaction, so after a crash the target's rows and its recorded positions
always agree: the sink resumes from :meth:`Target.load_positions` and re-applies nothing twice
(re-applying would be harmless anyway: every write is an idempotent upsert/delete by key).

Targets: PostgreSQL (``postgresql://`` / ``postgres://`` URLs, psycopg 3) and SQLite (``sqlite:///``
URLs). Tables are created on first use with a primary key on the source key, and grow new columns
when the source schema does (columns are never dropped or retyped). How source types map to target
columns and how values are stored is documented per dialect:
:mod:`cdc.sink.dialects.postgres`, :mod:`cdc.sink.dialects.sqlite`.

Positions live in ``cdc_sink_positions`` (created on open)::

    consumer TEXT, topic TEXT, partition INTEGER, kafka_offset BIGINT,
    commit_lsn TEXT ('16/B374D848'), lsn TEXT, seq BIGINT, updated_at (UTC timestamp),
    PRIMARY KEY (consumer, topic, partition)

Errors caused by the data (a value that does not fit its column, a table without a key column...)
raise :class:`~cdc.errors.SinkError` naming the table, the column and the column's kind, never the
value: rows may hold private data and error messages end up in logs.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, NoReturn

import psycopg

from cdc.errors import SinkError
from cdc.events.schema import TableSchema
from cdc.lsn import Position, format_lsn, parse_lsn
from cdc.redact import one_line, redact, scrub
from cdc.sink.dialects import POSITIONS_TABLE, Dialect, PostgresDialect, SqliteDialect, TablePlan
from cdc.sqlnames import ascii_lower


@dataclass
class TableChanges:
    table: str  # target table name (unqualified; created in the connection's default schema)
    schema: TableSchema  # type info of the source table
    truncate: bool  # empty the table before applying the rows below
    deletes: list[dict]  # rows in event-JSON form holding at least the key columns: delete by key
    upserts: list[dict]  # full rows in event-JSON form: insert, or replace the row with the same key


@dataclass(frozen=True)
class PartitionProgress:
    topic: str
    partition: int
    offset: int  # Kafka offset of the last message consumed
    position: Position  # position of the last event applied (or skipped)


@dataclass
class _Step:
    """One table's share of an apply, values already converted to driver parameters."""

    plan: TablePlan
    truncate: bool = False
    deletes: list[tuple] = field(default_factory=list)
    upserts: list[tuple] = field(default_factory=list)


class Target(ABC):
    """A target database. Not thread-safe: one sink runner drives it from one task at a time."""

    dialect: Dialect
    db_errors: tuple[type[Exception], ...]  # the driver's exceptions

    def __init__(self) -> None:
        self._plans: dict[tuple[str, TableSchema], TablePlan] = {}
        self._ready: set[tuple[str, TableSchema]] = set()  # tables known to match their schema

    # -- public API -------------------------------------------------------------------------------

    def ensure_table(self, table: str, schema: TableSchema) -> None:
        """Create the table, or add the columns it lacks. Free after the first call per schema."""
        if (table, schema) in self._ready:
            return
        step = _Step(self._plan(table, schema))
        try:
            with self._transaction():
                self._ensure(step.plan)
        except self.db_errors as exc:
            self._raise_sink_error(exc, step)
        self._ready.add((table, schema))

    def load_positions(self, consumer: str) -> dict[tuple[str, int], PartitionProgress]:
        progress = {}
        for topic, partition, offset, commit_lsn, lsn, seq in self._query(self.dialect.select_positions(), (consumer,)):
            position = Position(parse_lsn(commit_lsn), parse_lsn(lsn), int(seq))
            p = PartitionProgress(topic, int(partition), int(offset), position)
            progress[(p.topic, p.partition)] = p
        return progress

    def apply(self, consumer: str, changes: list[TableChanges], progress: list[PartitionProgress]) -> None:
        """Write all changes and the progress rows in one transaction; on error roll back and raise."""
        # Convert every value before touching the database: bad values fail with nothing to undo.
        steps = []
        for tc in changes:
            plan = self._plan(tc.table, tc.schema)
            steps.append(_Step(plan, tc.truncate, plan.delete_params(tc.deletes), plan.upsert_params(tc.upserts)))
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        positions = [
            (consumer, p.topic, p.partition, p.offset, format_lsn(p.position.commit_lsn),
             format_lsn(p.position.lsn), p.position.seq, now)
            for p in progress
        ]
        ensured = []
        step = None
        try:
            with self._transaction():
                for step in steps:
                    plan = step.plan
                    if (plan.table, plan.schema) not in self._ready:
                        self._ensure(plan)  # inside the transaction: rolled back with the rows
                        ensured.append((plan.table, plan.schema))
                    if step.truncate:
                        self._execute(plan.truncate_sql)
                    if step.deletes:
                        self._executemany(plan.delete_sql, step.deletes)
                    if step.upserts:
                        self._executemany(plan.upsert_sql, step.upserts)
                step = None
                if positions:
                    self._executemany(self.dialect.upsert_position(), positions)
        except self.db_errors as exc:
            # Check the tables again next time: the failure may be a table dropped or altered
            # behind our back.
            self._ready.clear()
            self._raise_sink_error(exc, step)
        self._ready.update(ensured)  # only now: a rolled-back CREATE/ALTER is gone again

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

    def _ensure(self, plan: TablePlan) -> None:
        """Create or extend the table, inside the caller's transaction."""
        existing = self._existing_columns(plan.table)
        if existing is None:
            self._execute(self.dialect.create_table(plan.table, plan.schema))
            return
        have = {self._fold(name) for name in existing}
        for key in plan.schema.key:
            if self._fold(key) not in have:
                raise SinkError(
                    f'table "{plan.table}" exists but has no column "{key}", a key column of '
                    f"{plan.schema.schema}.{plan.schema.table}: drop or rename the table, or map the "
                    "source to another table"
                )
        for column in plan.schema.columns:
            if self._fold(column.name) not in have:
                self._execute(self.dialect.add_column(plan.table, column))
                have.add(self._fold(column.name))

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
    def _executemany(self, sql: str, params: list[tuple]) -> None: ...

    @abstractmethod
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]: ...

    @abstractmethod
    def _existing_columns(self, table: str) -> list[str] | None:
        """Column names of the table in the default schema, or None if there is no such table."""

    @abstractmethod
    def _sink_error(self, exc: Exception, step: _Step | None) -> SinkError | None:
        """A driver error as SinkError when the data caused it, else None. Never quotes values."""


# --------------------------------------------------------------------------------------------------
# PostgreSQL

# SQLSTATE classes caused by the data or the target's schema, not by the connection or server.
_DATA_CLASSES = {"22": "data exception", "23": "integrity constraint violation",
                 "42": "schema or privilege problem", "0A": "feature not supported"}


class PostgresTarget(Target):
    dialect = PostgresDialect()
    db_errors = (psycopg.Error,)

    def __init__(self, url: str):
        super().__init__()
        # autocommit: every unit of work is an explicit conn.transaction() block.
        try:
            self._conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:  # one line, and never the password (libpq may quote the URL)
            raise SinkError(f"cannot connect to the target {redact(url)}: {scrub(one_line(exc), url)}") from None
        self._cur = self._conn.cursor()
        with self._transaction():
            self._execute(self.dialect.create_positions())

    def close(self) -> None:
        self._conn.close()

    def _transaction(self) -> ContextManager[Any]:
        return self._conn.transaction()

    # Parameters are always passed (maybe empty) so psycopg always reads '%%' as '%': identifiers
    # are quoted with % doubled, see PostgresDialect.quote.
    def _execute(self, sql: str, params: tuple = ()) -> None:
        self._cur.execute(sql, params)

    def _executemany(self, sql: str, params: list[tuple]) -> None:
        self._cur.executemany(sql, params)  # psycopg 3 pipelines the statements: one round trip

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
        return SinkError(f"{where}: PostgreSQL rejected the change: {message}{code}")

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
        with self._transaction():
            self._execute(self.dialect.create_positions())

    def close(self) -> None:
        self._conn.close()

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

    def _executemany(self, sql: str, params: list[tuple]) -> None:
        self._conn.executemany(sql, params)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._conn.execute(sql, params).fetchall()

    def _existing_columns(self, table: str) -> list[str] | None:
        names = [name for (name,) in self._query("SELECT name FROM pragma_table_info(?)", (table,))]
        return names or None  # an SQLite table always has a column

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
        return SinkError(f"{where}: SQLite rejected the change: {message}")


# --------------------------------------------------------------------------------------------------


def open_target(url: str, *, sqlite_path: Path | None = None) -> Target:
    """Connect to the target named by ``url``; for SQLite, ``sqlite_path`` is the resolved file."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresTarget(url)
    if scheme == "sqlite":
        if sqlite_path is None:
            # 'sqlite:///relative.db', 'sqlite:////absolute.db' (config normally resolves this)
            rest = url[len("sqlite:"):]
            if not rest.startswith("///") or len(rest) == 3:
                raise SinkError("a SQLite target URL looks like sqlite:///path/to/file.db")
            sqlite_path = Path(rest[3:])
        return SqliteTarget(Path(sqlite_path))
    # Name only the scheme: the rest of a URL may hold a password.
    what = f"scheme {scheme!r}" if scheme else "URL without a scheme"
    raise SinkError(f"unsupported target {what}: use postgresql://... or sqlite:///...")
