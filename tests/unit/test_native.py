"""The compiled core (cdc._native, see cdc/native.py) against the pure-Python path it replaces: the same
tuples from the same TupleData, the same rows (to the byte, as orjson encodes them) and the same errors
from the same column text, for text in the form PostgreSQL prints and for any other text."""

from __future__ import annotations

import datetime as dt
import math
import os
import struct

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdc import native
from cdc.config import TableRef
from cdc.connector.tables import TableStream, insert_encoder
from cdc.errors import DecodeError
from cdc.events.build import UNCHANGED
from cdc.events.codec import EventSources, encode_change
from cdc.events.envelope import TransactionInfo
from cdc.events.schema import Column, TableSchema
from cdc.source.postgres import pgoutput
from cdc.source.postgres.catalog import TypeDescription
from cdc.source.postgres.values import ValueDecoder, native_conversion


def test_compiled_core_is_built_where_required():
    """`make test` sets CDC_REQUIRE_NATIVE=1: a machine with the build tools must not silently run the
    pure-Python path (cdc.native raises at import then; this says it in the test report too)."""
    if os.environ.get("CDC_REQUIRE_NATIVE") != "1":
        pytest.skip("CDC_REQUIRE_NATIVE is not set")
    assert native.built is not None, native.describe()


core = native.built
pytestmark = pytest.mark.skipif(core is None, reason=f"the compiled core is not built: {native.describe()}")
QUICK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# TupleData

def tuple_data(values: list) -> bytes:
    """The TupleData pgoutput writes for these values (bytes: 't', None: 'n', UNCHANGED_TOAST: 'u')."""
    out = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is pgoutput.UNCHANGED_TOAST:
            out.append(b"u")
        else:
            out.append(b"t" + struct.pack("!i", len(value)) + value)
    return b"".join(out)


COLUMN_VALUES = st.lists(st.one_of(st.none(), st.just(pgoutput.UNCHANGED_TOAST), st.binary(max_size=40)), max_size=12)


@QUICK
@given(values=COLUMN_VALUES, prefix=st.binary(max_size=5), suffix=st.binary(max_size=5))
def test_tuples_read_alike(values, prefix, suffix):
    data = prefix + tuple_data(values) + suffix
    expected = pgoutput._python_tuple(data, len(prefix), len(data), "new tuple")
    assert expected == (tuple(values), len(data) - len(suffix))
    assert core.TupleReader(pgoutput.UNCHANGED_TOAST).read(data, len(prefix)) == expected


@QUICK
@given(values=COLUMN_VALUES, cut=st.integers(0, 400), flip=st.tuples(st.integers(0, 400), st.integers(0, 255)))
@example(values=[b"x"], cut=400, flip=(2, ord("b")))  # a binary value: the Python reader's
def test_damaged_tuples_go_to_the_python_reader(values, cut, flip):
    """Where the core reads a tuple it reads what the Python reader reads; anything else (cut short, an
    unknown or binary kind, a negative length) it leaves to the Python reader, which names the problem."""
    data = bytearray(tuple_data(values)[:cut])
    if flip[0] < len(data):
        data[flip[0]] = flip[1]
    data = bytes(data)
    try:
        expected = pgoutput._python_tuple(data, 0, len(data), "new tuple")
    except pgoutput._Malformed:
        expected = None
    found = core.TupleReader(pgoutput.UNCHANGED_TOAST).read(data, 0)
    assert found is None or found == expected
    if expected is not None and not any(isinstance(v, pgoutput.BinaryValue) for v in expected[0]):
        assert found == expected


def python_decode(data: bytes):
    """pgoutput.decode on the pure-Python path: the message, or the DecodeError's text."""
    native_change, tuple_ = pgoutput._native_change, pgoutput._tuple
    pgoutput._native_change, pgoutput._tuple = None, pgoutput._python_tuple
    try:
        return pgoutput.decode(data, lsn=1)
    except DecodeError as exc:
        return str(exc)
    finally:
        pgoutput._native_change, pgoutput._tuple = native_change, tuple_


def change_message(kind: str, marker: str, before: list, new: list, relation_id: int) -> bytes:
    head = kind.encode() + struct.pack("!I", relation_id)
    if kind == "I":
        return head + b"N" + tuple_data(new)
    if kind == "D":
        return head + marker.encode() + tuple_data(before)
    return head + (marker.encode() + tuple_data(before) if marker != "N" else b"") + b"N" + tuple_data(new)


CHANGES = st.builds(change_message, st.sampled_from("IUD"), st.sampled_from("KON"), COLUMN_VALUES, COLUMN_VALUES,
                    st.integers(0, 2**32 - 1))


@QUICK
@given(message=CHANGES, cut=st.integers(0, 400), flip=st.tuples(st.integers(0, 400), st.integers(0, 255)),
       extra=st.binary(max_size=2))
@example(message=b"U\0\0\0\1K\0\0N\0\0", cut=400, flip=(400, 0), extra=b"")
@example(message=b"I\0\0\0\1N\0\1b\0\0\0\1x", cut=400, flip=(400, 0), extra=b"")  # binary: Python's
def test_changes_decode_alike(message, cut, flip, extra):
    """Insert, Update and Delete messages, whole or damaged: where the core decodes one it is the message
    the Python decoder makes; the rest (and every error) is the Python decoder's."""
    data = bytearray(message[:cut] + extra)
    if flip[0] < len(data):
        data[flip[0]] = flip[1]
    data = bytes(data)
    expected = python_decode(data) if data else "empty"
    found = core.ChangeDecoder(pgoutput.UNCHANGED_TOAST, pgoutput.Insert, pgoutput.Update, pgoutput.Delete).decode(data)
    if found is not None:
        assert type(found) is type(expected) and found == expected
    else:  # what the core leaves to Python: other kinds, errors, binary values
        images = [getattr(expected, name, None) for name in ("old", "key", "new")]
        assert (isinstance(expected, str) or data[0] not in b"IUD"
                or any(isinstance(v, pgoutput.BinaryValue) for image in images if image for v in image))
    if native.core is not None and data:
        decoded = pgoutput.decode(data, lsn=1) if not isinstance(expected, str) else expected
        assert decoded == expected


# --------------------------------------------------------------------------------------------------
# Column values

def describe(kind: str, array: bool = False, delimiter: str = ",") -> TypeDescription:
    oids = {"smallint": 21, "integer": 23, "bigint": 20, "real": 700, "double": 701, "boolean": 16, "json": 114,
            "jsonb": 3802, "bytea": 17, "date": 1082, "timestamptz": 1184, "timestamp": 1114, "time": 1083,
            "timetz": 1266, "numeric": 1700, "text": 25, "uuid": 2950, "interval": 1186}
    return TypeDescription(kind + ("[]" if array else ""), kind, array, True, oids.get(kind, 25), delimiter)


DECODER = ValueDecoder(None)  # psycopg's loaders without a connection: UTF-8, DateStyle ISO


def streams(desc: TypeDescription) -> tuple[TableStream, TableStream]:
    """A one-column (plus key) table of the type: through the compiled core, and the pure-Python path."""
    names = ("id", "v")
    descs = (describe("integer"), desc)
    converters = tuple(DECODER.converter(d) for d in descs)
    schema = TableSchema("public", "t", tuple(Column(n, d.type, d.kind, d.array) for n, d in zip(names, descs)), ("id",))
    common = dict(ref=TableRef("public", "t"), topic="t", schema=schema, names=names, converters=converters,
                  key_names=("id",), headers=[])
    fast = TableStream(**common, conversions=tuple(native_conversion(d) for d in descs))
    assert fast.native_plan is not None or native.core is None
    fast.native_plan = core.RowPlan(list(zip(names, fast.conversions, converters)), pgoutput.UNCHANGED_TOAST,
                                     UNCHANGED, orjson.Fragment)  # whatever CDC_NATIVE says
    return fast, TableStream(**common)


def outcome(stream: TableStream, values: tuple):
    try:
        row = stream.row(values, 0x16B374D848)
    except DecodeError as exc:
        return ("error", str(exc))
    try:
        encoded = orjson.dumps(row, default=repr)  # repr: UNCHANGED
    except orjson.JSONEncodeError:  # e.g. an integer past 64 bits: publishing reports it (alike, if the rows are)
        encoded = repr(row).encode()
    return ("row", encoded, [type(v) for v in row.values()])


def assert_alike(desc: TypeDescription, texts: list[bytes | None]):
    fast, python = streams(desc)
    encoder = insert_encoder(fast.names, fast.converters, fast.conversions, fast.key_names, core)
    assert (encoder is None) == (fast.conversions[1] not in core.INSERT_CONVERSIONS)
    for text in texts:
        values = (b"1", text)
        assert outcome(fast, values) == outcome(python, values), text
        if encoder is not None:
            assert_insert_encoded_alike(encoder, python, values)


SOURCES = EventSources("p", "db", "public", "t", TransactionInfo(0x16B374D848, "16/B374D848", 7, "2026-12-07T03:30:01Z"),
                       False)


def encode_insert(encoder, message: bytes, ts_ms: int = 0):
    return encoder.encode(message, SOURCES.head, "16/B374D000", 3, SOURCES.tail, ts_ms)


SNAPSHOT_SOURCES = EventSources("p", "db", "public", "t", SOURCES.txn, True)


def assert_insert_encoded_alike(encoder, python: TableStream, values: tuple) -> None:
    """The InsertEncoder's key and value of an INSERT of `values` are the general path's bytes
    (row -> encode_change, key_of -> orjson), or it leaves the INSERT to the general path (None);
    and so are those of the snapshot's `r` event of a chunk's row of the same values (encode_row)."""
    encoded = encode_insert(encoder, b"I\0\0\0\1N" + tuple_data(list(values)), 1_764_187_150_994)
    snapshot = encoder.encode_row(values, SNAPSHOT_SOURCES.head, "16/B374D000", 3, SNAPSHOT_SOURCES.tail,
                                  1_764_187_150_994)
    assert (snapshot is None) == (encoded is None), values
    if encoded is None:
        return
    row = python.row(values, 0)  # the encoder only encodes what the general path encodes without error
    key = orjson.dumps({k: row[k] for k in python.key_names})
    expected_value = encode_change("c", None, row, SOURCES.at("16/B374D000", 3), 1_764_187_150_994)
    assert encoded == (key, expected_value), values
    expected_value = encode_change("r", None, row, SNAPSHOT_SOURCES.at("16/B374D000", 3), 1_764_187_150_994)
    assert snapshot == (key, expected_value), values


def test_insert_encoder_encodes_what_postgres_prints():
    """The usual values take the one-step path (else the connector would gain nothing), NULLs too."""
    printed = {"integer": b"-42", "bigint": b"9007199254740993", "boolean": b"t", "jsonb": b'{"a": [1, 2.50]}',
               "text": 'a "q" \\ \n \x01 é 中'.encode(), "date": b"2026-12-07",
               "timestamptz": b"2026-12-07 03:30:01.5+00", "bytea": b"\\x00ff10", "numeric": b"-1.50"}
    for kind, text in printed.items():
        fast, python = streams(describe(kind))
        encoder = insert_encoder(fast.names, fast.converters, fast.conversions, fast.key_names, core)
        for values in [(b"1", text), (b"1", None)]:
            assert encode_insert(encoder, b"I\0\0\0\1N" + tuple_data(list(values))) is not None, kind
            assert_insert_encoded_alike(encoder, python, values)
    fast, _ = streams(describe("text", array=True))
    encoder = insert_encoder(fast.names, fast.converters, fast.conversions, fast.key_names, core)
    assert encode_insert(encoder, b"I\0\0\0\1N" + tuple_data([b"1", b'{a,"b c",NULL}'])) is not None


def test_snapshot_rows_of_another_shape_go_to_the_general_path():
    """A chunk's row the encoder cannot read as its relation's texts is left to the general path."""
    fast, _ = streams(describe("text"))
    encoder = insert_encoder(fast.names, fast.converters, fast.conversions, fast.key_names, core)
    for row in [(b"1",), (b"1", b"a", b"b"), (b"1", "a"), (1, b"a"), (b"1", bytearray(b"a"))]:
        assert encoder.encode_row(row, SNAPSHOT_SOURCES.head, "0/1", 0, SNAPSHOT_SOURCES.tail, 0) is None, row
    assert encoder.encode_row((b"1", b"a"), SNAPSHOT_SOURCES.head, "0/1", 0, SNAPSHOT_SOURCES.tail, 0) is not None


def test_a_chunk_encoded_in_one_call_is_its_rows_encoded_one_by_one_up_to_the_first_left_to_the_general_path():
    """encode_rows gives the records encode_row gives each row, at seq, seq + 1, ..., from `start`
    to `end`, and stops before the first row the general path must decide: none is skipped or encoded twice."""
    fast, _ = streams(describe("text"))
    encoder = insert_encoder(fast.names, fast.converters, fast.conversions, fast.key_names, core)
    rows = [(b"1", b"a"), (b"2", None), (b"3", 'é "q"'.encode()), (b"4", "not bytes"), (b"5", b"e"), (b"6", b"f")]
    args = (SNAPSHOT_SOURCES.head, "16/B374D000", 7, SNAPSHOT_SOURCES.tail, 1_764_187_150_994)

    def one_by_one(first: int, count: int) -> list:
        return [encoder.encode_row(rows[first + n], args[0], args[1], args[2] + n, *args[3:]) for n in range(count)]

    assert encoder.encode_rows(rows, 0, 6, *args) == one_by_one(0, 3)
    assert encoder.encode_rows(rows, 1, 100, *args) == one_by_one(1, 2)
    assert encoder.encode_rows(rows, 0, 2, *args) == one_by_one(0, 2)  # up to `end`
    assert encoder.encode_rows(rows, 3, 6, *args) == []  # the row of a str: the general path's
    assert encoder.encode_rows(rows, 4, 6, *args) == one_by_one(4, 2)
    assert encoder.encode_rows(rows, 6, 7, *args) == []
    assert [orjson.loads(v)["source"]["seq"] for _, v in encoder.encode_rows(rows, 0, 6, *args)] == [7, 8, 9]


@pytest.mark.parametrize("kind", ["real", "double", "time"])
def test_insert_encoder_leaves_floats_and_python_converters_alone(kind):
    fast, _ = streams(describe(kind))
    assert insert_encoder(fast.names, fast.converters, fast.conversions, fast.key_names, core) is None


TWO_COLUMN_INSERTS = st.builds(
    lambda key, value: change_message("I", "N", [], [key, value], 1),
    st.integers(-2**31, 2**31).map(lambda i: str(i).encode()) | st.binary(max_size=4) | st.none(),
    st.one_of(st.none(), st.just(pgoutput.UNCHANGED_TOAST), st.binary(max_size=40), st.text(max_size=20).map(str.encode)))


@QUICK
@given(message=CHANGES | TWO_COLUMN_INSERTS, cut=st.integers(0, 400),
       flip=st.tuples(st.integers(0, 400), st.integers(0, 255)))
def test_damaged_inserts_go_to_the_general_path(message, cut, flip):
    """Whatever the bytes, the encoder gives the general path's record or None: never other bytes."""
    fast, python = streams(describe("text"))
    encoder = insert_encoder(fast.names, fast.converters, fast.conversions, fast.key_names, core)
    data = bytearray(message[:cut])
    if flip[0] < len(data):
        data[flip[0]] = flip[1]
    encoded = encode_insert(encoder, bytes(data))
    if encoded is not None:
        msg = pgoutput.decode(bytes(data))
        assert isinstance(msg, pgoutput.Insert) and len(msg.new) == 2
        assert_insert_encoded_alike(encoder, python, msg.new)


def some_text(alphabet: str) -> st.SearchStrategy[bytes]:
    """Text near the printed forms (what the core must leave to Python), and any bytes at all."""
    return st.one_of(st.text(alphabet, max_size=30).map(str.encode), st.binary(max_size=20))


def pg_float(value: float) -> bytes:
    if math.isnan(value):
        return b"NaN"
    if math.isinf(value):
        return b"Infinity" if value > 0 else b"-Infinity"
    return repr(value).encode()  # shortest exact digits, as PostgreSQL 12+ prints


@QUICK
@given(st.lists(st.integers(-2**31, 2**31 - 1).map(lambda i: str(i).encode()) | some_text("0123456789-+ _e"), max_size=8))
def test_integers_alike(texts):
    for kind in ("smallint", "integer"):
        assert_alike(describe(kind), texts)


@QUICK
@given(st.lists(st.integers(-2**63, 2**63 - 1).map(lambda i: str(i).encode())
                | st.integers(-2**53 - 2, -2**53 + 2).map(lambda i: str(i).encode())
                | st.integers(2**53 - 2, 2**53 + 2).map(lambda i: str(i).encode())
                | some_text("0123456789-+ _"), max_size=8))
@example([b"-0", b"007", b"9" * 39, b"-", b""])
def test_bigints_alike(texts):
    assert_alike(describe("bigint"), texts)


@QUICK
@given(st.lists(st.floats().map(pg_float) | st.floats(width=32).map(pg_float) | some_text("0123456789.-+eEinfaNIty"),
                max_size=8))
@example([b"1e400", b"-1e400", b"1e-400", b"5.", b".5", b"1E5", b"inf", b"nan", b"-NaN", b"0.1", b"-0"])
def test_floats_alike(texts):
    for kind in ("real", "double"):
        assert_alike(describe(kind), texts)


@QUICK
@given(st.lists(st.sampled_from([b"t", b"f", b"true", b""]) | some_text("tf"), max_size=6))
def test_booleans_alike(texts):
    assert_alike(describe("boolean"), texts)


@QUICK
@given(st.lists(st.text(max_size=30).map(str.encode) | st.binary(max_size=20), max_size=6))
@example([b'{"a": 1e400, "b": "\\u00e9"}', '"\u00e9\U0001F600"'.encode(), b"\xff"])
def test_json_alike(texts):
    for kind in ("json", "jsonb"):
        assert_alike(describe(kind), texts)


@QUICK
@given(st.lists(st.text(max_size=30).map(str.encode) | st.binary(max_size=20), max_size=6))
@example(['quote " backslash \\ newline \n tab \t nul-ish \x01 é \U0001F600'.encode(), b"\xed\xa0\x80", b"\xff"])
def test_texts_alike(texts):
    for kind in ("text", "numeric", "uuid", "interval"):
        assert_alike(describe(kind), texts)


@QUICK
@given(st.lists(st.dates().map(lambda d: d.isoformat().encode()) | some_text("0123456789- BCinfty"), max_size=6))
@example([b"infinity", b"-infinity", b"2020-01-01 BC", b"10000-01-01", b"2020-02-30", b"0000-01-01", b"2020-1-01"])
def test_dates_alike(texts):
    assert_alike(describe("date"), texts)


def pg_timestamptz(moment: dt.datetime, digits: int) -> bytes:
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    fraction = f"{moment.microsecond:06d}"[:digits].rstrip("0") if digits else ""
    return f"{text}{'.' + fraction if fraction else ''}+00".encode()


@QUICK
@given(st.lists(st.builds(pg_timestamptz, st.datetimes(), st.integers(0, 6)) | some_text("0123456789-:. +Tinfy"),
                max_size=6))
@example([b"2020-01-01 00:00:00.000000+00", b"2020-01-01 24:00:00+00", b"2020-01-01 00:00:00+01", b"infinity",
          b"2020-01-01 00:00:00.1234567+00", b"2020-01-01 00:00:00.+00", b"2020-01-01 00:00:00.5+00:00",
          b"1999-12-31 23:59:60+00", b"2020-01-01 00:00:00 BC+00"])
def test_timestamptzs_alike(texts):
    assert_alike(describe("timestamptz"), texts)


@QUICK
@given(st.lists(st.binary(max_size=20).map(lambda b: b"\\x" + b.hex().encode()) | some_text("\\x0123456789abcdefABCDEF"),
                max_size=6))
@example([b"\\x", b"\\xABCD", b"\\x0", b"abc\\\\000", b"\\x 00"])
def test_byteas_alike(texts):
    assert_alike(describe("bytea"), texts)


def array_out(value) -> str:
    """An array's text as PostgreSQL's array_out prints it (',' delimiter)."""
    if isinstance(value, list):
        return "{" + ",".join(array_out(v) for v in value) + "}"
    if value is None:
        return "NULL"
    needs_quotes = value == "" or value.upper() == "NULL" or any(c in value for c in '{},"\\') or any(
        c.isspace() for c in value)
    if needs_quotes:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


ELEMENTS = st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["NULL", "null", "", " ", "a,b", '"', "\\"]))
ARRAYS = st.lists(ELEMENTS, max_size=5) | st.lists(st.lists(ELEMENTS, min_size=2, max_size=2), min_size=1, max_size=3)


@QUICK
@given(st.lists(ARRAYS.map(lambda a: array_out(a).encode()) | some_text('{}",\\ NULab[]=:1') , max_size=6))
@example([b"{}", b"{{}}", b"[0:1]={a,b}", b"{a,b", b"{a,,b}", b"{ a }", b'{"a\\nb"}', b"{a}x", b'{"\xff"}'])
def test_text_arrays_alike(texts):
    for kind in ("text", "numeric", "uuid"):
        desc = describe(kind, array=True)
        assert native_conversion(desc) != 0  # the core splits these arrays itself
        assert_alike(desc, texts)


@pytest.mark.parametrize("kind", ["integer", "bigint", "real", "boolean", "json", "date", "timestamptz", "bytea",
                                  "timestamp"])
def test_other_arrays_go_to_python(kind):
    desc = describe(kind, array=True)
    assert native_conversion(desc) == 0
    assert_alike(desc, [b"{1,NULL}", b"{}", b'{"2020-01-01 00:00:00+00"}', b"{t,f}"])


def test_box_arrays_go_to_python():
    assert native_conversion(describe("box", array=True, delimiter=";")) == 0


def test_unchanged_nulls_and_dropped_columns_alike():
    """NULL, the unchanged-TOAST marker, a column the privacy policy drops (no converter), a binary
    value (a bytes subclass) and a tuple shorter or longer than the relation."""
    desc = describe("text")
    fast, python = streams(desc)
    for values in [(b"1", None), (b"1", pgoutput.UNCHANGED_TOAST), (b"1",), (b"1", b"x", b"extra"),
                   (b"1", pgoutput.BinaryValue(b"bin"))]:
        assert outcome(fast, values) == outcome(python, values)
    assert fast.row((b"1", pgoutput.UNCHANGED_TOAST), 0)["v"] is UNCHANGED
    dropped = core.RowPlan([("id", 1, int), ("v", 6, None)], pgoutput.UNCHANGED_TOAST, UNCHANGED, orjson.Fragment)
    assert dropped.row((b"1", b"secret")) == {"id": 1}


def test_a_refused_value_names_its_column():
    fast, _ = streams(describe("integer"))
    with pytest.raises(DecodeError, match=r"cannot decode column v of public\.t \(integer\) at LSN 16/B374D848: ValueError"):
        fast.row((b"1", b"twelve"), 0x16B374D848)


@QUICK
@given(st.integers(0, 2**64 - 1) | st.integers() | st.booleans())
@example(0x16B374D848)
def test_lsns_format_alike(lsn):
    from cdc.lsn import python_format_lsn

    assert core.LsnFormatter(python_format_lsn).format(lsn) == python_format_lsn(lsn)


@QUICK
@given(kind=st.sampled_from(b"wkx"), header=st.binary(min_size=24, max_size=24), payload=st.binary(max_size=30),
       cut=st.integers(0, 60))
def test_frames_parse_alike(kind, header, payload, cut):
    """XLogData frames the core parses are the Python parser's (the payload a view into the frame); the
    rest (keepalives, short frames, unknown kinds) are left to it."""
    from cdc.source.postgres import frames

    frame = (bytes([kind]) + header + payload)[:cut]
    try:
        expected = _python_parse_frame(frame)
    except DecodeError as exc:
        expected = str(exc)
    found = core.FrameParser(frames.XLogData).parse(frame)
    if found is None:
        assert not isinstance(expected, frames.XLogData)
    else:
        assert found == expected and type(found.payload) is memoryview and found.payload.obj is frame


def _python_parse_frame(frame: bytes):
    from cdc.source.postgres import frames

    parse, frames._native_xlogdata = frames._native_xlogdata, None
    try:
        return frames.parse_copy_frame(frame)
    finally:
        frames._native_xlogdata = parse
