"""What row filters compare: the column types they may name, how a quoted literal reads as each
type's input function reads it, and how a published column value becomes the same comparison form.
Used by cdc.transform.filter_compiler (the evaluation) and cdc.transform.rowfilter (the checks).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

Row = Mapping[str, Any]
Evaluator = Callable[[Row], Any]  # -> True, False or None (SQL NULL)

# format_type() spellings (typmods removed) -> the PostgreSQL type the filter compares
FILTER_TYPES = {
    "smallint": "int2", "integer": "int4", "bigint": "int8", "numeric": "numeric", "real": "float4",
    "double precision": "float8", "text": "text", "character varying": "varchar", "character": "bpchar",
    "boolean": "bool", "date": "date", "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz", "uuid": "uuid",
}
SQL_NAMES = {v: k for k, v in FILTER_TYPES.items()} | {"varchar": "varchar", "bpchar": "char(n)"}
ACCEPTED_TYPES = ("smallint, integer, bigint, numeric, real, double precision, text, varchar, char(n), boolean, "
                  "date, timestamp, timestamptz, uuid")
INT_RANGES = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1), "int8": (-(2**63), 2**63 - 1)}
FLOAT_TYPES = ("float4", "float8")
NUMBER_TYPES = frozenset({*INT_RANGES, "numeric", *FLOAT_TYPES})
STRING_TYPES = frozenset({"text", "varchar", "bpchar"})
UNKNOWN = "unknown"  # a quoted literal (or NULL): it takes the type of what it is compared with
BOOL = "bool"


class FilterError(ValueError):
    """The filter cannot be used; the message is one line and names no row value."""


class MissingColumn(KeyError):
    """The row lacks a column the filter names (a before-image with only the key, say)."""


def filter_type(format_type: str) -> str | None:
    """The type a filter compares a column of this format_type() as, None when filters may not name it."""
    return FILTER_TYPES.get(re.sub(r"\(\d+(,\d+)?\)", "", format_type))


# ---- values: literals read as each type's input function reads them, column values as published --

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
INTEGER_TEXT = re.compile(r"[+-]?\d+")
_FLOAT_SPECIAL = {"nan": "NaN", "infinity": "Infinity", "+infinity": "Infinity", "-infinity": "-Infinity",
                  "inf": "Infinity", "+inf": "Infinity", "-inf": "-Infinity"}
_NUMERIC_SPECIAL = {"nan": "NaN", "infinity": "Infinity", "+infinity": "Infinity", "-infinity": "-Infinity"}
_BOOLS = {"t": True, "true": True, "y": True, "yes": True, "on": True, "1": True,
          "f": False, "false": False, "n": False, "no": False, "off": False, "0": False}
_UUID = re.compile(r"([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{12})")
# ISO dates and times as cdc publishes them and PostgreSQL prints them (BC, years past 9999, offsets)
_DATETIME = re.compile(r"(\d{4,})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d{1,6}))?)?)?"
                       r"(Z|[+-]\d\d(?::?\d\d)?)?( BC)?")
_DAY_US = 86_400_000_000


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date, for any (astronomical) year."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _instant(text: str, literal: str | None = None) -> tuple:
    """A sortable key of a date, timestamp or timestamptz text: (-1,) -infinity, (1,) infinity,
    (0, microseconds since 1970-01-01 UTC) otherwise; a date is its midnight.

    `literal` is the type a literal is read as: then only the forms PostgreSQL reads the same way
    whatever the session's DateStyle and TimeZone are accepted."""
    lowered = text.strip().lower() if literal else text
    if lowered in ("infinity", "+infinity"):
        return (1,)
    if lowered == "-infinity":
        return (-1,)
    m = _DATETIME.fullmatch(text.strip() if literal else text)
    if m is None:
        raise ValueError(text)
    year, month, day, hour, minute, second, fraction, offset, bc = m.groups()
    if literal:
        if len(year) != 4 or bc or (literal == "date" and (hour or offset)) or (literal == "timestamp" and offset) \
                or (literal == "timestamptz" and not (hour and offset)):
            raise ValueError(text)
    y, mo, d = int(year), int(month), int(day)
    if y == 0 or not 1 <= mo <= 12 or not 1 <= d <= _days_in_month(y, mo):
        raise ValueError(text)
    h, mi, s = int(hour or 0), int(minute or 0), int(second or 0)
    if h > 23 or mi > 59 or s > 59:
        raise ValueError(text)
    us = int((fraction or "").ljust(6, "0"))
    if bc:
        y = 1 - y
    shift = 0
    if offset and offset != "Z":
        digits = offset[1:].replace(":", "")
        oh, om = int(digits[:2]), int(digits[2:] or 0)
        if oh > 15 or om > 59:
            raise ValueError(text)
        shift = (oh * 60 + om) * 60_000_000 * (1 if offset[0] == "+" else -1)
    return (0, _days_from_civil(y, mo, d) * _DAY_US + ((h * 60 + mi) * 60 + s) * 1_000_000 + us - shift)


def _float32(value: float | Decimal | int) -> float:
    """The real (float4) nearest to `value`, ties to even, as strtof and C casts round; as a float.

    Exact for every decimal: the candidate from a double is checked against its neighbours."""
    if isinstance(value, float) and value != value:
        return value
    exact = Decimal(value) if not isinstance(value, Decimal) else value
    if exact.is_infinite():
        return float(exact)
    if abs(float(exact)) == float("inf"):
        raise ValueError("out of range for type real")
    try:
        guess = struct.unpack("<f", struct.pack("<f", float(exact)))[0]
    except OverflowError:
        raise ValueError("out of range for type real") from None
    bits = struct.unpack("<i", struct.pack("<f", guess))[0]
    best = None
    for candidate_bits in (bits - 1, bits, bits + 1):
        try:
            candidate = struct.unpack("<f", struct.pack("<i", candidate_bits))[0]
        except struct.error:
            continue
        if candidate != candidate or candidate in (float("inf"), float("-inf")):
            continue
        distance = abs(Decimal(candidate) - exact)
        even = candidate_bits % 2 == 0
        if best is None or distance < best[0] or (distance == best[0] and even):
            best = (distance, candidate)
    assert best is not None
    return best[1]


def float_key(value: float) -> tuple:
    """PostgreSQL orders NaN above every float (infinity too) and NaN = NaN; -0 = 0."""
    return (1, 0.0) if value != value else (0, value)


def numeric_key(value: Decimal) -> tuple:
    return (1, Decimal(0)) if value.is_nan() else (0, value)


def _parse_float(text: str, type_name: str) -> float:
    """float4in / float8in, for the forms they read the same way in every PostgreSQL version."""
    stripped = text.strip()
    special = _FLOAT_SPECIAL.get(stripped.lower())
    if special is not None:
        return float(special)
    if not _NUMBER.fullmatch(stripped):
        raise ValueError(text)
    return to_float(Decimal(stripped), type_name)


def to_float(value: Decimal, type_name: str) -> float:
    """A number converted to real or double precision, refusing what PostgreSQL reports out of range."""
    if not value.is_finite():
        return float(value)
    result = _float32(value) if type_name == "float4" else float(value)
    if result in (float("inf"), float("-inf")) or (result == 0 and value != 0):
        raise ValueError(f"out of range for type {'real' if type_name == 'float4' else 'double precision'}")
    return result


def parse_input(text: str, type_name: str) -> Any:
    """A quoted literal read as `type_name`'s input function reads it, in the value form comparisons
    use (see Compiler); ValueError when PostgreSQL would refuse it or might read it differently."""
    if type_name in INT_RANGES:
        if not INTEGER_TEXT.fullmatch(text.strip()):
            raise ValueError(text)
        value = int(text)
        low, high = INT_RANGES[type_name]
        if not low <= value <= high:
            raise ValueError(f"out of range for type {type_name}")
        return value
    if type_name == "numeric":
        stripped = text.strip()
        special = _NUMERIC_SPECIAL.get(stripped.lower())
        if special is not None:
            return Decimal(special)
        if not _NUMBER.fullmatch(stripped):
            raise ValueError(text)
        return Decimal(stripped)
    if type_name in FLOAT_TYPES:
        return _parse_float(text, type_name)
    if type_name == "bool":
        return _BOOLS[text.strip().lower()]  # KeyError is a LookupError, turned into a refusal below
    if type_name in ("date", "timestamp", "timestamptz"):
        return _instant(text, literal=type_name)
    if type_name == "uuid":
        m = _UUID.fullmatch(text.lower())
        if m is None or (("-" in text) and text.count("-") != 4):
            raise ValueError(text)
        return "-".join(m.groups())
    if type_name == "bpchar":
        return text.rstrip(" ")  # bpchar's comparisons ignore trailing spaces
    return text  # text, varchar


def column_value(type_name: str) -> Callable[[Any], Any]:
    """A column's value as cdc publishes it (cdc.source.postgres.values) -> the comparison form."""
    if type_name in INT_RANGES:
        return int  # bigint beyond 2^53 travels as a string
    if type_name == "numeric":
        return Decimal
    if type_name == "float8":
        return float  # "NaN", "Infinity" and "-Infinity" travel as strings
    if type_name == "float4":
        return lambda v: _float32(float(v))
    if type_name == "bpchar":
        return lambda v: v.rstrip(" ")
    if type_name in ("date", "timestamp", "timestamptz"):
        return _instant
    return lambda v: v  # text, varchar, bool, uuid (printed lower case, canonical)
