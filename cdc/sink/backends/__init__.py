"""Sink backends: one module per target database, behind the one interface of :mod:`.base`.

    base.py         Target: what the sink asks of a database (lock, positions, apply, ...) and the
                    shared apply machinery; TableChanges / PartitionProgress, what it is given
    sql.py          Dialect and TablePlan: SQL text and value converters built with sqlglot, no connection
    schema_sync.py  the target table following the source's schema changes (cdc_sink_columns)
    postgres.py     PostgresDialect + PostgresTarget (psycopg 3)
    sqlite.py       SqliteDialect + SqliteTarget (sqlite3)

A new database (MySQL/MariaDB is next) is one new module here holding its Dialect and its Target
subclass (see :class:`~cdc.sink.backends.base.Target` for the methods to implement), plus its URL
schemes in :data:`BACKENDS`; nothing else in the sink changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cdc.errors import SinkError
from cdc.sink.backends.base import HistoryId, PartitionProgress, TableChanges, Target
from cdc.sink.backends.postgres import PostgresDialect, PostgresTarget
from cdc.sink.backends.sqlite import SqliteDialect, SqliteTarget

__all__ = ["BACKENDS", "HistoryId", "PartitionProgress", "PostgresDialect", "PostgresTarget", "SqliteDialect",
           "SqliteTarget", "TableChanges", "Target", "open_target"]

# URL scheme -> the backend that opens it.
BACKENDS: dict[str, type[Target]] = {"postgresql": PostgresTarget, "postgres": PostgresTarget, "sqlite": SqliteTarget}


def open_target(url: str, *, sqlite_path: Path | None = None,
                on_column_drop: Literal["keep", "drop"] = "keep") -> Target:
    """Connect to the target named by ``url``; for SQLite, ``sqlite_path`` is the resolved file.

    A target that cannot be reached or opened raises TargetError naming it without its password.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    backend = BACKENDS.get(scheme)
    if backend is None:
        # Name only the scheme: the rest of a URL may hold a password.
        what = f"scheme {scheme!r}" if scheme else "URL without a scheme"
        raise SinkError(f"unsupported target {what}: use postgresql://... or sqlite:///...")
    target = backend.connect(url, sqlite_path=sqlite_path)
    target.on_column_drop = on_column_drop
    return target
