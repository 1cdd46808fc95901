"""The walsender's CopyData frames on a replication connection: XLogData ('w', carrying one
pgoutput message), primary keepalives ('k'), and the standby status update ('r') cdc sends back.
Pure functions over bytes; no I/O. The messages inside XLogData are cdc.source.postgres.pgoutput's.

Copy frames (each CopyData payload while the connection is in COPY_BOTH mode). All integers are
big-endian; timestamps are microseconds since 2000-01-01 00:00 UTC; LSNs are unsigned 64-bit.

    'w' XLogData          Int64 start LSN, Int64 current server WAL end, Int64 send time, Byte* payload
    'k' Primary keepalive Int64 server WAL end, Int64 send time, Byte1 reply requested (1/0)
    'r' Standby status    Int64 written, Int64 flushed, Int64 applied, Int64 client time,
                          Byte1 reply requested (sent by us; LSNs are "last byte + 1")
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cdc import native
from cdc.errors import DecodeError

# --------------------------------------------------------------------------------------------
# Time

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)


def pg_time(us: int) -> datetime:
    """Microseconds since 2000-01-01 UTC -> aware UTC datetime. ValueError if out of range."""
    try:
        return PG_EPOCH + timedelta(microseconds=us)
    except OverflowError:
        # e.g. 'infinity' (Int64 max): no datetime can hold it.
        raise ValueError(f"PostgreSQL timestamp {us} us is outside the datetime range") from None


# The microseconds since 2000 that pg_time turns into a datetime (PostgreSQL's 'infinity' is not).
PG_TIME_MIN_US = (datetime.min.replace(tzinfo=timezone.utc) - PG_EPOCH) // _ONE_US
PG_TIME_MAX_US = (datetime.max.replace(tzinfo=timezone.utc) - PG_EPOCH) // _ONE_US


def to_pg_time(dt: datetime) -> int:
    """Aware datetime -> microseconds since 2000-01-01 UTC. Naive datetimes are refused."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"to_pg_time needs an aware datetime, got naive {dt!r}")
    # Integer floor division keeps it exact (no float rounding).
    return (dt - PG_EPOCH) // _ONE_US


# --------------------------------------------------------------------------------------------
# Frames

_XLOGDATA_HDR = struct.Struct("!QQq")  # after 'w'
_KEEPALIVE = struct.Struct("!QqB")  # after 'k'
_STATUS_UPDATE = struct.Struct("!cQQQqB")


@dataclass(slots=True)
class XLogData:
    """'w' frame. ``payload`` is a zero-copy view into the frame buffer: do not reuse that buffer
    while the payload is still needed. The send time is kept as sent (microseconds since 2000) and
    made a datetime only when asked for: the stream never needs it, and every change has a frame.
    Not frozen: a frozen dataclass sets each field through object.__setattr__, which made building
    one cost more than parsing the frame (treat it as read-only all the same)."""

    start_lsn: int
    end_lsn: int
    send_time_us: int
    payload: memoryview

    @property
    def send_time(self) -> datetime:
        return pg_time(self.send_time_us)


@dataclass(slots=True, frozen=True)
class Keepalive:
    """'k' frame. When ``reply_requested`` the server disconnects unless a status update follows
    soon (wal_sender_timeout)."""

    wal_end: int
    send_time: datetime
    reply_requested: bool


def describe_byte(b: int) -> str:
    return f"{chr(b)!r} (0x{b:02X})" if 0x20 <= b < 0x7F else f"0x{b:02X}"


# Where an XLogData frame's payload (the pgoutput message) starts: after 'w' and the header.
XLOGDATA_PAYLOAD = 1 + _XLOGDATA_HDR.size


def xlogdata_start_lsn(frame: bytes) -> int | None:
    """The start LSN of an XLogData frame, whose payload is frame[XLOGDATA_PAYLOAD:]; None for any
    other frame (parse_copy_frame reads it, or says what is wrong with it). For the stream's loop,
    which needs nothing else of the frame."""
    if frame[:1] != b"w" or len(frame) < XLOGDATA_PAYLOAD:
        return None
    return int.from_bytes(frame[1:9], "big")


def keepalive_fields(frame: bytes) -> tuple[int, bool] | None:
    """A keepalive frame's (wal_end, reply_requested); None for any other frame, as
    xlogdata_start_lsn. Before it waits for more WAL, the walsender sends one while the position we
    confirmed is behind what it sent: with a stream of small transactions, up to one per transaction."""
    if frame[:1] != b"k" or len(frame) != 1 + _KEEPALIVE.size:
        return None
    wal_end, ts, reply = _KEEPALIVE.unpack_from(frame, 1)
    return (wal_end, bool(reply)) if PG_TIME_MIN_US <= ts <= PG_TIME_MAX_US else None


def parse_copy_frame(buf: bytes | memoryview) -> XLogData | Keepalive:
    """Parse one CopyData payload from the walsender: 'w' XLogData or 'k' keepalive."""
    if _native_xlogdata is not None:  # the compiled core (cdc.native) reads XLogData frames; the rest is ours
        frame = _native_xlogdata(buf)
        if frame is not None:
            return frame
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    size = len(view)
    if size == 0:
        raise DecodeError("empty replication CopyData message")
    kind = view[0]
    try:
        if kind == 0x77:  # 'w'
            if size < 1 + _XLOGDATA_HDR.size:
                raise DecodeError(
                    f"truncated XLogData message: header needs {1 + _XLOGDATA_HDR.size} bytes, "
                    f"got {size}"
                )
            start, end, ts = _XLOGDATA_HDR.unpack_from(view, 1)
            return XLogData(start, end, ts, view[1 + _XLOGDATA_HDR.size :])
        if kind == 0x6B:  # 'k'
            if size != 1 + _KEEPALIVE.size:
                raise DecodeError(
                    f"malformed primary keepalive message: expected {1 + _KEEPALIVE.size} bytes, "
                    f"got {size}"
                )
            wal_end, ts, reply = _KEEPALIVE.unpack_from(view, 1)
            return Keepalive(wal_end, pg_time(ts), bool(reply))
    except ValueError as exc:  # timestamp out of range
        raise DecodeError(f"malformed replication message {describe_byte(kind)}: {exc}") from None
    raise DecodeError(
        f"unknown replication CopyData message kind {describe_byte(kind)}: expected 'w' "
        f"(XLogData) or 'k' (primary keepalive)"
    )


_native_xlogdata = native.core.FrameParser(XLogData).parse if native.core is not None else None


def standby_status_update(
    written: int,
    flushed: int,
    applied: int,
    *,
    now: datetime | None = None,
    reply_requested: bool = False,
) -> bytes:
    """Build the 'r' standby status update (a CopyData payload to send to the walsender).

    Each LSN is the position just past the last byte written / flushed / applied; the server
    frees WAL for the slot up to ``flushed``.
    """
    if now is None:
        now = datetime.now(timezone.utc)
    return _STATUS_UPDATE.pack(b"r", written, flushed, applied, to_pg_time(now), reply_requested)
