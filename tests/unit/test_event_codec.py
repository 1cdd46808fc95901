"""The event codec: exact numbers, json/jsonb values as their text, one error for what is not an event;
and the connector's size floor of an event, from the text PostgreSQL sent."""

from __future__ import annotations

import base64
import json
from decimal import Decimal

import orjson
from hypothesis import given
from hypothesis import strategies as st
import pytest

from cdc.events.codec import (JsonText, NotAnEvent, decode_change_as, decode_event, decode_event_as, decode_position,
                              decode_source, json_columns_of, loads)
from cdc.events.origin import SourceOrigin
from cdc.events.schema import Column, TableSchema
from cdc.events.transaction import decode_end
from cdc.lsn import Position, parse_lsn
from cdc.sink.values import postgres_converter, sqlite_converter
from cdc.source.postgres.catalog import TypeDescription
from cdc.source.postgres.pgoutput import UNCHANGED_TOAST
from cdc.source.postgres.values import ValueDecoder, least_event_bytes, least_json_per_text_byte

SOURCE = {"pipeline": "p", "db": "d", "schema": "public", "table": "t", "commit_lsn": "0/20", "lsn": "0/10", "seq": 3,
          "txid": 7, "commit_ts": "2026-11-26T20:19:10Z", "snapshot": False}
SCHEMA = TableSchema("public", "t", (
    Column("id", "integer", "integer"), Column("j", "json", "json"), Column("jb", "jsonb", "jsonb"),
    Column("ja", "json[]", "json", array=True), Column("n", "numeric", "numeric"),
    Column("tags", "text[]", "text", True),
), ("id",))
HEADERS = [("cdc.origin", b"{}"), ("cdc.schema", SCHEMA.to_json())]
JSON_TEXT = b' {"a":1, "a" : 2,\n"z":[1.0, 1e2, -0]} '
BIG = "9" * 5000


def event(before=None, after=None, **extra) -> bytes:
    """An event value as the connector encodes it: json/jsonb values embedded as PostgreSQL sent them."""
    return orjson.dumps({"op": "u" if before else "c", "before": before, "after": after, "source": SOURCE,
                         "ts_ms": 1, **extra})


def test_numbers_are_exact_without_a_digit_limit():
    assert loads(b"123456789012345678901234567890") == 123456789012345678901234567890
    assert loads("[0.1, 1e400, -7]") == [Decimal("0.1"), Decimal("1e400"), -7]
    huge = loads(f'{{"n": {BIG}, "m": -{BIG}.5}}')
    assert huge == {"n": Decimal(BIG), "m": Decimal(f"-{BIG}.5")}
    assert str(huge["n"]) == BIG  # and it prints back with every digit


def test_json_values_are_their_text_as_the_event_holds_it():
    raw_jsonb = f'{{"n": {BIG}, "s": "\\u00e9"}}'.encode()
    value = event(
        before={"id": 1, "j": orjson.Fragment(b"[1, 1]"), "jb": None, "ja": None, "n": "1.50", "tags": ["a", None]},
        after={"id": 1, "j": orjson.Fragment(JSON_TEXT), "jb": orjson.Fragment(raw_jsonb),
               "ja": [orjson.Fragment(b' {"k":1,  "k":2}'), None, orjson.Fragment(b'"s" ')], "n": "2", "tags": []},
    )
    parsed, position = decode_event(value, HEADERS)
    assert position == Position(parse_lsn("0/20"), parse_lsn("0/10"), 3)
    after = parsed["after"]
    assert type(after["j"]) is JsonText and after["j"] == JSON_TEXT.decode()  # duplicates, order, whitespace
    assert after["jb"] == raw_jsonb.decode()
    assert after["ja"] == [' {"k":1,  "k":2}', None, '"s" '] and type(after["ja"][0]) is JsonText
    assert (after["id"], after["n"], after["tags"]) == (1, "2", [])  # other columns: plain values
    assert parsed["before"] == {"id": 1, "j": "[1, 1]", "jb": None, "ja": None, "n": "1.50", "tags": ["a", None]}
    assert parsed["source"] == SOURCE and parsed["ts_ms"] == 1
    # Without the schema header the same event parses to values (json merged, numbers exact).
    plain, _ = decode_event(value)
    assert plain["after"]["j"] == {"a": 2, "z": [Decimal("1.0"), Decimal("1e2"), 0]}
    assert plain["after"]["jb"]["n"] == Decimal(BIG)


def test_sinks_write_json_text_unchanged():
    after = decode_event(event(after={"id": 1, "j": orjson.Fragment(JSON_TEXT), "jb": None,
                                      "ja": [orjson.Fragment(b'{"k":1, "k":2}'), None]}), HEADERS)[0]["after"]
    for make in (postgres_converter, sqlite_converter):
        assert make(SCHEMA.column("j"))(after["j"]) == JSON_TEXT.decode()
    assert postgres_converter(SCHEMA.column("ja"))(after["ja"]) == '{"{\\"k\\":1, \\"k\\":2}",NULL}'
    assert sqlite_converter(SCHEMA.column("ja"))(after["ja"]) == '[{"k":1, "k":2},null]'


@pytest.mark.parametrize("value", [
    b"not json", b"[]", b"{}", b'"text"', b"\xff\xfe", b"{} []",
    orjson.dumps({"op": "c", "after": {}}),  # no source
    orjson.dumps({"op": "c", "source": {"commit_lsn": "0/1", "lsn": "0/1"}}),  # no seq
    orjson.dumps({"op": "c", "source": {"commit_lsn": "nonsense", "lsn": "0/1", "seq": 0}}),
    orjson.dumps({"op": 1, "source": SOURCE}), orjson.dumps({"source": SOURCE}),
    orjson.dumps({"op": "c", "source": SOURCE, "after": {"j": 1}})[:-3],  # cut short
    b'{"op": "c", "deep": ' + b"[" * 5000 + b"]" * 5000 + b', "source": {"commit_lsn": "0/1", "lsn": "0/1", "seq": 0}}',
])
@pytest.mark.parametrize("headers", [(), HEADERS], ids=["plain", "with-json-columns"])
def test_a_record_that_is_not_an_event_raises_not_an_event(value, headers):
    with pytest.raises(NotAnEvent):
        decode_event(value, headers)


@pytest.mark.parametrize("value", [
    event(after={"id": 1, "j": orjson.Fragment(JSON_TEXT), "n": "1.50", "tags": ["a"]}),
    event(before={"id": 1}, after={"id": 2}, unchanged=["j"]),
    b'{"op": "d", "before": {"id": 1}, "source": {"commit_lsn": "0/1", "lsn": "0/1", "seq": 0}, "n": NaN}',
])
def test_a_sinks_reading_is_the_event_without_source_and_ts_ms(value):
    """decode_change_as (a sink's reading): decode_event_as, the event without the members a sink never reads."""
    columns = json_columns_of(SCHEMA.to_json())
    event_, position = decode_event_as(value, columns)
    assert decode_change_as(value, columns) == ({k: v for k, v in event_.items() if k not in ("source", "ts_ms")}, position)
    with pytest.raises(NotAnEvent):
        decode_change_as(value[:-2], columns)


def test_not_an_event_never_quotes_a_value():
    with pytest.raises(NotAnEvent) as raised:
        decode_event(b'{"op": "c", "after": {"secret": "CANARY"}, "source": {"commit_lsn": "0/1"}}', HEADERS)
    assert "CANARY" not in str(raised.value)
    assert decode_event.__module__ == "cdc.events.codec" and issubclass(NotAnEvent, ValueError)


def test_position_readers_take_events_and_transaction_records():
    assert decode_position(event(after={"id": 1, "n": BIG})) == Position(parse_lsn("0/20"), parse_lsn("0/10"), 3)
    end = orjson.dumps({"status": "END", "event_count": 1, "topics": {"t": 1},
                        "source": {"commit_lsn": "0/20", "lsn": "0/20", "seq": 0}})
    assert decode_source(end)["commit_lsn"] == "0/20"
    assert decode_end(end).counts == {"t": 1}
    with pytest.raises(NotAnEvent):
        decode_source(b"[1]")
    origin = SourceOrigin("7716108093618555543", 2, 0x1000)
    assert SourceOrigin.from_json(origin.to_json()) == origin


def test_schema_defaults_keep_every_digit():
    schema = TableSchema("s", "t", (Column("d", "jsonb", "jsonb", default=orjson.Fragment(f"[{BIG}]".encode())),), ())
    assert TableSchema.from_json(schema.to_json()).columns[0].default == [Decimal(BIG)]


# --------------------------------------------------------------------------------------------------
# The size floor of an event, from pgoutput's text


def convert(kind: str, array: bool, text: str) -> bytes:
    desc = TypeDescription(kind + ("[]" if array else ""), kind, array, True, _OID[(kind, array)])
    return orjson.dumps(ValueDecoder(None).converter(desc)(text.encode()))


_OID = {("bytea", False): 17, ("bytea", True): 1001, ("json", True): 199, ("timestamptz", True): 1185,
        ("text", True): 1009, ("text", False): 25, ("double", False): 701, ("boolean", True): 1000}


@pytest.mark.parametrize("kind,array,text", [
    ("bytea", False, "\\x" + "ff" * 3000),
    ("bytea", False, "\\x"),
    ("bytea", True, "{" + ",".join(['"\\\\x"'] * 500) + "}"),  # empty bytea elements: the worst case
    ("json", True, "{" + ",".join(['"\\"\\""'] * 200) + "}"),  # "" elements: quotes escaped in the literal
    ("json", True, '{"\\"\\\\\\\\\\"\\"",NULL}'),  # a string holding two backslashes
    ("timestamptz", True, "{" + ",".join(['"2026-11-26 20:19:10.994151+00"'] * 100) + "}"),
    ("text", True, '{"a\\\\b","c\\"d",NULL,plain}'),
    ("text", False, "é\n\"\\"),
    ("double", False, "0.1"),
    ("boolean", True, "{t,f}"),
])
def test_the_floor_never_exceeds_the_json_a_value_becomes(kind, array, text):
    assert len(convert(kind, array, text)) >= len(text.encode()) * least_json_per_text_byte(kind, array)


def test_event_floor_counts_carried_values_and_the_larger_image():
    ratios = (1.0, 0.0, 1 / 3)  # text, a masked column, bytea
    assert least_event_bytes(ratios, None, (b"abc", b"x" * 1000, b"\\x" + b"00" * 30)) == 3 + 20
    # An UPDATE: an unchanged value comes from the before-image; a NULL does not.
    old = (b"a" * 100, None, None)
    assert least_event_bytes(ratios, old, (UNCHANGED_TOAST, None, None)) == 100
    assert least_event_bytes(ratios, old, (None, None, None)) == 100  # the before-image itself
    assert least_event_bytes(ratios, (b"k", None, None), (b"b" * 10, None, None)) == 10
    assert least_event_bytes(ratios, (b"k", None, None), None) == 1  # a delete of a key


def test_base64_of_bytea_stays_above_the_floor():
    raw = bytes(range(256)) * 10
    text = "\\x" + raw.hex()
    assert orjson.loads(convert("bytea", False, text)) == base64.b64encode(raw).decode()


# The sink's fast reader (one C parse, json values found by member name) must read every event
# exactly as the member-by-member walk does, or step aside (None) and leave it to the walk.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.text(max_size=8)
    | st.sampled_from(["doc", "tags", "before", "after", '"doc":', "a\\b"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["doc", "k", "tags", "after"]), inner, max_size=3),
    max_leaves=8,
)


@given(doc=_json_values, tags=st.none() | st.lists(_json_values, max_size=3), other=st.text(max_size=8),
       before=st.booleans(), spaced=st.booleans())
def test_the_fast_event_reader_reads_what_the_walk_reads_or_steps_aside(doc, tags, other, before, spaced):
    from cdc.events.codec import _event_keeping_json_text, _event_with_json_spans

    row = {"id": 1, "doc": doc, "tags": tags, "note": other}
    event = {"op": "u" if before else "c", "before": row if before else None, "after": row,
             "source": {"commit_lsn": "0/1", "lsn": "0/1", "seq": 0}}
    text = json.dumps(event, separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=False)
    scalars, arrays = frozenset({"doc"}), frozenset({"tags"})
    members = (("doc", '"doc"'), ("tags", '"tags"'))
    fast = _event_with_json_spans(text, scalars, arrays, members)
    if fast is not None:
        assert fast == _event_keeping_json_text(text, scalars, arrays)
        assert [type(v) for v in (fast["after"]["doc"],)] == [type(_event_keeping_json_text(text, scalars, arrays)["after"]["doc"])]


# msgspec reads events first (cdc.events.codec._event_by_msgspec): whatever it reads must be what the
# json module's exact reading gives, value for value and type for type (int, Decimal, JsonText), or
# it steps aside.
_numbers = (st.integers(-10**40, 10**40) | st.floats(allow_nan=False, allow_infinity=False)
            | st.decimals(allow_nan=False, allow_infinity=False).map(str))


@given(doc=_json_values, tags=st.none() | st.lists(_json_values, max_size=3), n=_numbers, text=st.text(max_size=8),
       before=st.booleans(), json_columns=st.booleans())
def test_msgspec_reads_what_the_exact_reading_reads_or_steps_aside(doc, tags, n, text, before, json_columns):
    from cdc.events.codec import _event_by_msgspec, _event_keeping_json_text

    row = {"id": 1, "doc": doc, "tags": tags, "n": n, "note": text}
    event = {"op": "u" if before else "c", "before": row if before else None, "after": row,
             "source": {"commit_lsn": "0/1", "lsn": "0/2", "seq": 3}, "ts_ms": n}
    value = json.dumps(event, separators=(",", ":"), ensure_ascii=False).replace('"n":"', '"n":').encode()
    value = value.replace(b'","note"', b',"note"') if isinstance(n, str) else value  # a decimal's digits as a number
    scalars, arrays = (frozenset({"doc"}), frozenset({"tags"})) if json_columns else (frozenset(), frozenset())
    columns = (scalars, arrays, tuple((c, f'"{c}"') for c in sorted(scalars | arrays))) if json_columns else None
    fast = _event_by_msgspec(value, columns)
    if fast is not None:
        exact = _event_keeping_json_text(value.decode(), scalars, arrays) if json_columns else loads(value)
        assert repr(fast[0]) == repr(exact) and fast[1] == (1, 2, 3)
