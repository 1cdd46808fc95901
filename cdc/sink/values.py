"""Event-JSON values -> driver parameters, one converter per column and target dialect.

Event values arrive as :func:`cdc.events.codec.decode_event` left them (see the table in
:mod:`cdc.events.schema`): numbers are ``int`` or ``Decimal`` (a ``float`` is accepted too), so
nothing is rounded on the way in, and json/jsonb values are :class:`~cdc.events.codec.JsonText`,
their text as the source sent it, which the converters write unchanged. A converter turns one such
value into what the driver should bind. It is built once per column (:func:`postgres_converter`,
:func:`sqlite_converter`) so applying a batch does no per-value dispatch on the kind.

Converters raise :class:`ValueProblem` with a message that describes the problem without the value
(values may be private); the caller adds table and column and raises SinkError.
``None`` (SQL NULL) passes through every converter unchanged.

Over 400 lines: every converter of both dialects, and which values each returns unchanged, side by
side so the two never disagree.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from decimal import Decimal, InvalidOperation
from json.encoder import encode_basestring  # C-accelerated JSON string quoting
from typing import Any, Callable

import orjson

from cdc.events.codec import JsonText
from cdc.events.schema import Column

Converter = Callable[[Any], Any]
# Whether a column's values (one batch's, in a list) are each what its converter would return for
# it, the very object: then the values are bound as the event holds them, without a call per value.
Verbatim = Callable[[list], bool]


class ValueProblem(ValueError):
    """An event value does not fit its column. The message never contains the value."""


_INT_TEXT = re.compile(r"-?[0-9]+")  # int() alone would also accept " 1", "1_000" and non-ASCII digits
_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})  # how the event writes non-finite floats


def json_type(value: Any) -> str:
    """The JSON type of a value, for error messages that must not show the value itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, Decimal)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# JSON text


def dump_json(value: Any) -> str:
    """Compact JSON text; ``Decimal`` is written with its exact digits (``json.dumps`` can't do that),
    and a :class:`JsonText` (a json/jsonb value) as the very text it holds.

    Used for json/jsonb columns and for arrays stored as JSON text. Non-finite numbers have no JSON
    form and raise ValueProblem.
    """
    if type(value) is JsonText:  # a json/jsonb column's value, the usual case: its text, as a str
        return str.__str__(value)
    parts: list[str] = []
    _dump(value, parts.append)
    return "".join(parts)


def _dump(value: Any, out: Callable[[str], Any]) -> None:
    if value is None:
        out("null")
    elif value is True:
        out("true")
    elif value is False:
        out("false")
    elif type(value) is JsonText:  # json byte for byte, jsonb as PostgreSQL printed it
        out(value)
    elif isinstance(value, str):
        out(encode_basestring(value))
    elif isinstance(value, int):
        out(int.__repr__(value))  # int subclasses (IntEnum...) still print as digits
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueProblem("JSON has no form for a non-finite number")
        out(str(value))  # '12.50', '1E+400': valid JSON numbers with every digit kept
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueProblem("JSON has no form for a non-finite number")
        out(float.__repr__(value))  # shortest text that reads back as the same double
    elif isinstance(value, dict):
        out("{")
        first = True
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueProblem(f"JSON object keys must be strings, not {type(key).__name__}")
            if not first:
                out(",")
            first = False
            out(encode_basestring(key))
            out(":")
            _dump(item, out)
        out("}")
    elif isinstance(value, (list, tuple)):
        out("[")
        for i, item in enumerate(value):
            if i:
                out(",")
            _dump(item, out)
        out("]")
    else:
        raise ValueProblem(f"a {type(value).__name__} has no JSON form")


# --------------------------------------------------------------------------------------------------
# Scalar checks shared by both dialects. Each takes a non-None event value.


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueProblem(f"a JSON {json_type(value)} is not a boolean value")
    return value


def _integer(value: Any) -> int:
    """smallint/integer/bigint: a JSON number, or (bigint beyond 2**53) a string of digits."""
    if isinstance(value, bool):
        raise ValueProblem("a JSON boolean is not an integer value")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if not _INT_TEXT.fullmatch(value):
            raise ValueProblem("a string that is not a decimal integer")
        return int(value)
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)  # 1E+3 style numbers from Decimal parsing
    raise ValueProblem(f"a JSON {json_type(value)} is not an integer value")


def _numeric(value: Any) -> Decimal:
    """numeric: exact text as PostgreSQL printed it ("12.50", "NaN", "Infinity"); numbers accepted too."""
    if isinstance(value, str):
        try:
            return Decimal(value)
        except InvalidOperation:
            raise ValueProblem("a string that is not a decimal number") from None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    raise ValueProblem(f"a JSON {json_type(value)} is not a numeric value")


def _float_text(value: Any) -> str:
    """real/double as exact decimal text, so PostgreSQL rounds once, straight to the column's type."""
    if isinstance(value, str):
        if value in _FLOAT_WORDS:
            return value
        try:
            float(value)
        except ValueError:
            raise ValueProblem("a string that is not a floating-point number") from None
        return value
    if isinstance(value, bool):
        raise ValueProblem("a JSON boolean is not a floating-point value")
    if isinstance(value, (int, Decimal)):
        if isinstance(value, Decimal) and not value.is_finite():
            return "NaN" if value.is_nan() else ("-Infinity" if value < 0 else "Infinity")
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    raise ValueProblem(f"a JSON {json_type(value)} is not a floating-point value")


def _float(value: Any) -> float:
    if isinstance(value, float):
        return value
    return float(_float_text(value))


def _bytea(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueProblem(f"a JSON {json_type(value)} is not a bytea (base64 string) value")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueProblem("a string that is not valid base64") from None


def _string(kind: str) -> Converter:
    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueProblem(f"a JSON {json_type(value)} is not a {kind} value (expected a string)")
        return value

    return convert


def _text_form(value: Any) -> str:
    """The event value as text, for columns stored as text whatever their kind (non-builtin types)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Decimal)):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    return dump_json(value)


def _nullable(convert: Converter) -> Converter:
    def convert_or_null(value: Any) -> Any:
        return None if value is None else convert(value)

    return convert_or_null


# --------------------------------------------------------------------------------------------------
# PostgreSQL (psycopg 3)
#
# psycopg sends a Python str with the "unknown" type, so the server parses it with the input function
# of the target column's type: ISO dates, times, intervals, uuids, JSON text and array literals all go
# through PostgreSQL's own parser, exactly. int, Decimal, bool and bytes go as typed binary-safe values.


def _pg_scalar(kind: str) -> Converter:
    if kind == "boolean":
        return _boolean
    if kind in ("smallint", "integer", "bigint"):
        return _integer
    if kind == "numeric":
        return _numeric
    if kind in ("real", "double"):
        # text, not float: a float param is float8, and `real_col = float8` compares 0.1::real with
        # 0.1::float8 (unequal); text lets the server read it straight into the column's own type.
        return _float_text
    if kind == "bytea":
        return _bytea
    if kind in ("json", "jsonb"):
        return dump_json
    return _string(kind)


def _pg_element_text(kind: str) -> Callable[[Any], str]:
    """Converter of one non-null array element to its text in a PostgreSQL array literal."""
    if kind == "boolean":
        return lambda v: "t" if _boolean(v) else "f"
    if kind in ("smallint", "integer", "bigint"):
        return lambda v: str(_integer(v))
    if kind == "numeric":
        return lambda v: str(_numeric(v))
    if kind in ("real", "double"):
        return _float_text
    if kind == "bytea":
        return lambda v: "\\x" + _bytea(v).hex()
    if kind in ("json", "jsonb"):
        return dump_json
    return _string(kind)


def _quote_element(text: str) -> str:
    # Always quote: then only backslash and double quote need escaping, whatever the element type.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pg_array_literal(value: Any, element_text: Callable[[Any], str], *, nested: bool = True,
                     delimiter: str = ",") -> str:
    """A JSON list (nested per dimension) -> PostgreSQL array literal text: ``{"1","2",NULL}``.

    With ``nested=False`` every item of the top-level list is one element, even if it is a list:
    json/jsonb arrays, whose elements can themselves be JSON lists, are one-dimensional.
    ``delimiter`` is the element type's (``;`` for box).
    """
    if not isinstance(value, (list, tuple)):
        raise ValueProblem(f"a JSON {json_type(value)} is not an array value")
    parts = []
    for item in value:
        if item is None:
            parts.append("NULL")
        elif nested and isinstance(item, (list, tuple)):
            parts.append(pg_array_literal(item, element_text, delimiter=delimiter))
        else:
            parts.append(_quote_element(element_text(item)))
    return "{" + delimiter.join(parts) + "}"


_NOT_STRING_KINDS = frozenset({"boolean", "smallint", "integer", "bigint", "numeric", "real", "double", "bytea",
                               "json", "jsonb"})


def _string_array(element: Callable[[Any], str], delimiter: str) -> Callable[[Any], str]:
    """pg_array_literal of an array whose elements are strings written as they are (text, varchar,
    dates...): a non-empty flat list of strings without a quote or backslash is joined in one go."""
    quoted_delimiter = f'"{delimiter}"'

    def convert(value: Any) -> str:
        if type(value) is list and value:
            try:
                plain = "".join(value)
            except TypeError:  # not every element is a str
                plain = None
            if plain is not None and '"' not in plain and "\\" not in plain:
                return '{"' + quoted_delimiter.join(value) + '"}'
        return pg_array_literal(value, element, delimiter=delimiter)

    return convert


def postgres_converter(column: Column) -> Converter:
    """Event value -> psycopg parameter for a column created by the PostgreSQL dialect."""
    if not column.builtin:
        # Stored as text / text[] (enums, domains, extension types): the event's text form.
        if column.array:
            if column.kind not in ("json", "jsonb"):
                return _nullable(_string_array(_text_form, ","))
            return _nullable(lambda v: pg_array_literal(v, _text_form, nested=False))
        return _nullable(_text_form)
    if column.array:
        element = _pg_element_text(column.kind)
        nested = column.kind not in ("json", "jsonb")
        # box is the one built-in type whose array elements are separated by ";" (typdelim)
        delimiter = ";" if column.type.startswith("box[") else ","
        if column.kind not in _NOT_STRING_KINDS:
            return _nullable(_string_array(element, delimiter))
        return _nullable(lambda v: pg_array_literal(v, element, nested=nested, delimiter=delimiter))
    return _nullable(_pg_scalar(column.kind))


# --------------------------------------------------------------------------------------------------
# SQLite (sqlite3)


def _sqlite_integer(value: Any) -> int:
    number = _integer(value)
    if not -(2**63) <= number < 2**63:  # sqlite3 would raise OverflowError while binding
        raise ValueProblem("an integer beyond the 64-bit range")
    return number


def _sqlite_scalar(kind: str) -> Converter:
    if kind == "boolean":
        return lambda v: 1 if _boolean(v) else 0
    if kind in ("smallint", "integer", "bigint"):
        return _sqlite_integer
    if kind == "numeric":
        return _sqlite_numeric
    if kind in ("real", "double"):
        return _float  # NaN binds as NULL in SQLite (documented in the dialect)
    if kind == "bytea":
        return _bytea
    if kind in ("json", "jsonb"):
        return dump_json
    return _string(kind)


def _sqlite_numeric(value: Any) -> str:
    # TEXT column: keep PostgreSQL's exact digits ("12.50"); validate, but store the text as sent.
    number = _numeric(value)
    return value if isinstance(value, str) else str(number)


def _sqlite_json_element(kind: str) -> Converter:
    """Array element -> its JSON value in the stored array text: the event form, except that bigint
    elements are always JSON numbers (the event writes those beyond 2**53 as strings)."""
    if kind in ("smallint", "integer", "bigint"):
        return _integer
    return lambda v: v  # dump_json checks it has a JSON form


def _sqlite_array(kind: str) -> Converter:
    element = _sqlite_json_element(kind)
    nested = kind not in ("json", "jsonb")

    def normalize(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ValueProblem(f"a JSON {json_type(value)} is not an array value")
        return [
            None if item is None
            else normalize(item) if nested and isinstance(item, (list, tuple))
            else element(item)
            for item in value
        ]

    if kind in ("smallint", "integer", "bigint"):
        return lambda v: dump_json(normalize(v))

    def convert(value: Any) -> str:
        if type(value) is list:  # a flat list of strings, the usual array, is written by orjson:
            try:
                "".join(value)  # (a TypeError unless every element is a str)
                # the text dump_json writes (tests/unit/test_sink_sql.py), in C: a quarter of its time.
                # A str subclass (a json value's text) is refused here, and written by dump_json as it is.
                return orjson.dumps(value, option=orjson.OPT_PASSTHROUGH_SUBCLASS).decode()
            except TypeError:  # (orjson's errors are TypeErrors: a lone surrogate, which dump_json writes as it is)
                pass
        return dump_json(normalize(value))

    return convert


def sqlite_converter(column: Column) -> Converter:
    """Event value -> sqlite3 parameter for a column created by the SQLite dialect."""
    if column.array:
        return _nullable(_sqlite_array(column.kind))
    return _nullable(_sqlite_scalar(column.kind))


# --------------------------------------------------------------------------------------------------
# Values bound as the event holds them (per batch and column, instead of a converter call per value)

_NONE = type(None)


def _all_of(types: frozenset[type]) -> Verbatim:
    def check(values: list) -> bool:
        return set(map(type, values)) <= types

    return check


# Numeric texts as PostgreSQL prints finite numbers ("-12.50"), one per line: a batch of them is bound
# as it is, each a valid decimal, checked by one regular expression instead of a Decimal per value.
_PLAIN_NUMERICS = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:\n-?[0-9]+(?:\.[0-9]+)?)*")


def _plain_numerics(values: list) -> bool:
    """Numeric texts (no NULL, no NaN, Infinity or exponent) that PostgreSQL and SQLite take as they are."""
    if set(map(type, values)) != {str}:
        return False
    lines = "\n".join(values)  # a value holding a line break is not one of them: the count tells
    return _PLAIN_NUMERICS.fullmatch(lines) is not None and lines.count("\n") == len(values) - 1


def _int64s(values: list) -> bool:
    """Integers (not booleans, no NULL) that sqlite3 binds: within the 64-bit range."""
    return set(map(type, values)) == {int} and -(2**63) <= min(values) and max(values) < 2**63


def postgres_verbatim(column: Column, *, key: bool) -> Verbatim | None:
    """For a column of :func:`postgres_converter`: which batches of values it would return
    unchanged (None: none). `key`: a key column, whose NULL is refused."""
    if column.array:
        return None
    if not column.builtin:
        types = {str}  # _text_form
    elif column.kind == "boolean":
        types = {bool}
    elif column.kind in ("smallint", "integer", "bigint"):
        types = {int}  # (a bool is not one: its type is bool)
    elif column.kind == "numeric":
        decimals = _all_of(frozenset({Decimal} if key else {Decimal, _NONE}))
        return lambda values: _plain_numerics(values) or decimals(values)  # the texts read as the Decimals would
    elif column.kind in ("real", "double", "bytea", "json", "jsonb"):
        return None  # always checked or rewritten
    else:
        types = {str}  # _string
    return _all_of(frozenset(types if key else types | {_NONE}))


def sqlite_verbatim(column: Column, *, key: bool) -> Verbatim | None:
    """For a column of :func:`sqlite_converter`: which batches of values it would return unchanged."""
    if column.array:
        return None
    if column.kind in ("smallint", "integer", "bigint"):
        return _int64s  # (only without NULL; otherwise each value is converted)
    if column.kind == "numeric":
        return _plain_numerics  # (the converter keeps a valid text as it is)
    if column.kind in ("real", "double"):
        types = {float}
    elif column.kind in ("boolean", "bytea", "json", "jsonb"):
        return None
    else:
        types = {str}  # _string
    return _all_of(frozenset(types if key else types | {_NONE}))
