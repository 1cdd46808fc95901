"""pgoutput protocol v1 and walsender frame decoding, against messages built here byte by byte."""

from __future__ import annotations

import copy
import pickle
import struct
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.errors import DecodeError
from cdc.source.postgres import pgoutput as pg
from cdc.source.postgres.frames import (
    XLOGDATA_PAYLOAD,
    Keepalive,
    XLogData,
    keepalive_fields,
    parse_copy_frame,
    pg_time,
    standby_status_update,
    to_pg_time,
    xlogdata_start_lsn,
)
from cdc.source.postgres.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    BinaryValue,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    Relation,
    RelationColumn,
    Truncate,
    Type,
    Update,
    decode,
)

UTC = timezone.utc
T0 = datetime(2024, 5, 17, 12, 34, 56, 789012, tzinfo=UTC)
T0_US = int((T0 - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds()) * 1_000_000 + 789012


# --- a tiny builder of wire messages (independent of the module under test) ---------------


def s(text: str) -> bytes:
    """String: NUL-terminated UTF-8."""
    return text.encode() + b"\0"


def tup(*cols) -> bytes:
    """TupleData. None -> 'n', ... (Ellipsis) -> 'u', bytes -> 't', ('b', bytes) -> 'b'."""
    out = struct.pack("!h", len(cols))
    for col in cols:
        if col is None:
            out += b"n"
        elif col is ...:
            out += b"u"
        elif isinstance(col, tuple):
            out += b"b" + struct.pack("!i", len(col[1])) + col[1]
        else:
            out += b"t" + struct.pack("!i", len(col)) + col
    return out


def begin_msg(final_lsn, ts_us, xid):
    return b"B" + struct.pack("!QqI", final_lsn, ts_us, xid)


def commit_msg(flags, commit_lsn, end_lsn, ts_us):
    return b"C" + struct.pack("!BQQq", flags, commit_lsn, end_lsn, ts_us)


def relation_msg(rel_id, ns, name, ident, cols):
    out = b"R" + struct.pack("!I", rel_id) + s(ns) + s(name) + ident.encode()
    out += struct.pack("!h", len(cols))
    for flags, col_name, oid, typmod in cols:
        out += struct.pack("!B", flags) + s(col_name) + struct.pack("!Ii", oid, typmod)
    return out


def truncate_msg(options, rel_ids):
    return b"T" + struct.pack("!iB", len(rel_ids), options) + struct.pack(f"!{len(rel_ids)}I", *rel_ids)


def message_msg(flags, lsn, prefix, content):
    return b"M" + struct.pack("!BQ", flags, lsn) + s(prefix) + struct.pack("!i", len(content)) + content


# A sample of every kind, reused by the truncation sweep.
RELATION = relation_msg(
    16385,
    "public",
    "orders",
    "d",
    [(1, "id", 23, -1), (0, "note", 1043, 68), (0, "payload", 17, -1), (0, "größe", 1700, 655366)],
)
INSERT = b"I" + struct.pack("!I", 16385) + b"N" + tup(b"42", None, ("b", b"\x00\x01\xff"), ...)
UPDATE_K = (
    b"U" + struct.pack("!I", 16385) + b"K" + tup(b"41", None, None, None) + b"N" + tup(b"42", b"x", None, ...)
)
UPDATE_O = (
    b"U" + struct.pack("!I", 16385) + b"O" + tup(b"42", b"old", None, b"7") + b"N" + tup(b"42", b"new", None, b"7")
)
UPDATE_N = b"U" + struct.pack("!I", 16385) + b"N" + tup(b"42", b"", None, ...)
DELETE_K = b"D" + struct.pack("!I", 16385) + b"K" + tup(b"42", None, None, None)
DELETE_O = b"D" + struct.pack("!I", 16385) + b"O" + tup(b"42", b"bye", ("b", b"\x10"), b"1.5")
SAMPLES = {
    "begin": begin_msg(0x16_B374D848, T0_US, 7531),
    "commit": commit_msg(0, 0x16_B374D900, 0x16_B374D948, T0_US),
    "origin": b"O" + struct.pack("!Q", 0x1_00000010) + s("node_a"),
    "relation": RELATION,
    "type": b"Y" + struct.pack("!I", 90210) + s("public") + s("mood"),
    "insert": INSERT,
    "update_k": UPDATE_K,
    "update_o": UPDATE_O,
    "update_n": UPDATE_N,
    "delete_k": DELETE_K,
    "delete_o": DELETE_O,
    "truncate": truncate_msg(3, [16385, 16390, 4294967295]),
    "message": message_msg(1, 0x2_0000ABCD, "audit", b"\x00hello\xff"),
}


# --- time helpers ------------------------------------------------------------------------------


def test_pg_time_epoch_and_round_trip():
    assert pg_time(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_time(0).tzinfo is not None
    assert pg_time(T0_US) == T0
    assert to_pg_time(T0) == T0_US
    assert pg_time(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert to_pg_time(pg_time(-1)) == -1


def test_to_pg_time_converts_other_zones_and_refuses_naive():
    plus2 = T0.astimezone(timezone(timedelta(hours=2)))
    assert to_pg_time(plus2) == T0_US
    with pytest.raises(ValueError, match="naive"):
        to_pg_time(datetime(2024, 1, 1))


# --- copy frames -------------------------------------------------------------------------------


def test_xlogdata_frame_exposes_header_and_zero_copy_payload():
    inner = SAMPLES["begin"]
    frame = b"w" + struct.pack("!QQq", 0x16_B374D848, 0x16_B3750000, T0_US) + inner
    msg = parse_copy_frame(frame)
    assert isinstance(msg, XLogData)
    assert msg.start_lsn == 0x16_B374D848
    assert msg.end_lsn == 0x16_B3750000
    assert msg.send_time == T0
    assert isinstance(msg.payload, memoryview)
    assert bytes(msg.payload) == inner
    # And the payload decodes as-is.
    assert decode(msg.payload) == Begin(0x16_B374D848, T0, 7531)


def test_xlogdata_frame_from_memoryview_with_empty_payload():
    frame = memoryview(bytearray(b"w" + struct.pack("!QQq", 1, 2, 0)))
    msg = parse_copy_frame(frame)
    assert (msg.start_lsn, msg.end_lsn, msg.send_time) == (1, 2, pg_time(0))
    assert bytes(msg.payload) == b""


@pytest.mark.parametrize("flag", [0, 1])
def test_keepalive_frame(flag):
    frame = b"k" + struct.pack("!QqB", 0x16_B374D848, T0_US, flag)
    assert parse_copy_frame(frame) == Keepalive(0x16_B374D848, T0, bool(flag))


def test_unknown_copy_frame_names_the_byte():
    with pytest.raises(DecodeError, match=r"'x' \(0x78\).*'w'.*'k'"):
        parse_copy_frame(b"x123")
    with pytest.raises(DecodeError, match="0x00"):
        parse_copy_frame(b"\x00")
    with pytest.raises(DecodeError, match="empty"):
        parse_copy_frame(b"")


def test_truncated_copy_frames():
    with pytest.raises(DecodeError, match="truncated XLogData.*25 bytes, got 10"):
        parse_copy_frame(b"w" + b"\0" * 9)
    keepalive = b"k" + struct.pack("!QqB", 5, 0, 1)
    with pytest.raises(DecodeError, match="keepalive.*18 bytes, got 17"):
        parse_copy_frame(keepalive[:-1])


def test_standby_status_update_layout():
    raw = standby_status_update(0x16_B374D848, 0x16_B374D800, 0x16_B374D700, now=T0, reply_requested=True)
    assert len(raw) == 34
    kind, written, flushed, applied, ts, reply = struct.unpack("!cQQQqB", raw)
    assert kind == b"r"
    assert (written, flushed, applied) == (0x16_B374D848, 0x16_B374D800, 0x16_B374D700)
    assert ts == T0_US
    assert pg_time(ts) == T0
    assert reply == 1


def test_standby_status_update_defaults_to_now_and_no_reply():
    before = datetime.now(UTC)
    raw = standby_status_update(10, 10, 10)
    after = datetime.now(UTC)
    *_, ts, reply = struct.unpack("!cQQQqB", raw)
    assert before - timedelta(microseconds=1) <= pg_time(ts) <= after
    assert reply == 0


# --- logical messages --------------------------------------------------------------------------


def test_begin():
    msg = decode(SAMPLES["begin"])
    assert msg == Begin(final_lsn=0x16_B374D848, commit_time=T0, xid=7531)
    assert pg.format_lsn(msg.final_lsn) == "16/B374D848"


def test_commit():
    assert decode(SAMPLES["commit"]) == Commit(
        flags=0, commit_lsn=0x16_B374D900, end_lsn=0x16_B374D948, commit_time=T0
    )


def test_origin():
    assert decode(SAMPLES["origin"]) == Origin(commit_lsn=0x1_00000010, name="node_a")


def test_relation():
    rel = decode(RELATION)
    assert isinstance(rel, Relation)
    assert (rel.relation_id, rel.namespace, rel.name, rel.replica_identity) == (16385, "public", "orders", "d")
    assert rel.columns == (
        RelationColumn(key=True, name="id", type_oid=23, type_modifier=-1),
        RelationColumn(key=False, name="note", type_oid=1043, type_modifier=68),
        RelationColumn(key=False, name="payload", type_oid=17, type_modifier=-1),
        RelationColumn(key=False, name="größe", type_oid=1700, type_modifier=655366),
    )


def test_relation_in_pg_catalog_full_identity_no_columns():
    rel = decode(relation_msg(1259, "", "pg_class", "f", []))
    assert rel == Relation(1259, "", "pg_class", "f", ())


def test_type():
    assert decode(SAMPLES["type"]) == Type(type_oid=90210, namespace="public", name="mood")


def test_insert_tuple_values_of_every_kind():
    msg = decode(INSERT)
    assert isinstance(msg, Insert)
    assert msg.relation_id == 16385
    ident, note, payload, size = msg.new
    assert ident == b"42" and type(ident) is bytes
    assert note is None
    assert payload == b"\x00\x01\xff" and isinstance(payload, BinaryValue)
    assert size is UNCHANGED_TOAST


def test_text_values_are_plain_bytes_and_empty_text_is_not_null():
    msg = decode(UPDATE_N)
    assert msg.new[1] == b"" and type(msg.new[1]) is bytes
    assert not isinstance(msg.new[0], BinaryValue)


def test_update_with_key():
    assert decode(UPDATE_K) == Update(
        relation_id=16385,
        old=None,
        key=(b"41", None, None, None),
        new=(b"42", b"x", None, UNCHANGED_TOAST),
    )


def test_update_with_old_tuple():
    assert decode(UPDATE_O) == Update(
        relation_id=16385,
        old=(b"42", b"old", None, b"7"),
        key=None,
        new=(b"42", b"new", None, b"7"),
    )


def test_update_with_new_tuple_only():
    msg = decode(UPDATE_N)
    assert (msg.old, msg.key) == (None, None)
    assert msg.new == (b"42", b"", None, UNCHANGED_TOAST)


def test_delete_with_key():
    assert decode(DELETE_K) == Delete(relation_id=16385, old=None, key=(b"42", None, None, None))


def test_delete_with_old_tuple():
    msg = decode(DELETE_O)
    assert msg == Delete(relation_id=16385, old=(b"42", b"bye", b"\x10", b"1.5"), key=None)
    assert isinstance(msg.old[2], BinaryValue)


@pytest.mark.parametrize(
    ("options", "cascade", "restart"),
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
)
def test_truncate_options(options, cascade, restart):
    msg = decode(truncate_msg(options, [16385, 16390, 4294967295]))
    assert msg == Truncate(relation_ids=(16385, 16390, 4294967295), cascade=cascade, restart_identity=restart)


def test_message():
    assert decode(SAMPLES["message"]) == Message(
        transactional=True, lsn=0x2_0000ABCD, prefix="audit", content=b"\x00hello\xff"
    )
    plain = decode(message_msg(0, 5, "", b""))
    assert plain == Message(transactional=False, lsn=5, prefix="", content=b"")
    assert type(plain.content) is bytes


def test_decode_accepts_memoryview_slices():
    buf = bytearray(b"junk" + INSERT + b"more junk")
    view = memoryview(buf)[4 : 4 + len(INSERT)]
    assert decode(view) == decode(INSERT)


def test_messages_are_frozen():
    msg = decode(SAMPLES["begin"])
    with pytest.raises(AttributeError):
        msg.xid = 1  # type: ignore[misc]


# --- the sentinel and the binary marker --------------------------------------------------------


def test_unchanged_toast_sentinel_is_unique_and_self_describing():
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    assert UNCHANGED_TOAST is not None and UNCHANGED_TOAST != b""
    assert copy.copy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert copy.deepcopy((1, UNCHANGED_TOAST))[1] is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST
    assert type(UNCHANGED_TOAST)() is UNCHANGED_TOAST


def test_binary_value_repr_and_equality():
    value = BinaryValue(b"\x01")
    assert repr(value) == r"BinaryValue(b'\x01')"
    assert value == b"\x01"


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name"),
    [(b"S", "Stream Start"), (b"E", "Stream Stop"), (b"c", "Stream Commit"), (b"A", "Stream Abort")],
)
def test_stream_messages_are_rejected_as_later_protocol(kind, name):
    with pytest.raises(DecodeError) as info:
        decode(kind + b"\0" * 20)
    text = str(info.value)
    assert f"'{kind.decode()}' (0x{kind[0]:02X}" in text
    assert name in text
    assert "only protocol version 1" in text


def test_unknown_kind_names_byte_and_lsn():
    with pytest.raises(DecodeError) as info:
        decode(b"Z\x01\x02", lsn=0x16_B374D848)
    text = str(info.value)
    assert "'Z' (0x5A)" in text
    assert "at LSN 16/B374D848" in text
    assert "only protocol version 1" in text


def test_empty_message():
    with pytest.raises(DecodeError, match="empty"):
        decode(b"")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_is_a_decode_error(name):
    raw = SAMPLES[name]
    for cut in range(1, len(raw)):
        with pytest.raises(DecodeError, match="malformed pgoutput"):
            decode(raw[:cut])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_trailing_bytes_are_a_decode_error(name):
    with pytest.raises(DecodeError, match="1 unexpected trailing bytes"):
        decode(SAMPLES[name] + b"\0")


def test_truncation_message_says_what_was_being_read():
    with pytest.raises(DecodeError) as info:
        decode(INSERT[:-2], lsn=0x10)
    text = str(info.value)
    assert "Insert message at LSN 0/10" in text
    assert "new tuple column 3/4 value" in text
    assert "needs 3 bytes, 2 left" in text

    with pytest.raises(DecodeError, match="Begin message: truncated while reading final LSN"):
        decode(SAMPLES["begin"][:10])

    with pytest.raises(DecodeError, match="no NUL terminator"):
        decode(b"Y" + struct.pack("!I", 1) + b"public")

    rel = relation_msg(1, "public", "t", "d", [(1, "id", 23, -1)])
    with pytest.raises(DecodeError, match=r"column 1/1 \('id'\) type OID"):
        decode(rel[:-3])


def _outcome(read, data: bytes):
    try:
        return read(data, 0, len(data), "new tuple")
    except pg._Malformed as exc:
        return str(exc)


_columns = st.lists(st.none() | st.just(...) | st.binary(max_size=8) | st.tuples(st.just("b"), st.binary(max_size=4)),
                    max_size=6)


@given(_columns, st.data())
def test_tuple_reader_agrees_with_the_checked_reader_on_any_bytes(columns, data):
    """The optimistic reader of the hot path returns what the checked reader returns, and on damaged
    input (cut, a byte changed) lets the checked reader say what is wrong."""
    raw = tup(*columns)
    assert _outcome(pg._tuple, raw) == _outcome(pg._checked_tuple, raw)
    cut = raw[: data.draw(st.integers(0, len(raw)))]
    assert _outcome(pg._tuple, cut) == _outcome(pg._checked_tuple, cut)
    if raw:
        at, byte = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(0, 255))
        damaged = raw[:at] + bytes([byte]) + raw[at + 1:]
        assert _outcome(pg._tuple, damaged) == _outcome(pg._checked_tuple, damaged)


@pytest.mark.parametrize("length", [-1, -5, -2**31, 7, 2**31 - 1])
def test_tuple_reader_refuses_lengths_outside_the_message(length):
    # "ab" then a value whose length points before its own start or past the end of the message
    raw = struct.pack("!h", 2) + b"t" + struct.pack("!i", 2) + b"ab" + b"t" + struct.pack("!i", length) + b"cdef"
    assert _outcome(pg._tuple, raw) == _outcome(pg._checked_tuple, raw)
    assert isinstance(_outcome(pg._tuple, raw), str)


def test_malformed_tuple_and_markers():
    with pytest.raises(DecodeError, match=r"unknown kind 'x' \(0x78\)"):
        decode(b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"x")
    with pytest.raises(DecodeError, match="negative value length -5"):
        decode(b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", -5))
    with pytest.raises(DecodeError, match=r"expected new tuple marker \('N'\).*got 'K'"):
        decode(b"I" + struct.pack("!I", 1) + b"K" + tup(b"1"))
    with pytest.raises(DecodeError, match=r"expected tuple marker \('K', 'O'\).*got 'N'"):
        decode(b"D" + struct.pack("!I", 1) + b"N" + tup(b"1"))
    # An update with a key tuple must still carry the new tuple.
    with pytest.raises(DecodeError, match="new tuple marker"):
        decode(b"U" + struct.pack("!I", 1) + b"K" + tup(b"1") + b"O" + tup(b"1"))


def test_invalid_utf8_name():
    with pytest.raises(DecodeError, match="origin name at offset 9 is not valid UTF-8"):
        decode(b"O" + struct.pack("!Q", 1) + b"\xff\xfe\0")


def test_out_of_range_timestamp_is_a_decode_error():
    with pytest.raises(DecodeError, match="Begin message.*outside the datetime range"):
        decode(begin_msg(1, 2**63 - 1, 1))
    with pytest.raises(DecodeError, match="outside the datetime range"):
        parse_copy_frame(b"k" + struct.pack("!QqB", 1, 2**63 - 1, 0))


# --- Begin and Commit read from their fields (a stream of small transactions) ------------------


def commit_msg(flags, commit_lsn, end_lsn, ts_us):
    return b"C" + struct.pack("!BQQq", flags, commit_lsn, end_lsn, ts_us)


_TIMES = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-(10**17), 10**17), st.sampled_from([T0_US, 0, -1]))


@given(final_lsn=st.integers(0, 2**64 - 1), ts=_TIMES, xid=st.integers(0, 2**32 - 1), extra=st.sampled_from([b"", b"\0"]))
def test_begin_fields_are_what_decode_reads_or_none_where_decode_refuses(final_lsn, ts, xid, extra):
    raw = begin_msg(final_lsn, ts, xid) + extra
    fields = pg.begin_fields(raw)
    try:
        msg = decode(raw)
    except DecodeError:
        assert fields is None
        return
    assert fields == (msg.final_lsn, to_pg_time(msg.commit_time), msg.xid)


@given(end_lsn=st.integers(0, 2**64 - 1), ts=_TIMES, extra=st.sampled_from([b"", b"\0"]))
def test_commit_end_lsn_is_what_decode_reads_or_none_where_decode_refuses(end_lsn, ts, extra):
    raw = commit_msg(0, 7, end_lsn, ts) + extra
    end = pg.commit_end_lsn(raw)
    try:
        msg = decode(raw)
    except DecodeError:
        assert end is None
        return
    assert end == msg.end_lsn


def test_begin_and_commit_fields_are_only_read_from_their_own_kind():
    assert pg.begin_fields(b"C" + begin_msg(1, T0_US, 2)[1:]) is None
    assert pg.commit_end_lsn(b"B" + commit_msg(0, 1, 2, T0_US)[1:]) is None


@given(kind=st.sampled_from([b"w", b"k", b"x"]), header=st.binary(min_size=0, max_size=30), payload=st.binary(max_size=8))
def test_the_stream_reads_an_xlogdata_frames_start_lsn_and_payload_as_parse_copy_frame_does(kind, header, payload):
    raw = kind + header + payload
    start = xlogdata_start_lsn(raw)
    try:
        frame = parse_copy_frame(raw)
    except DecodeError:
        assert start is None
        return
    if isinstance(frame, XLogData):
        assert (start, raw[XLOGDATA_PAYLOAD:]) == (frame.start_lsn, bytes(frame.payload))
    else:
        assert start is None


@given(kind=st.sampled_from([b"k", b"w"]), wal_end=st.integers(0, 2**64 - 1), ts=_TIMES, reply=st.integers(0, 255),
       extra=st.sampled_from([b"", b"\0"]))
def test_the_stream_reads_a_keepalive_as_parse_copy_frame_does(kind, wal_end, ts, reply, extra):
    raw = kind + struct.pack("!QqB", wal_end, ts, reply) + extra
    fields = keepalive_fields(raw)
    try:
        frame = parse_copy_frame(raw)
    except DecodeError:
        assert fields is None
        return
    assert fields == ((frame.wal_end, frame.reply_requested) if isinstance(frame, Keepalive) else None)
