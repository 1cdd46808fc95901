"""The replication connection: slot management and the COPY_BOTH stream of pgoutput messages.

psycopg 3 has no replication API of its own, but a connection opened with ``replication=database``
runs replication commands, and after ``START_REPLICATION`` its libpq connection is in COPY_BOTH
mode: ``pgconn.get_copy_data`` reads XLogData/keepalive frames and ``pgconn.put_copy_data`` sends
standby status updates. We drive that non-blocking from asyncio by waiting on the socket.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import logging
from dataclasses import dataclass

import psycopg
from psycopg import pq

from cdc.errors import AlreadyRunningError, SourceError, SourceLostError, refused_for_good
from cdc.lsn import format_lsn, parse_lsn
from cdc.redact import one_line, redact, scrub
from cdc.source.postgres.frames import Keepalive, XLogData, parse_copy_frame, standby_status_update
from cdc.sqlnames import quote_ident

log = logging.getLogger(__name__)

# Values in pgoutput's text format are printed with the walsender session's settings: pin the ones
# the value loaders rely on (ISO dates, exact floats, UTC, ISO-8601 intervals, hex bytea, money in
# the C locale's form). client_encoding: the server converts text from the database's encoding
# (LATIN1...) to UTF-8, which is what events carry; with SQL_ASCII it passes the bytes through.
SESSION_OPTIONS = (
    "-c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 -c TimeZone=UTC -c extra_float_digits=3"
    " -c bytea_output=hex -c lc_monetary=C -c client_encoding=UTF8"
)


@dataclass(frozen=True, slots=True)
class SlotState:
    name: str
    plugin: str
    confirmed_flush_lsn: int
    created: bool
    active_pid: int | None = None  # the walsender streaming it now, if any
    wal_status: str | None = None  # 'lost': PostgreSQL removed WAL the slot still needed
    holder: str | None = None  # "cdc pid N on HOST": the cdc process streaming it (its application_name)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def source_failure(context: str, exc: psycopg.Error, dsn: str | None = None) -> SourceError | SourceLostError:
    """A driver error on a source connection as one of ours: lost (exit 3: restart when the server
    is back) when the connection broke or the server shuts down (SQLSTATE class 08 or 57, or none:
    libpq's own), a source problem otherwise (exit 2). One line, never the password."""
    sqlstate = getattr(exc, "sqlstate", None)
    lost = isinstance(exc, psycopg.OperationalError) and (sqlstate is None or sqlstate[:2] in ("08", "57"))
    text = one_line(exc) if dsn is None else scrub(one_line(exc), dsn)
    if lost:
        return SourceLostError(f"{context}: the connection to the source was lost: {text}")
    return SourceError(f"{context}: {text}")


def connect_failure(what: str, exc: psycopg.Error, dsn: str) -> SourceError | SourceLostError:
    """A failed attempt to connect to the source: refused for good (credentials, a database that does
    not exist: exit 2, a restart cannot fix it) or not answered (down, unreachable, starting up, too
    many clients: exit 3, it may come back). One line, never the password."""
    text = scrub(one_line(exc), dsn)
    if refused_for_good(text) or re.search(r'database "[^"]*" does not exist', text):
        return SourceError(f"{what}: {text}")
    return SourceLostError(f"{what}: {text}")


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class ReplicationConnection:
    def __init__(self, dsn: str):
        self.dsn = dsn
        # Says which cdc process holds the slot (pg_stat_activity), for the "already running"
        # message of a second connector, and for a reconnect to recognise its own old walsender.
        self.application_name = f"cdc pid {os.getpid()} on {socket.gethostname()}"[:63]
        self.conn: psycopg.Connection | None = None
        self.streaming = False

    def open(self) -> None:
        try:
            self.conn = psycopg.connect(self.dsn, replication="database", autocommit=True, options=SESSION_OPTIONS,
                                        application_name=self.application_name)
        except psycopg.Error as exc:  # one line, and never the password (libpq may quote the DSN)
            raise connect_failure(f"cannot open a replication connection to the source {redact(self.dsn)}", exc,
                                  self.dsn) from None

    def close(self) -> None:
        self.streaming = False
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def identify_system(self) -> tuple[str, int]:
        """(system identifier, timeline) of the server: which history our LSNs belong to."""
        assert self.conn is not None
        row = self.conn.execute("IDENTIFY_SYSTEM", prepare=False).fetchone()
        return str(row[0]), int(row[1])

    def timeline_start(self, timeline: int) -> int:
        """LSN at which `timeline` branched off its parent (0 for the first timeline)."""
        assert self.conn is not None
        if timeline <= 1:
            return 0
        _, content = self.conn.execute(f"TIMELINE_HISTORY {int(timeline)}", prepare=False).fetchone()
        text = bytes(content).decode("ascii", "replace") if not isinstance(content, str) else content
        # Lines of "parent_tli <TAB> switchpoint <TAB> reason"; the last one is where ours began.
        entries = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return parse_lsn(entries[-1][1].strip()) if entries else 0

    def find_slot(self, name: str) -> SlotState | None:
        """The slot as pg_replication_slots shows it; refuses a slot of another kind or plugin."""
        assert self.conn is not None
        # pg_replication_slots is readable on a replication connection (simple query protocol).
        rows = self.conn.execute(
            "SELECT s.plugin, s.confirmed_flush_lsn::text, s.slot_type, s.active_pid, s.wal_status, a.application_name"
            " FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid"
            f" WHERE s.slot_name = {_quote_literal(name)}",
            prepare=False,
        ).fetchall()
        if not rows:
            return None
        plugin, confirmed, slot_type, active_pid, wal_status, holder = rows[0]
        if slot_type != "logical" or plugin != "pgoutput":
            raise SourceError(f"replication slot {name} exists but is a {slot_type} slot of plugin {plugin!r}, not pgoutput")
        return SlotState(name, plugin, parse_lsn(confirmed) if confirmed else 0, False, active_pid, wal_status,
                         holder if holder and holder.startswith("cdc pid ") else None)

    def create_slot(self, name: str) -> SlotState:
        assert self.conn is not None
        log.info("creating replication slot %s", name)
        try:
            row = self.conn.execute(f"CREATE_REPLICATION_SLOT {quote_ident(name)} LOGICAL pgoutput", prepare=False).fetchone()
        except psycopg.errors.ConfigurationLimitExceeded as exc:
            raise SourceError(
                f"cannot create replication slot {name}: {exc.diag.message_primary} (raise max_replication_slots "
                "on the source, or drop a slot that is no longer used)"
            ) from None
        except psycopg.errors.DuplicateObject:
            # Two connectors of a new pipeline started together: the other one created it first.
            raise AlreadyRunningError(
                f"replication slot {name} was just created by another process: a connector of this "
                "pipeline is already running (stop it first)"
            ) from None
        return SlotState(name, "pgoutput", parse_lsn(row[1]), created=True)

    async def start(self, slot: str, publication: str, start_lsn: int = 0) -> None:
        """START_REPLICATION; from then on the connection speaks COPY_BOTH."""
        assert self.conn is not None
        pgconn = self.conn.pgconn
        command = (
            f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {format_lsn(start_lsn)} "
            # messages: our snapshot watermarks and requests travel as logical decoding messages
            f"(proto_version '1', publication_names {_quote_literal(quote_ident(publication))}, messages 'true')"
        )
        pgconn.nonblocking = 1
        pgconn.send_query(command.encode())
        await self._flush()
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            await self._wait_socket(readable=True, timeout=None)
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = result.error_message.decode(errors="replace").strip() if result is not None else "no result"
            sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode() if result is not None else ""
            if sqlstate == "55006":  # object_in_use: another walsender took the slot since we looked
                raise AlreadyRunningError(
                    f"a connector of this pipeline is already running: START_REPLICATION on slot {slot} failed: "
                    f"{message} (stop that connector first)")
            raise SourceError(f"START_REPLICATION on slot {slot} failed: {message}")
        self.streaming = True

    async def _wait_socket(self, *, readable: bool, timeout: float | None) -> None:
        """Wait until libpq's socket is readable (or writable), at most `timeout` seconds.

        The callback is registered only for the wait: asyncio's selector is level-triggered, and a
        reader left registered while we are busy elsewhere would fire on every loop iteration."""
        assert self.conn is not None
        loop = asyncio.get_running_loop()
        fd = self.conn.pgconn.socket
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        (loop.add_reader if readable else loop.add_writer)(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            (loop.remove_reader if readable else loop.remove_writer)(fd)

    async def _flush(self) -> None:
        assert self.conn is not None
        pgconn = self.conn.pgconn
        while pgconn.flush() == 1:  # 1: libpq's output buffer is not empty yet
            await self._wait_socket(readable=False, timeout=1.0)

    def poll_frame(self) -> XLogData | Keepalive | None:
        """The next frame if one has arrived, without waiting."""
        data = self.poll_data()
        return None if data is None else parse_copy_frame(data)

    async def read_frame(self, timeout: float) -> XLogData | Keepalive | None:
        """The next frame, or None when nothing arrived within `timeout` seconds."""
        data = await self.read_data(timeout)
        return None if data is None else parse_copy_frame(data)

    def poll_data(self) -> bytes | None:
        """The next frame's bytes (a CopyData message) if one has arrived, without waiting."""
        assert self.conn is not None
        pgconn = self.conn.pgconn
        try:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:  # nothing complete in libpq's buffer: read what the socket has, then retry
                pgconn.consume_input()
                nbytes, data = pgconn.get_copy_data(1)
        except psycopg.OperationalError as exc:  # the server went away (restart, crash, network)
            raise SourceLostError(f"the connection to the source was lost while streaming: {_first_line(exc)}") from None
        if nbytes > 0:
            return bytes(data)
        if nbytes < 0:
            self._raise_stream_end()
        return None

    async def read_data(self, timeout: float) -> bytes | None:
        """The next frame's bytes, or None when nothing arrived within `timeout` seconds."""
        data = self.poll_data()
        if data is None:
            await self._wait_socket(readable=True, timeout=timeout)
            data = self.poll_data()
        return data

    def _raise_stream_end(self) -> None:
        assert self.conn is not None
        result = self.conn.pgconn.get_result()
        message, sqlstate = "", ""
        if result is not None and result.error_message:
            message = result.error_message.decode(errors="replace").strip()
            # "invalid byte sequence ...: 0xe9 0x74" quotes bytes of a row's value: never print them.
            message = re.sub(r"0x[0-9a-fA-F]{2}(?: 0x[0-9a-fA-F]{2})*", "0x…", message)
            sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        text = f"the replication stream ended: {message or 'server closed the COPY stream'}"
        if sqlstate and sqlstate[:2] not in ("57", "08"):
            # The server refused to go on (a value it cannot send, a slot it cannot use): restarting
            # will not help, unlike a shutdown (class 57) or a lost connection (08).
            raise SourceError(text)
        raise SourceLostError(text)

    async def send_status(self, written: int, flushed: int, *, reply_requested: bool = False) -> None:
        assert self.conn is not None
        message = standby_status_update(written, flushed, flushed, reply_requested=reply_requested)
        try:
            while self.conn.pgconn.put_copy_data(message) == 0:  # 0: libpq's buffer is full, try again
                await self._wait_socket(readable=False, timeout=1.0)
            await self._flush()
        except psycopg.OperationalError as exc:
            raise SourceLostError(f"the connection to the source was lost while streaming: {_first_line(exc)}") from None
