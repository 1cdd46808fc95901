"""The compiled event reader (cdc._native.EventReader, used by cdc.events.codec.decode_event_as) against
the Python readers it stands in front of: for any record value it gives exactly what they give (value
for value and type for type: int, Decimal with its digits, JsonText, Position), or it steps aside
(None) and they decide, errors included. And it does read what the connector writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdc import native
from cdc.events import codec
from cdc.events.codec import JsonText, NotAnEvent, json_columns_of
from cdc.events.schema import Column, TableSchema
from cdc.lsn import Position

pytestmark = pytest.mark.skipif(native.built is None, reason=f"the compiled core is not built: {native.describe()}")
compiled = native.built.EventReader(Decimal, JsonText, Position).read if native.built is not None else None
QUICK = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCHEMA = TableSchema("public", "t", (
    Column("id", "integer", "integer"), Column("doc", "jsonb", "jsonb"), Column("tags", "json[]", "json", array=True),
    Column("n", "numeric", "numeric"), Column("note", "text", "text"),
), ("id",))
JSON_COLUMNS = json_columns_of(SCHEMA.to_json())
SOURCE = {"pipeline": "p", "db": "d", "schema": "public", "table": "t", "commit_lsn": "1/2A", "lsn": "0/ff", "seq": 3,
          "txid": 7, "commit_ts": "2026-11-26T20:19:10Z", "snapshot": False}


def python_reading(value, json_columns, lean=False):
    """What the Python readers give (cdc.events.codec without the compiled reader), or the error.
    `lean`: as a sink reads events (cdc.events.codec.decode_change_as), without source and ts_ms."""
    saved, codec._read_compiled = codec._read_compiled, None
    try:
        return (codec.decode_change_as if lean else codec.decode_event_as)(value, json_columns)
    except NotAnEvent as exc:
        return exc
    finally:
        codec._read_compiled = saved


def typed(value):
    """A value with the type of every part spelt out (1 != True, Decimal('1.0') != Decimal('1'), str != JsonText)."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [typed(v) for v in value])
    return (type(value).__name__, str(value) if isinstance(value, Decimal) else value)


def assert_same_or_aside(value, json_columns):
    """The compiled reader gives what the Python readers give, or None; so does its lean reading."""
    for lean in (True, False):
        expected = python_reading(value, json_columns, lean)
        got = compiled(value, json_columns, lean)
        if isinstance(expected, NotAnEvent):
            assert got is None  # the Python reader's error, in its words
        elif got is not None:
            assert typed(got) == typed(expected)
    return got, expected


def test_reads_what_the_connector_writes():
    """Every value kind as the connector encodes it (json values embedded as PostgreSQL sent them)."""
    row = {"id": 1, "doc": orjson.Fragment(b' {"a":1, "a" : 2,\n"z":[1.0, 1e2, -0]} '),
           "tags": [orjson.Fragment(b'{"k":1,  "k":2}'), None, orjson.Fragment(b'"s" ')],
           "n": "12.50", "note": 'a "quoted"\n\\ é 😀 \u0001'}
    for before, after, op in ((None, row, "c"), (row, {**row, "doc": None, "tags": []}, "u"), (row, None, "d")):
        value = orjson.dumps({"op": op, "before": before, "after": after, "source": SOURCE, "ts_ms": 17})
        for json_columns in (JSON_COLUMNS, None):
            got, expected = assert_same_or_aside(value, json_columns)
            assert got is not None, value
        lean, _ = compiled(value, JSON_COLUMNS, True)
        assert "source" not in lean and "ts_ms" not in lean and list(lean) == ["op", "before", "after"]
    event, position = compiled(orjson.dumps({"op": "c", "before": None, "after": row, "source": SOURCE}), JSON_COLUMNS)
    assert position == Position(0x1_0000002A, 0xFF, 3) and type(position) is Position
    assert event["after"]["doc"] == ' {"a":1, "a" : 2,\n"z":[1.0, 1e2, -0]} ' and type(event["after"]["doc"]) is JsonText
    assert event["after"]["tags"] == ['{"k":1,  "k":2}', None, '"s" ']


@pytest.mark.parametrize("value", [
    b"", b"[]", b"null", b"{", b'{"op":"c"}', b'{"op":1,"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","source":{"commit_lsn":"0/1","lsn":"0/1","seq":"0"}}',  # a position in another form
    b'{"op":"c","source":{"commit_lsn":" 0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}} x',
    b'{"op":"c","n":NaN,"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","n":12345678901234567890,"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","s":"\\ud800","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","s":"\x01","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","s":"\xff","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","after":{"doc":[1,NaN]},"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","n":01,"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","deep":' + b'[' * 300 + b']' * 300 + b',"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
    b'{"op":"c","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0},"ts_ms":' + b'[' * 300 + b']' * 300 + b'}',
    b'{"op":"c","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0,"x":NaN}}',
    b'{"op":"c","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0},"ts_ms":1e}',
])
def test_steps_aside_for_what_it_is_not_sure_of(value):
    for json_columns in (JSON_COLUMNS, None):
        assert compiled(value, json_columns) is None and compiled(value, json_columns, True) is None
        assert_same_or_aside(value, json_columns)


@pytest.mark.parametrize("value", [
    b'{"op":"c","source":{"commit_lsn":"0/1","lsn":"0/1","seq":0},"source":{"commit_lsn":"0/2","lsn":"0/2","seq":0}}',
    b'{"op":"c","source":null}', b'{"op":"c","source":[1]}', b'{"op":"c","source":{"lsn":"0/1","seq":0}}',
])
def test_lean_reading_steps_aside_for_a_source_that_is_not_one_object_with_a_position(value):
    """A repeated source, or one that is no object or lacks a part of the position: the Python reader decides."""
    assert compiled(value, None, True) is None
    assert_same_or_aside(value, None)


def test_lean_reading_keeps_the_last_of_repeated_position_parts_and_other_members():
    value = b'{"ts_ms":1,"op":"u","source":{"seq":1,"commit_lsn":"0/1","lsn":"0/1","seq":2,"x":[{}]},"x":1,"ts_ms":2}'
    assert_same_or_aside(value, None)
    assert compiled(value, None, True) == ({"op": "u", "x": 1}, Position(1, 1, 2)) == python_reading(value, None, True)



@pytest.mark.parametrize("special", ['\\"', "\\\\", "\\n", "\\u00e9", "\\ud83d\\ude00", "\x01", "\x1f", "\x7f", "é", "😀"])
def test_a_string_is_read_the_same_wherever_in_it_a_special_character_falls(special):
    """The reader scans a string eight bytes at a time: a quote, backslash or control character at
    every place in and around a word, in member names and values alike."""
    for at in range(0, 19):
        text = "abcdefghijklmnopqrs"[:at] + special + "tuvwxyz0123456789"[:at % 9]
        value = ('{"op":"c","after":{"note":"%s","%s":1},"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}'
                 % (text, text)).encode()
        got, expected = assert_same_or_aside(value, JSON_COLUMNS)
        if not isinstance(expected, NotAnEvent) and special not in ("\x01", "\x1f"):
            assert got is not None


@pytest.mark.parametrize("lsn, position", [
    ('"0/1"', Position(1, 1, 0)), ('"FFFFFFFF/ffffffff"', Position(2**64 - 1, 2**64 - 1, 0)),
    ('"0\\/1"', Position(1, 1, 0)), ('"00000000/0000000A"', Position(10, 10, 0))])
def test_a_lean_reading_takes_the_lsns_from_their_text_escaped_or_not(lsn, position):
    value = ('{"op":"c","source":{"commit_lsn":%s,"lsn":%s,"seq":0}}' % (lsn, lsn)).encode()
    got, expected = assert_same_or_aside(value, None)
    assert got is not None and got[1] == position == expected[1]


@pytest.mark.parametrize("lsn", ['"0/"', '"/1"', '"1/2/3"', '"123456789/0"', '"0/g"', '"0/1 "', '1', '"０/1"'])
def test_a_lean_reading_leaves_other_lsn_texts_to_the_python_reader(lsn):
    value = ('{"op":"c","source":{"commit_lsn":"0/1","lsn":%s,"seq":0}}' % lsn).encode()
    assert_same_or_aside(value, None)

_keys = st.sampled_from(["id", "doc", "tags", "n", "note", "before", "after", "op", "source", "é", 'q"', "a\\b"])
_scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.text(max_size=6)
            | st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: ("number", str(d)))
            | st.sampled_from([("number", "1e5"), ("number", "-0.0E-3"), ("number", "-0"), ("number", "1E+400")]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
                       max_leaves=10)
_spaces = st.sampled_from(["", "", "", " ", "\n ", "\t"])


@st.composite
def _texts(draw, value=_values):
    """A JSON text of a drawn value, with whitespace drawn between the tokens, escapes sometimes."""
    def text(v):
        pad = draw(_spaces)
        if isinstance(v, tuple):
            return pad + v[1]
        if isinstance(v, list):
            return pad + "[" + ",".join(text(x) for x in v) + draw(_spaces) + "]"
        if isinstance(v, dict):
            return pad + "{" + ",".join(text(k) + draw(_spaces) + ":" + text(x) for k, x in v.items()) + draw(_spaces) + "}"
        return pad + json.dumps(v, ensure_ascii=draw(st.booleans()))
    return text(draw(value)) + draw(_spaces)


@st.composite
def _events(draw):
    def image():
        return draw(st.none() | st.dictionaries(_keys, _texts(), max_size=6))
    members = {"op": json.dumps(draw(st.sampled_from(["c", "u", "d", "r"]))), "before": image(), "after": image(),
               "source": json.dumps({**SOURCE, "commit_lsn": draw(st.sampled_from(["1/2A", "0/0", "FFFFFFFF/ffffffff", "0/1"])),
                                     "seq": draw(st.integers(0, 5))}),
               "ts_ms": draw(_texts())}
    if draw(st.booleans()):
        members["before"] = members.pop("before")  # after first
    for name in draw(st.lists(st.sampled_from(["before", "after", "extra"]), max_size=2)):
        members[name + " "] = draw(_texts())  # never a repeat of a name: a dict; the repeats below
    parts = []
    for name, value in members.items():
        if isinstance(value, dict):
            value = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in value.items()) + "}"
        elif value is None:
            value = "null"
        parts.append(f'{json.dumps(name.strip())}{draw(_spaces)}:{value}')
    return ("{" + ",".join(parts) + "}").encode()


@QUICK
@given(value=_events(), json_columns=st.sampled_from([JSON_COLUMNS, None]))
@example(value=b'{"op":"u","before":{"doc":1},"before":{"doc":[ 1 ] },"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
         json_columns=JSON_COLUMNS)
@example(value=b'{"op":"u","after":{"tags":" [1]","tags":[ {"a": [null]} , null,"x" ]},"source":{"commit_lsn":"0/1","lsn":"0/1","seq":0}}',
         json_columns=JSON_COLUMNS)
def test_reads_what_the_python_readers_read_or_steps_aside(value, json_columns):
    assert_same_or_aside(value, json_columns)


@QUICK
@given(value=_events(), cut=st.integers(0, 400), insert=st.binary(max_size=2))
def test_damaged_records_read_as_the_python_readers_read_them(value, cut, insert):
    at = cut % (len(value) + 1)
    for damaged in (value[:at], value[:at] + insert + value[at:], value[:at] + value[at + 1:]):
        assert_same_or_aside(damaged, JSON_COLUMNS)


@pytest.mark.parametrize("setting, in_use", [("0", False), ("1", True)])
def test_cdc_native_0_keeps_the_python_readers(setting, in_use):
    """CDC_NATIVE=0 selects the pure-Python path for reading events too (cdc.native)."""
    check = "from cdc.events import codec; print(codec._read_compiled is not None)"
    env = {**os.environ, "CDC_NATIVE": setting}
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(in_use)
