"""Decoder for pgoutput protocol v1: the logical messages an XLogData frame carries (the frames
themselves are cdc.source.postgres.frames').

Pure functions over bytes; no I/O. Over 400 lines: one wire format, each message kind's layout
(below), type and decoder kept together, so that adding a message kind is one file's change.

Logical messages (the XLogData payload with ``proto_version '1'``). All integers are big-endian;
timestamps are microseconds since 2000-01-01 00:00 UTC; LSNs are unsigned 64-bit. A String is
NUL-terminated UTF-8; a TupleData is Int16 column count, then per column a Byte1 kind: 'n' NULL,
'u' unchanged TOASTed value (not sent), 't' text or 'b' binary, the last two followed by Int32
length and bytes.

    'B' Begin     Int64 final LSN, Int64 commit time, Int32 xid
    'C' Commit    Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit time
    'O' Origin    Int64 commit LSN on the origin, String name
    'R' Relation  Int32 relation id, String namespace ('' = pg_catalog), String name,
                  Int8 replica identity, Int16 column count, then per column:
                  Int8 flags (1 = part of key), String name, Int32 type OID, Int32 type modifier
    'Y' Type      Int32 type OID, String namespace, String name
    'I' Insert    Int32 relation id, 'N', TupleData
    'U' Update    Int32 relation id, optional ('K' | 'O', TupleData), 'N', TupleData
    'D' Delete    Int32 relation id, 'K' | 'O', TupleData
    'T' Truncate  Int32 relation count, Int8 options (1 CASCADE, 2 RESTART IDENTITY),
                  Int32 relation id per relation
    'M' Message   Int8 flags (1 = transactional), Int64 LSN, String prefix, Int32 length, Byte* content

Protocol version 2 and later add streaming and two-phase messages ('S', 'E', 'c', 'A', 'b', 'P',
'K', 'r', 'p') and prefix several v1 messages with an xid inside streamed transactions; those are
rejected here rather than guessed at.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime

from cdc import native
from cdc.errors import DecodeError
from cdc.lsn import format_lsn
from cdc.source.postgres.frames import PG_TIME_MAX_US, PG_TIME_MIN_US, describe_byte, pg_time

__all__ = [
    "UNCHANGED_TOAST",
    "BinaryValue",
    "Begin",
    "Commit",
    "Origin",
    "RelationColumn",
    "Relation",
    "Type",
    "Insert",
    "Update",
    "Delete",
    "Truncate",
    "Message",
    "LogicalMessage",
    "decode",
    "begin_fields",
    "commit_end_lsn",
]

# --------------------------------------------------------------------------------------------
# Tuple values


class _UnchangedToast:
    """Type of :data:`UNCHANGED_TOAST`: a singleton that survives copy and pickle as itself."""

    __slots__ = ()
    _instance: _UnchangedToast | None = None

    def __new__(cls) -> _UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"  # pickle by reference to the module global

    def __copy__(self) -> _UnchangedToast:
        return self

    def __deepcopy__(self, memo: dict) -> _UnchangedToast:
        return self


UNCHANGED_TOAST = _UnchangedToast()
"""Column value 'u': a TOASTed value the UPDATE did not change, so the server did not send it.
Compare with ``is``; the current value must come from elsewhere (the old row, the sink)."""


class BinaryValue(bytes):
    """Column value 'b': the type's binary send format (only with the ``binary`` option).

    A separate type from plain ``bytes`` (text format) so callers can tell which decoder applies.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"BinaryValue({bytes.__repr__(self)})"


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(slots=True, frozen=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(slots=True, frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True, frozen=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(slots=True, frozen=True)
class RelationColumn:
    key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(slots=True, frozen=True)
class Relation:
    """Schema of a table, sent before its first change and again after every schema change.
    ``namespace`` is kept as sent: '' means pg_catalog. Generated columns are not listed."""

    relation_id: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]


@dataclass(slots=True, frozen=True)
class Type:
    type_oid: int
    namespace: str
    name: str


@dataclass(slots=True, frozen=True)
class Insert:
    relation_id: int
    new: tuple


@dataclass(slots=True, frozen=True)
class Update:
    """``key`` is sent ('K') only when a replica identity column changed; ``old`` ('O') only with
    REPLICA IDENTITY FULL. At most one of them is set."""

    relation_id: int
    old: tuple | None
    key: tuple | None
    new: tuple


@dataclass(slots=True, frozen=True)
class Delete:
    """Exactly one of ``old`` (REPLICA IDENTITY FULL) and ``key`` is set. In ``key`` the
    non-key columns are None."""

    relation_id: int
    old: tuple | None
    key: tuple | None


@dataclass(slots=True, frozen=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(slots=True, frozen=True)
class Message:
    """Logical decoding message ('M', from pg_logical_emit_message; needs the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


LogicalMessage = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message

# --------------------------------------------------------------------------------------------
# Wire layouts (network byte order). OIDs, xids and LSNs are unsigned; lengths, counts,
# type modifiers and timestamps are signed.

_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")

_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_COLUMN_TAIL = struct.Struct("!Ii")  # type OID, type modifier (after flags and name)
_REL_TAIL = struct.Struct("!Bh")  # replica identity, column count (after the two strings)
_MESSAGE_HDR = struct.Struct("!BQ")
_TRUNCATE_HDR = struct.Struct("!iB")

# Message kinds as ints: indexing bytes yields ints, so compare ints, not 1-char bytes.
_N, _K, _O = ord("N"), ord("K"), ord("O")
_NULL, _TOAST, _TEXT, _BINARY = ord("n"), ord("u"), ord("t"), ord("b")


class _Malformed(Exception):
    """Internal: a message is short or inconsistent. decode() adds the message kind and LSN."""


def _short(what: str, off: int, need: int, size: int) -> _Malformed:
    have = max(size - off, 0)
    return _Malformed(
        f"truncated while reading {what} at offset {off}: needs {need} bytes, {have} left "
        f"(message is {size} bytes)"
    )


def _string(data: bytes, off: int, what: str) -> tuple[str, int]:
    """NUL-terminated UTF-8 string at ``off`` -> (text, offset after the NUL)."""
    try:
        end = data.index(0, off)
    except ValueError:
        raise _Malformed(
            f"truncated while reading {what} at offset {off}: no NUL terminator before the end "
            f"(message is {len(data)} bytes)"
        ) from None
    try:
        return data[off:end].decode("utf-8"), end + 1
    except UnicodeDecodeError as exc:
        raise _Malformed(f"{what} at offset {off} is not valid UTF-8: {exc.reason}") from None


_unpack_i16 = _I16.unpack_from
_unpack_i32 = _I32.unpack_from


def _python_tuple(data: bytes, off: int, size: int, what: str) -> tuple[tuple, int]:
    """TupleData at ``off`` -> (values, offset after it). The hot path: keep it lean.

    Reads optimistically, relying on unpack_from and indexing to raise when the data ends early, and
    checks only what raises nothing (a negative length, a slice past the end); at the first sign of
    trouble the checked reader goes over the tuple again to say exactly what is wrong."""
    try:
        (ncols,) = _unpack_i16(data, off)
        pos = off + 2
        values = []
        append = values.append
        for _ in range(ncols):
            kind = data[pos]
            if kind == _TEXT:
                (length,) = _unpack_i32(data, pos + 1)
                start = pos + 5
                pos = start + length
                if length < 0 or pos > size:
                    break
                append(data[start:pos])
            elif kind == _NULL:
                append(None)
                pos += 1
            elif kind == _TOAST:
                append(UNCHANGED_TOAST)
                pos += 1
            else:  # binary values are rare (the `binary` option), unknown kinds an error: the checked reader
                break
        else:
            if ncols >= 0:
                return tuple(values), pos
    except (struct.error, IndexError):
        pass
    return _checked_tuple(data, off, size, what)


if native.core is not None:
    _native_tuple = native.core.TupleReader(UNCHANGED_TOAST).read

    def _tuple(data: bytes, off: int, size: int, what: str) -> tuple[tuple, int]:
        """TupleData at ``off`` -> (values, offset after it): the compiled core reads what it can, the
        checked reader the rest (binary values; anything malformed, which it names)."""
        found = _native_tuple(data, off)
        return found if found is not None else _checked_tuple(data, off, size, what)
else:
    _tuple = _python_tuple


def _checked_tuple(data: bytes, off: int, size: int, what: str) -> tuple[tuple, int]:
    """TupleData at ``off`` -> (values, offset after it), checking every length before it is used."""
    if off + 2 > size:
        raise _short(f"{what} column count", off, 2, size)
    (ncols,) = _I16.unpack_from(data, off)
    if ncols < 0:
        raise _Malformed(f"{what} has a negative column count {ncols} at offset {off}")
    off += 2
    values: list = [None] * ncols  # 'n' needs no work
    unpack_len = _I32.unpack_from
    for i in range(ncols):
        if off >= size:
            raise _short(f"{what} column {i + 1}/{ncols} kind", off, 1, size)
        kind = data[off]
        off += 1
        if kind == _TEXT or kind == _BINARY:
            if off + 4 > size:
                raise _short(f"{what} column {i + 1}/{ncols} value length", off, 4, size)
            (length,) = unpack_len(data, off)
            off += 4
            end = off + length
            # Slicing never raises, so a short buffer must be caught here explicitly.
            if length < 0 or end > size:
                if length < 0:
                    raise _Malformed(
                        f"{what} column {i + 1}/{ncols} has a negative value length {length}"
                    )
                raise _short(f"{what} column {i + 1}/{ncols} value", off, length, size)
            values[i] = data[off:end] if kind == _TEXT else BinaryValue(data[off:end])
            off = end
        elif kind == _TOAST:
            values[i] = UNCHANGED_TOAST
        elif kind != _NULL:
            raise _Malformed(
                f"{what} column {i + 1}/{ncols} has unknown kind {describe_byte(kind)} at "
                f"offset {off - 1}: expected 'n', 'u', 't' or 'b'"
            )
    return tuple(values), off


def _expect(data: bytes, off: int, size: int, allowed: bytes, what: str) -> int:
    if off >= size:
        raise _short(what, off, 1, size)
    b = data[off]
    if b not in allowed:
        choices = ", ".join(repr(chr(c)) for c in allowed)
        raise _Malformed(f"expected {what} ({choices}) at offset {off}, got {describe_byte(b)}")
    return b


def _fixed(st: struct.Struct, data: bytes, off: int, size: int, what: str) -> tuple:
    if off + st.size > size:
        raise _short(what, off, st.size, size)
    return st.unpack_from(data, off)


# Each decoder gets the whole message (kind byte at 0) and returns (message, end offset);
# decode() checks that end == size so a layout mismatch (e.g. a v2 xid prefix) cannot pass silently.


def _begin(data: bytes, size: int) -> tuple[Begin, int]:
    final_lsn, ts, xid = _fixed(_BEGIN, data, 1, size, "final LSN, commit time and xid")
    return Begin(final_lsn, pg_time(ts), xid), 1 + _BEGIN.size


def begin_fields(data: bytes) -> tuple[int, int, int] | None:
    """A Begin message's (final LSN, commit time in microseconds since 2000, xid), for a stream of
    small transactions that needs no Begin object; None where :func:`decode` must read it (and say
    what is wrong with it)."""
    if len(data) != 1 + _BEGIN.size or data[0] != 0x42:  # 'B'
        return None
    fields = _BEGIN.unpack_from(data, 1)
    return fields if PG_TIME_MIN_US <= fields[1] <= PG_TIME_MAX_US else None


def commit_end_lsn(data: bytes) -> int | None:
    """A Commit message's end LSN (where the stream goes on), as :func:`begin_fields` for Begin."""
    if len(data) != 1 + _COMMIT.size or data[0] != 0x43:  # 'C'
        return None
    _, _, end_lsn, ts = _COMMIT.unpack_from(data, 1)
    return end_lsn if PG_TIME_MIN_US <= ts <= PG_TIME_MAX_US else None


def _commit(data: bytes, size: int) -> tuple[Commit, int]:
    flags, commit_lsn, end_lsn, ts = _fixed(
        _COMMIT, data, 1, size, "flags, commit LSN, end LSN and commit time"
    )
    return Commit(flags, commit_lsn, end_lsn, pg_time(ts)), 1 + _COMMIT.size


def _origin(data: bytes, size: int) -> tuple[Origin, int]:
    (lsn,) = _fixed(_U64, data, 1, size, "origin commit LSN")
    name, off = _string(data, 9, "origin name")
    return Origin(lsn, name), off


def _relation(data: bytes, size: int) -> tuple[Relation, int]:
    (rel_id,) = _fixed(_U32, data, 1, size, "relation id")
    namespace, off = _string(data, 5, "namespace")
    name, off = _string(data, off, "relation name")
    ident, ncols = _fixed(_REL_TAIL, data, off, size, "replica identity and column count")
    if ncols < 0:
        raise _Malformed(f"negative column count {ncols} at offset {off + 1}")
    off += _REL_TAIL.size
    columns = []
    for i in range(ncols):
        (flags,) = _fixed(_U8, data, off, size, f"column {i + 1}/{ncols} flags")
        col_name, off = _string(data, off + 1, f"column {i + 1}/{ncols} name")
        type_oid, typmod = _fixed(
            _COLUMN_TAIL, data, off, size, f"column {i + 1}/{ncols} ({col_name!r}) type OID and modifier"
        )
        off += _COLUMN_TAIL.size
        columns.append(RelationColumn(bool(flags & 1), col_name, type_oid, typmod))
    return Relation(rel_id, namespace, name, chr(ident), tuple(columns)), off


def _type(data: bytes, size: int) -> tuple[Type, int]:
    (oid,) = _fixed(_U32, data, 1, size, "type OID")
    namespace, off = _string(data, 5, "type namespace")
    name, off = _string(data, off, "type name")
    return Type(oid, namespace, name), off


def _insert(data: bytes, size: int) -> tuple[Insert, int]:
    (rel_id,) = _fixed(_U32, data, 1, size, "relation id")
    _expect(data, 5, size, b"N", "new tuple marker")
    new, off = _tuple(data, 6, size, "new tuple")
    return Insert(rel_id, new), off


def _update(data: bytes, size: int) -> tuple[Update, int]:
    (rel_id,) = _fixed(_U32, data, 1, size, "relation id")
    marker = _expect(data, 5, size, b"KON", "tuple marker")
    old = key = None
    off = 6
    if marker == _K:
        key, off = _tuple(data, off, size, "key tuple")
    elif marker == _O:
        old, off = _tuple(data, off, size, "old tuple")
    if marker != _N:
        _expect(data, off, size, b"N", "new tuple marker")
        off += 1
    new, off = _tuple(data, off, size, "new tuple")
    return Update(rel_id, old, key, new), off


def _delete(data: bytes, size: int) -> tuple[Delete, int]:
    (rel_id,) = _fixed(_U32, data, 1, size, "relation id")
    marker = _expect(data, 5, size, b"KO", "tuple marker")
    if marker == _K:
        key, off = _tuple(data, 6, size, "key tuple")
        return Delete(rel_id, None, key), off
    old, off = _tuple(data, 6, size, "old tuple")
    return Delete(rel_id, old, None), off


def _truncate(data: bytes, size: int) -> tuple[Truncate, int]:
    # Note the order: the count comes before the option bits, the ids after both.
    count, options = _fixed(_TRUNCATE_HDR, data, 1, size, "relation count and options")
    if count < 0:
        raise _Malformed(f"negative relation count {count}")
    off = 1 + _TRUNCATE_HDR.size
    ids_struct = struct.Struct(f"!{count}I")
    rel_ids = _fixed(ids_struct, data, off, size, f"{count} relation ids")
    return Truncate(tuple(rel_ids), bool(options & 1), bool(options & 2)), off + ids_struct.size


def _message(data: bytes, size: int) -> tuple[Message, int]:
    flags, lsn = _fixed(_MESSAGE_HDR, data, 1, size, "flags and LSN")
    prefix, off = _string(data, 1 + _MESSAGE_HDR.size, "prefix")
    (length,) = _fixed(_I32, data, off, size, "content length")
    off += 4
    if length < 0:
        raise _Malformed(f"negative content length {length}")
    if off + length > size:
        raise _short("content", off, length, size)
    return Message(bool(flags & 1), lsn, prefix, data[off : off + length]), off + length


_DECODERS = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
}

_NAMES = {
    ord("B"): "Begin",
    ord("C"): "Commit",
    ord("O"): "Origin",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("M"): "Message",
}

# Kinds of later protocol versions, named so the error says what was received.
_LATER_KINDS = {
    ord("S"): "Stream Start (protocol version 2+)",
    ord("E"): "Stream Stop (protocol version 2+)",
    ord("c"): "Stream Commit (protocol version 2+)",
    ord("A"): "Stream Abort (protocol version 2+)",
    ord("b"): "Begin Prepare (protocol version 3+)",
    ord("P"): "Prepare (protocol version 3+)",
    ord("K"): "Commit Prepared (protocol version 3+)",
    ord("r"): "Rollback Prepared (protocol version 3+)",
    ord("p"): "Stream Prepare (protocol version 3+)",
}


def decode(payload: bytes | memoryview, *, lsn: int | None = None) -> LogicalMessage:
    """Decode one pgoutput protocol v1 message (an XLogData payload).

    ``lsn`` (e.g. the XLogData start LSN) is only used to name the place in error messages.
    Raises :class:`DecodeError` for unknown kinds, truncated or malformed input.
    """
    # One copy of a memoryview buys C-speed bytes.index for strings and slicing for values.
    data = payload if type(payload) is bytes else bytes(payload)
    if _native_change is not None:  # row changes as the decoders below make them; None: theirs to say
        change = _native_change(data)
        if change is not None:
            return change
    size = len(data)
    if size == 0:
        raise DecodeError(f"empty pgoutput message{_at(lsn)}")
    kind = data[0]
    decoder = _DECODERS.get(kind)
    if decoder is None:
        later = _LATER_KINDS.get(kind)
        what = f", {later}" if later else ""
        raise DecodeError(
            f"unsupported pgoutput message kind {chr(kind)!r} (0x{kind:02X}{what}){_at(lsn)}: "
            f"only protocol version 1 (proto_version '1') is supported"
        )
    try:
        message, end = decoder(data, size)
    except _Malformed as exc:
        raise DecodeError(f"malformed pgoutput {_NAMES[kind]} message{_at(lsn)}: {exc}") from None
    except (ValueError, OverflowError, struct.error, IndexError) as exc:
        # Safety net: the decoders check lengths themselves, so this is e.g. a timestamp
        # outside the datetime range.
        raise DecodeError(f"malformed pgoutput {_NAMES[kind]} message{_at(lsn)}: {exc}") from None
    if end != size:
        raise DecodeError(
            f"malformed pgoutput {_NAMES[kind]} message{_at(lsn)}: {size - end} unexpected trailing "
            f"bytes after offset {end} (message is {size} bytes; not protocol version 1?)"
        )
    return message


# The compiled core (cdc.native) decodes Insert, Update and Delete messages whole.
_native_change = (native.core.ChangeDecoder(UNCHANGED_TOAST, Insert, Update, Delete).decode
                  if native.core is not None else None)


def _at(lsn: int | None) -> str:
    """Where, for error messages only: formatting an LSN costs as much as decoding a small message."""
    return f" at LSN {format_lsn(lsn)}" if lsn is not None else ""
