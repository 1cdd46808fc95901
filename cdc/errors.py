"""Errors a user can act on, and the one place that decides what a failure means for the process.

Every error of cdc's own is a :class:`CdcError` that says two things, as class attributes:

- ``failed``: what failed (:class:`Failed`: the source, the broker, the target, the configuration,
  or the data itself). The classes below are grouped by it; raisers pick the class, never the code.
- ``kind``: what a restart can do about it (:class:`Kind`). The kind alone fixes the process's exit
  code (README's table: 1 runtime, 2 bad input or an unfixable source problem, 3 source connection
  lost, 4 would lose data, 5 already running) and whether waiting and trying again may get past it.

:func:`exit_code` and :func:`is_transient` are the two questions asked of any exception, ours or a
driver's (psycopg, sqlite3, aiokafka, sockets); the retry loops (cdc.retry) and the CLI ask them here.
Each message names the place: file:line, table and column, or LSN.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from enum import Enum

import psycopg
from aiokafka import errors as kafka_errors


class Failed(Enum):
    """What failed: where the user looks first."""

    SOURCE = "source"  # the source PostgreSQL: its settings, its slot, its connection, its history
    BROKER = "broker"  # Kafka: reaching it, logging in, what its topics hold
    TARGET = "target"  # a sink's target database: reaching it, its tables, who else writes them
    CONFIG = "config"  # the pipeline YAML
    DATA = "data"  # one message, event or row that cannot be read, published or applied as it is
    RUNTIME = "runtime"  # cdc itself, or a place the raiser does not single out


class Kind(Enum):
    """What a restart can do about an error. Its value is the exit code; `retriable` says whether
    waiting and trying again may get past it (None: only if what the error was raised from may)."""

    FAULT = 1  # a failure to look into; transient when its cause is (a lost connection under it)
    BAD_INPUT = 2  # the pipeline, the source or the credentials must change: a restart cannot fix it
    CONNECTION_LOST = 3  # the source went away; nothing is lost, a restart resumes where it was
    WOULD_LOSE_DATA = 4  # going on would lose or skip changes: stops for a deliberate decision
    ALREADY_RUNNING = 5  # another process does this work: this one changed nothing

    @property
    def exit_code(self) -> int:
        return self.value

    @property
    def retriable(self) -> bool | None:
        return {Kind.FAULT: None, Kind.CONNECTION_LOST: True}.get(self, False)


class CdcError(Exception):
    """Base for errors that stop cdc with a message meant for the user (no traceback)."""

    failed = Failed.RUNTIME
    kind = Kind.FAULT

    @property
    def exit_code(self) -> int:
        return self.kind.exit_code


# --------------------------------------------------------------------------------------------------
# The configuration


class ConfigError(CdcError):
    """The pipeline YAML is wrong. Carries every problem found, each as 'file:line: message'."""

    failed = Failed.CONFIG
    kind = Kind.BAD_INPUT

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------------
# The source


class SourceError(CdcError):
    """The source PostgreSQL cannot serve the pipeline as configured (wal_level, tables, identity...)."""

    failed = Failed.SOURCE
    kind = Kind.BAD_INPUT


class SourceLostError(CdcError):
    """The connection to the source PostgreSQL ended (a restart, a network failure). Nothing is lost:
    the slot keeps every change not yet confirmed, so restarting cdc resumes where it was."""

    failed = Failed.SOURCE
    kind = Kind.CONNECTION_LOST


class WouldLoseDataError(CdcError):
    """cdc cannot go on without losing or skipping changes (a dropped or invalidated slot, a source
    whose history changed, topics that lost their events). It stops, and the message names the
    deliberate way forward (a flag that accepts the loss, a re-snapshot)."""

    failed = Failed.SOURCE
    kind = Kind.WOULD_LOSE_DATA


class AlreadyRunningError(CdcError):
    """Another process runs the same connector (it holds the slot). This one changed nothing."""

    failed = Failed.SOURCE
    kind = Kind.ALREADY_RUNNING


# --------------------------------------------------------------------------------------------------
# The broker


class PublishError(CdcError):
    """Kafka did not take an event. Nothing past it was confirmed to PostgreSQL: a restart resends it."""

    failed = Failed.BROKER


class KafkaLoginError(PublishError):
    """Kafka refused cdc for good: SASL credentials or mechanism, or a broker certificate that does
    not verify. A restart cannot fix it (exit 2): the pipeline's kafka.security must change."""

    kind = Kind.BAD_INPUT


# --------------------------------------------------------------------------------------------------
# The target (a sink's errors: `except SinkError` catches every stop of a sink)


class SinkError(CdcError):
    """A sink cannot apply an event (schema mismatch, bad event). Names the table and column."""

    failed = Failed.TARGET


class TargetError(SinkError):
    """A sink's target database cannot be reached or used (connection, missing database, lost
    connection). Names the sink and the target without its password."""


class TargetLoginError(TargetError):
    """The target refused the login (wrong password, unknown role, pg_hba.conf) or TLS failed (a
    certificate that does not verify): like the same problem on the source, a restart cannot fix
    it (exit 2)."""

    kind = Kind.BAD_INPUT


class SinkConflictError(SinkError):
    """Another process applies the same sink to the same target (lock held, or the stored positions
    changed under this one). Nothing was applied by this process."""

    kind = Kind.ALREADY_RUNNING


class SourceHistoryError(SinkError):
    """An event comes from another source history (another cluster, or a timeline that forked
    before what the sink already applied). Nothing was applied; `--accept-source-history` continues."""

    failed = Failed.SOURCE
    kind = Kind.WOULD_LOSE_DATA


class KafkaDataMissingError(SinkError):
    """Kafka no longer holds events the sink has not applied yet, or holds other events at the
    offsets the sink stored (a broker that lost its data, a re-created topic, retention)."""

    failed = Failed.BROKER
    kind = Kind.WOULD_LOSE_DATA


# --------------------------------------------------------------------------------------------------
# The data


class DecodeError(CdcError):
    """A pgoutput message could not be decoded. Names the LSN of the message."""

    failed = Failed.DATA


class EventRefusedError(PublishError):
    """One event can never be published as it is (too large for a Kafka request)."""

    failed = Failed.DATA


class RowRejectedError(SinkError):
    """The target refused a change for a reason in the data itself (a constraint violation, a value
    out of range or of an incompatible type: SQLSTATE classes 22 and 23, SQLite's constraint and
    type errors, a value the sink cannot convert), not for one about the connection or the server.
    A sink with `on_error: dlq` dead-letters the change; other sinks stop (exit 1)."""

    failed = Failed.DATA


# --------------------------------------------------------------------------------------------------
# What an exception means for the process


def exit_code(exc: BaseException) -> int:
    """The process's exit code when `exc` stops it: its kind's for ours, 1 (runtime) for any other."""
    return exc.kind.exit_code if isinstance(exc, CdcError) else Kind.FAULT.exit_code


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again can get past `exc`.

    Our own errors that say what a restart cannot fix (bad input, would lose data, already running)
    are fatal whatever caused them. Others are transient when they, or the driver error they were
    raised from (kept as __cause__ or __context__ even when printed `from None`), are."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CdcError):
            if current.kind.retriable is not None:
                return current.kind.retriable
        elif _driver_error_is_transient(current):
            return True
        current = current.__cause__ or current.__context__
    return False


# SQLSTATE classes and codes a later attempt can succeed at: connection exceptions (08), insufficient
# resources (53: too many connections, disk full), operator intervention (57: shutdown, restart,
# "the database system is starting up"), system errors (58), serialization failures and deadlocks.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_SQLSTATES = ("40001", "40P01")
# What SQLite says when another connection holds the lock past its busy timeout.
_SQLITE_TRANSIENT = ("database is locked", "database is busy")
_NO_DATABASE = re.compile(r'database "[^"]*" does not exist')
# aiokafka's words when no broker answered a metadata request with the cluster's brokers.
_NO_CLUSTER_METADATA = "Unable to get cluster metadata"


def _driver_error_is_transient(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.Error):
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate is None:  # libpq's own: the connection broke, or could not be made
            return isinstance(exc, psycopg.OperationalError) and not _connection_refused_for_good(str(exc))
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES
    if isinstance(exc, sqlite3.OperationalError):
        return any(text in str(exc) for text in _SQLITE_TRANSIENT)
    if isinstance(exc, kafka_errors.KafkaError):
        # Connection errors, time-outs, leader elections, not-enough-replicas: aiokafka marks them.
        # A metadata request no broker answered with its brokers (all silent, or one still rejoining
        # its cluster after a pause) is a plain KafkaError, told apart only by its text.
        return bool(getattr(exc, "retriable", False)) or isinstance(
            exc, (kafka_errors.KafkaConnectionError, kafka_errors.KafkaTimeoutError, kafka_errors.NodeNotReadyError)
        ) or (type(exc) is kafka_errors.KafkaError and _NO_CLUSTER_METADATA in str(exc))
    return isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError))


def _connection_refused_for_good(message: str) -> bool:
    """A server that answered a connection attempt and refused it for a reason a later attempt
    cannot get past: the login, TLS, or a database that does not exist."""
    return refused_for_good(message) or _NO_DATABASE.search(message) is not None


# How libpq words a connection refused for good: the server answered but refused the login, or TLS
# refused the server (its certificate does not verify or name the host) or the server refused a
# connection without TLS. libpq gives connection failures no SQLSTATE, so the text is all there is.
# These are the user's to fix (exit 2); a server that did not answer may come back (exit 3).
_REFUSED_FOR_GOOD = re.compile(
    r"password authentication failed|no password supplied|authentication failed|"
    r"role \S+ does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects connection|"
    r"permission denied for database|is not permitted to log in|"
    r"certificate verify failed|does not match host name|server does not support SSL|"
    r"root certificate file|certificate present, but not private key|private key file|"
    r"SSL is not enabled on the server|sslmode value",
)


def refused_for_good(message: str) -> bool:
    """Whether a connection failure's message says the login or the TLS handshake was refused (not:
    that the server could not be reached, or that the database does not exist)."""
    return _REFUSED_FOR_GOOD.search(message) is not None
