"""Column values: the text pgoutput sends -> the JSON form of the event contract.

One converter function per column is built when a Relation message arrives, so the per-row work is a
single call per value. The JSON forms are listed in :mod:`cdc.events.schema`.

The text PostgreSQL sends is already exact, so most kinds keep it (numeric, interval, uuid, json and
every type without a kind of its own). psycopg's loaders parse what needs parsing (booleans,
integers, floats, bytea, dates and times) and its array parser splits arrays, element by element.
Every converter returns only values orjson encodes as the contract says: str, int within 64 bits,
finite float, bool, list, or an ``orjson.Fragment`` of JSON text that PostgreSQL printed.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from psycopg.adapt import Transformer
from psycopg.pq import Format
from psycopg.types.array import ArrayLoader

from cdc.source.postgres.catalog import TypeDescription
from cdc.source.postgres.pgoutput import UNCHANGED_TOAST

Converter = Callable[[bytes], Any]  # pgoutput column text -> JSON value
Element = Callable[[str], Any]  # one value's text (a scalar, or an array element) -> JSON value

TEXT_OID = 25
TEXT_ARRAY_OID = 1009
MAX_SAFE_INTEGER = 2**53  # beyond this a JSON number loses digits in most readers

# Kinds whose psycopg loader refuses values PostgreSQL allows (infinity, years past 9999, BC,
# 24:00:00): those values travel as PostgreSQL printed them rather than stop the stream for good.
_OUT_OF_PYTHON_RANGE = frozenset({"date", "time", "timetz", "timestamp", "timestamptz"})
_LOAD_ERRORS = (psycopg.DataError, ValueError, OverflowError)

# Kinds whose typed psycopg array loader (C-accelerated) already yields the exact values.
_TYPED_ARRAYS = frozenset({"boolean", "smallint", "integer", "bigint", "real", "double"})


def _bigint(value: int) -> int | str:
    return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)


def _float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _timestamptz(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def _iso(value: Any) -> str:
    return value.isoformat()


def _same(text: str) -> str:
    return text


def _json(text: str) -> orjson.Fragment:
    # json/jsonb are embedded as PostgreSQL printed them: re-parsing would round big numbers.
    return orjson.Fragment(text)


def _map_nested(items: list, element: Callable[[Any], Any]) -> list:
    return [None if v is None else _map_nested(v, element) if isinstance(v, list) else element(v) for v in items]


class _SemicolonTextArrayLoader(ArrayLoader):
    """text[] split on ';', the delimiter of box arrays (pure Python: only box[] needs it)."""

    base_oid = TEXT_OID
    delimiter = b";"


def split_array(conn: psycopg.Connection, delimiter: str = ",") -> Callable[[bytes], list]:
    """An array's text -> nested lists of the elements' text (str), NULL as None."""
    if delimiter == ",":
        return Transformer(conn).get_loader(TEXT_ARRAY_OID, Format.TEXT).load
    if delimiter == ";":
        return _SemicolonTextArrayLoader(TEXT_ARRAY_OID, conn).load
    loader_class = type("TextArrayLoader", (ArrayLoader,), {"base_oid": TEXT_OID, "delimiter": delimiter.encode()})
    return loader_class(TEXT_ARRAY_OID, conn).load


class ValueDecoder:
    """Builds per-column converters with psycopg's loaders on the catalog connection's adapters."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.transformer = Transformer(conn)

    def converter(self, desc: TypeDescription) -> Converter:
        if desc.array:
            return self._array(desc)
        kind = desc.kind
        if kind in ("smallint", "integer"):
            return int  # int() reads ASCII digits straight from bytes
        if kind == "bigint":
            return lambda data: _bigint(int(data))
        if kind in ("real", "double"):
            return lambda data: _float(float(data))
        if kind == "boolean":
            return lambda data: data == b"t"
        if kind in ("json", "jsonb"):
            return orjson.Fragment  # takes the bytes as they are (UTF-8 JSON text)
        element = self._element(desc)
        return lambda data: element(data.decode("utf-8"))

    def native_conversion(self, desc: TypeDescription) -> int:
        return native_conversion(desc, self.conn.info.encoding == "utf-8")

    def _element(self, desc: TypeDescription) -> Element:
        """Converter of one value's text, for scalars and array elements alike."""
        kind = desc.kind
        if kind in ("smallint", "integer"):
            return int
        if kind == "bigint":
            return lambda text: _bigint(int(text))
        if kind in ("real", "double"):
            return lambda text: _float(float(text))
        if kind == "boolean":
            return lambda text: text == "t"
        if kind in ("json", "jsonb"):
            return _json
        if kind == "bytea":
            load_bytea = self.transformer.get_loader(17, Format.TEXT).load  # hex, or the old escape format
            return lambda text: base64.b64encode(load_bytea(text.encode("ascii"))).decode("ascii")
        if kind in _OUT_OF_PYTHON_RANGE:
            load = self.transformer.get_loader(_ELEMENT_OID[kind], Format.TEXT).load
            finish = _timestamptz if kind == "timestamptz" else _iso

            def convert(text: str) -> str:
                try:
                    return finish(load(text.encode("ascii")))
                except _LOAD_ERRORS:  # infinity, BC, year > 9999: as PostgreSQL printed it
                    return text

            return _iso_fast_path(kind, convert)
        # numeric (exact digits: never through Decimal, which would print 1E-8), interval (ISO-8601
        # as PostgreSQL prints it: psycopg would fold months into days), uuid, text, and every type
        # without a kind of its own (inet, ranges, geometry, enums, composites...).
        return _same

    def _array(self, desc: TypeDescription) -> Converter:
        if desc.kind in _TYPED_ARRAYS:
            load = self.transformer.get_loader(desc.loader_oid, Format.TEXT).load
            if desc.kind == "bigint":
                return lambda data: _map_nested(load(data), _bigint)
            if desc.kind in ("real", "double"):
                return lambda data: _map_nested(load(data), _float)
            return load  # booleans and 16/32-bit integers are their own JSON form
        split = split_array(self.conn, desc.delimiter)
        element = self._element(desc)
        if element is _same:
            return split
        return lambda data: _map_nested(split(data), element)


# The compiled core's conversions (cdc.native; native/src/lib.rs has the same numbers): per kind, the
# one that gives what converter() gives, for text in the form PostgreSQL prints (any other text goes
# to the Python converter). PYTHON: the core calls the column's Python converter.
NATIVE_PYTHON, NATIVE_INT, NATIVE_BIGINT, NATIVE_FLOAT, NATIVE_BOOL, NATIVE_JSON, NATIVE_TEXT = range(7)
NATIVE_DATE, NATIVE_TIMESTAMPTZ, NATIVE_BYTEA, NATIVE_TEXT_ARRAY = range(7, 11)
_NATIVE_BY_KIND = {
    "smallint": NATIVE_INT, "integer": NATIVE_INT, "bigint": NATIVE_BIGINT, "real": NATIVE_FLOAT,
    "double": NATIVE_FLOAT, "boolean": NATIVE_BOOL, "json": NATIVE_JSON, "jsonb": NATIVE_JSON,
    "bytea": NATIVE_BYTEA, "date": NATIVE_DATE, "timestamptz": NATIVE_TIMESTAMPTZ,
    "time": NATIVE_PYTHON, "timetz": NATIVE_PYTHON, "timestamp": NATIVE_PYTHON,  # the psycopg loader's forms
}


def native_conversion(desc: TypeDescription, utf8: bool = True) -> int:
    """The compiled core's conversion of a column of this type (mirrors ValueDecoder.converter).
    `utf8`: the connection's client encoding is UTF-8 (psycopg's text loader gives str only then)."""
    if desc.array:
        # Arrays of kinds that keep their text (element _same), split on ',': text[], numeric[], uuid[]...
        same = desc.kind not in _NATIVE_BY_KIND and utf8
        return NATIVE_TEXT_ARRAY if same and desc.delimiter == "," else NATIVE_PYTHON
    return _NATIVE_BY_KIND.get(desc.kind, NATIVE_TEXT)


# The usual text of dates and timestamptz as the walsender prints it (DateStyle ISO, TimeZone UTC: see
# SESSION_OPTIONS), turned into the ISO-8601 form with string operations: exactly what the psycopg
# loader and isoformat() make of it (microseconds padded to 6 digits, none when zero), without a
# datetime (twice as fast; for time and timestamp the loader is as fast). Any other text (infinity,
# BC, years past 9999, another offset) takes the loader's path.
_CLOCK = r"((?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d)(?:\.(\d{1,6}))?"  # (clock) (fraction)
_DAY = r"(\d{4}-\d\d-\d\d)"
_ISO_TEXT = {
    "date": re.compile(_DAY, re.ASCII),
    "timestamptz": re.compile(rf"{_DAY} {_CLOCK}\+00", re.ASCII),
}


def _iso_fast_path(kind: str, slow: Element) -> Element:
    pattern = _ISO_TEXT.get(kind)
    if pattern is None:
        return slow
    match_text = pattern.fullmatch
    if kind == "date":
        return lambda text: text if match_text(text) else slow(text)

    def convert(text: str) -> str:
        match = match_text(text)
        if match is None:
            return slow(text)
        day, clock, fraction = match.groups()
        if fraction and fraction.strip("0"):
            return f"{day}T{clock}.{fraction:0<6}Z"
        return f"{day}T{clock}Z"

    return convert


# Element type OIDs of the date/time kinds, for their psycopg scalar loaders.
_ELEMENT_OID = {"date": 1082, "time": 1083, "timetz": 1266, "timestamp": 1114, "timestamptz": 1184}


# --------------------------------------------------------------------------------------------------
# How large an event must be, from the text pgoutput sent: checked before any value is converted, so
# a value too large to publish is refused without first being copied into its JSON form.

# Bytes of JSON per byte of PostgreSQL's text, at the least, for kinds whose JSON form can be shorter
# than the text: bytea's hex (2 characters a byte, 5 for an empty array element) becomes base64 (4
# per 3 bytes); a json[] element loses the array literal's quotes around it and backslashes before
# its own quotes and backslashes (`""` is `"\"\""` in the literal); a timestamp's array element loses
# its quotes; floats and times are re-printed. Every other form is at least as long as the text
# (JSON quotes and escapes only add).
_LEAST_JSON_PER_TEXT_BYTE = {"bytea": 1 / 3, "real": 1 / 2, "double": 1 / 2, "date": 1 / 2, "time": 1 / 2,
                             "timetz": 1 / 2, "timestamp": 1 / 2, "timestamptz": 1 / 2}


def least_json_per_text_byte(kind: str, array: bool) -> float:
    if array and kind in ("json", "jsonb"):
        return 1 / 3
    return _LEAST_JSON_PER_TEXT_BYTE.get(kind, 1.0)


def least_event_bytes(ratios: tuple[float, ...], old: tuple | None, new: tuple | None) -> int:
    """A lower bound of the size of any event made of a change with these tuples (pgoutput values:
    bytes, None, or the unchanged-TOAST marker; an unchanged value is taken from `old`).

    `ratios`: per column, :func:`least_json_per_text_byte`, or 0 for a column no event carries as
    sent (dropped or masked). A change can become two events (a key change: delete and create),
    each with one image, so the bound is the larger image.
    """
    before = after = 0.0
    for i, ratio in enumerate(ratios):
        if not ratio:
            continue
        was = old[i] if old is not None else None
        if type(was) is bytes:
            before += len(was) * ratio
        value = new[i] if new is not None else None
        if value is UNCHANGED_TOAST:
            value = was  # taken from the before-image
        if type(value) is bytes:
            after += len(value) * ratio
    return int(max(before, after))
