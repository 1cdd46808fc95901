"""SQLite backend: the dialect (types, values, DDL) and the target (connection, file lock).

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

import fcntl
import math
import os
import re
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlglot import exp

from cdc.errors import RowRejectedError, SinkError, TargetError
from cdc.events.schema import Column
from cdc.redact import one_line, scrub
from cdc.sink.backends.base import Target, _Step
from cdc.sink.backends.sql import POSITIONS_TABLE, Dialect
from cdc.sink.values import Converter, Verbatim, sqlite_converter, sqlite_verbatim
from cdc.sqlnames import ascii_lower

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

    def verbatim(self, column: Column, *, key: bool) -> Verbatim | None:
        return sqlite_verbatim(column, key=key)

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


# --------------------------------------------------------------------------------------------------
# The backend: connection, file lock, error diagnosis

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
        # Write-ahead logging: the services reading the replica never block the sink's commits (nor it
        # their reads), and a commit appends to the log instead of rewriting pages through a journal.
        # synchronous=NORMAL: no fsync at each commit. A power loss may undo the last commits, rows and
        # positions alike (they commit together), and the sink applies them again from Kafka.
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            self._conn.close()
            raise SinkError(f"cannot use the SQLite target {path}: {exc}") from None
        self._prepare_positions()

    @classmethod
    def connect(cls, url: str, *, sqlite_path: Path | None = None) -> "SqliteTarget":
        if sqlite_path is None:
            # 'sqlite:///relative.db', 'sqlite:////absolute.db' (config normally resolves this)
            rest = url[len("sqlite:"):]
            if not rest.startswith("///") or len(rest) == 3:
                raise SinkError("a SQLite target URL looks like sqlite:///path/to/file.db")
            sqlite_path = Path(rest[3:])
        try:
            return cls(Path(sqlite_path))
        except (sqlite3.Error, OSError) as exc:
            raise TargetError(f"cannot use target {sqlite_path}: {scrub(one_line(exc), url)}") from None

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
