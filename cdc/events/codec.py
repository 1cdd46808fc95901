"""Reading event JSON: the one parser of event values, schema headers and transaction records.

Every reader of cdc's Kafka records (the sink, replay, status) parses them here, so they agree on
what a record is and on what its numbers are:

- Numbers are exact: integers are ``int`` (``Decimal`` beyond 4,000 digits, where Python's ``int``
  refuses to read text), every other number is ``Decimal``. Nothing is rounded through ``float``.
- A ``json``/``jsonb`` column value of an event is a :class:`JsonText`: the value's JSON text exactly
  as the event holds it, which is exactly as PostgreSQL sent it (the connector embeds it verbatim).
  A ``json`` value keeps duplicate keys, key order and whitespace; a ``jsonb`` value is as
  PostgreSQL prints it. The ``cdc.schema`` header of the record says which columns those are.
- A record that is not a change event raises :class:`NotAnEvent`, with a message that never
  quotes a value (values may be private).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from decimal import Decimal
from json.decoder import scanstring  # C-accelerated
from typing import Any

from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.lsn import Position, parse_lsn


class NotAnEvent(ValueError):
    """A record that is not a cdc change event: not UTF-8 JSON, not an object, no op or position."""


class JsonText(str):
    """The JSON text of a json/jsonb value, exactly as the event holds it; a sink writes it as is."""

    __slots__ = ()


# Python refuses to turn more than 4,300 digits of text into an int (sys.int_max_str_digits), and
# also to print such an int. Decimal has no such limit, both ways.
_INT_DIGITS = 4000


def _exact_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _INT_DIGITS else Decimal(text)


_FAST = json.JSONDecoder(parse_float=Decimal)  # ints through C: raises ValueError past the limit
_EXACT = json.JSONDecoder(parse_float=Decimal, parse_int=_exact_int)
_scan = _EXACT.scan_once  # (text, index) -> (value, end); StopIteration when no value starts there
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def loads(data: bytes | str) -> Any:
    """JSON text (UTF-8 bytes or str) -> Python values with exact numbers. Raises ValueError."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        return _FAST.decode(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer of more digits than int() reads: again, the exact way
        return _EXACT.decode(text)


# --------------------------------------------------------------------------------------------------
# Events


def decode_event(value: bytes, headers: Iterable[tuple[str, bytes]] | None = ()) -> tuple[dict[str, Any], Position]:
    """A change event's value (and the record's headers) -> (event, position); NotAnEvent otherwise.

    With a ``cdc.schema`` header naming json/jsonb columns, their values in ``before`` and ``after``
    are :class:`JsonText` (elements of json[]/jsonb[] lists likewise); ``null`` stays ``None``.
    """
    json_columns = _json_columns(headers)
    try:
        text = value.decode("utf-8")
        event = loads(text) if json_columns is None else _event_keeping_json_text(text, *json_columns)
        position = position_of(_object_of(event)["source"])
        if not isinstance(event["op"], str):
            raise TypeError(f"op is a JSON {type(event['op']).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:  # IndexError: cut short
        raise NotAnEvent(_problem(exc)) from None
    return event, position


def decode_source(value: bytes) -> dict[str, Any]:
    """The ``source`` of a change event or a transaction record, checked to hold a position."""
    try:
        source = _object_of(loads(value))["source"]
        position_of(source)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NotAnEvent(_problem(exc)) from None
    return source


def decode_position(value: bytes) -> Position:
    """The position of a change event or a transaction record; NotAnEvent otherwise."""
    return position_of(decode_source(value))


def position_of(source: dict[str, Any]) -> Position:
    commit_lsn = source["commit_lsn"]
    return Position(_commit_lsn(commit_lsn) if type(commit_lsn) is str else parse_lsn(commit_lsn),
                    parse_lsn(source["lsn"]), int(source["seq"]))


# The events of a transaction share its commit LSN: parsed once for a run of them.
_commit_lsn = functools.lru_cache(maxsize=64)(parse_lsn)


def _object_of(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise TypeError(f"a JSON {type(record).__name__}, not an object")
    return record


def _problem(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    if isinstance(exc, KeyError):
        return f"no {exc} field"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------------
# Which columns hold JSON text, per schema header (one parse per distinct header)

_JSON_KINDS = ("json", "jsonb")
_json_columns_cache: dict[bytes, tuple[frozenset[str], frozenset[str]] | None] = {}


def _json_columns(headers: Iterable[tuple[str, bytes]] | None) -> tuple[frozenset[str], frozenset[str]] | None:
    """(json/jsonb columns, json[]/jsonb[] columns) of the record's schema; None if it has none."""
    raw = next((v for k, v in (headers or ()) if k == SCHEMA_HEADER), None)
    if raw is None:
        return None
    try:
        return _json_columns_cache[raw]
    except KeyError:
        pass
    try:
        columns = [c for c in loads(raw)["columns"] if c["kind"] in _JSON_KINDS]
        scalars = frozenset(c["name"] for c in columns if not c.get("array"))
        arrays = frozenset(c["name"] for c in columns if c.get("array"))
        found = (scalars, arrays) if columns else None
    except (ValueError, KeyError, TypeError):
        found = None  # the sink reports an unreadable header itself, where it reads the schema
    if len(_json_columns_cache) >= 1024:  # schemas change rarely; a bound all the same
        _json_columns_cache.clear()
    _json_columns_cache[raw] = found
    return found


# --------------------------------------------------------------------------------------------------
# A JSON object walked member by member (the C scanner reads each value), so that the text each
# json/jsonb value spans can be kept: parsing it into Python values would merge duplicate keys,
# drop whitespace and key order, and re-print numbers.


def _event_keeping_json_text(text: str, scalars: frozenset[str], arrays: frozenset[str]) -> dict[str, Any]:
    index = _skip(text, 0)
    _expect(text, index, "{")
    event, end = _object_keeping_json(text, index, _NO_NAMES, _NO_NAMES, (scalars, arrays))
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data after the JSON object at char {end}")
    return event


_NO_NAMES: frozenset[str] = frozenset()


def _object_keeping_json(text: str, index: int, scalars: frozenset[str], arrays: frozenset[str],
                         images: tuple[frozenset[str], frozenset[str]] | None = None) -> tuple[dict[str, Any], int]:
    """The object at `index` -> (dict, end), the values of members named in `scalars`/`arrays` as
    their text. With `images` (the event itself): its before/after objects are read with those names.

    The hot loop of a sink whose table has json columns: written out, with the regular expression
    for whitespace only where there is some (the connector writes none of its own), every other
    value read by the C scanner in one call.
    """
    out: dict[str, Any] = {}
    index = _skip(text, index + 1)
    if text.startswith("}", index):
        return out, index + 1
    while True:
        if not text.startswith('"', index):
            raise ValueError(f"expecting a member name at char {index}")
        name, index = scanstring(text, index + 1)
        if not text.startswith(":", index):
            index = _skip(text, index)
            _expect(text, index, ":")
        start = index + 1
        if name in scalars or name in arrays:
            # A json value's text is everything between the separators around it: PostgreSQL keeps
            # a json value's leading and trailing whitespace too, and the connector embeds it as is.
            value, index = _value(text, _skip(text, start))
            index = _skip(text, index)
            if value is not None:
                if name in scalars:
                    value = JsonText(text[start:index])
                elif isinstance(value, list):
                    value = _array_item_texts(text, _skip(text, start))
        else:
            if text[start] in _SPACE:
                start = _skip(text, start)
            if images is not None and (name == "after" or name == "before") and text.startswith("{", start):
                value, index = _object_keeping_json(text, start, *images)
            else:
                try:
                    value, index = _scan(text, start)
                except StopIteration:
                    raise ValueError(f"expecting a JSON value at char {start}") from None
        out[name] = value
        if text[index] in _SPACE:
            index = _skip(text, index)
        if text.startswith(",", index):
            index += 1
            if text[index] in _SPACE:
                index = _skip(text, index)
        elif text.startswith("}", index):
            return out, index + 1
        else:
            raise ValueError(f"expecting ',' or '}}' at char {index}")


_SPACE = frozenset(" \t\n\r")


def _skip(text: str, index: int) -> int:
    return _WHITESPACE.match(text, index).end()


def _value(text: str, index: int) -> tuple[Any, int]:
    try:
        return _scan(text, index)
    except StopIteration:
        raise ValueError(f"expecting a JSON value at char {index}") from None


def _expect(text: str, index: int, char: str) -> None:
    if not text.startswith(char, index):
        raise ValueError(f"expecting {char!r} at char {index}")


def _array_item_texts(text: str, index: int) -> list[JsonText | None]:
    """The items of the JSON list at `index`, each as its text (json[]/jsonb[]: one value each)."""
    items: list[JsonText | None] = []
    if text.startswith("]", _skip(text, index + 1)):
        return items
    while True:
        start = index + 1  # just after "[" or ","
        value, end = _value(text, _skip(text, start))
        end = _skip(text, end)
        items.append(None if value is None else JsonText(text[start:end]))
        if text.startswith("]", end):
            return items
        _expect(text, end, ",")
        index = end
