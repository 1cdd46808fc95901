"""The event codec: change events to and from their Kafka value (JSON), and the position of any record.

The connector encodes events here (:func:`encode_event`; the ``source`` of every record that carries
a position is written by :func:`event_source` or :func:`transaction_source`), and every reader of
cdc's Kafka records (the sink, replay, status, the dead-letter commands) parses them here, so they
agree on what a record is, on where it stands (:func:`position_of`) and on what its numbers are:

- Numbers are exact (:mod:`cdc.events.exact_json`): integers are ``int``, every other number is
  ``Decimal``. Nothing is rounded through ``float``.
- A ``json``/``jsonb`` column value of an event is a :class:`JsonText`: the value's JSON text exactly
  as the event holds it, which is exactly as PostgreSQL sent it (the connector embeds it verbatim).
  A ``json`` value keeps duplicate keys, key order and whitespace; a ``jsonb`` value is as
  PostgreSQL prints it. The record's schema says which columns those are: its ``cdc.schema_id``
  header names it (cdc.events.schema_ids; a record of an older connector carries it whole in
  ``cdc.schema``). A schema id not learnt yet raises :class:`~cdc.events.schema_ids.UnknownSchemaId`.
- A record that is not a change event raises :class:`NotAnEvent`, with a message that never
  quotes a value (values may be private).

Over 400 lines: one format both ways, and its reading three ways that must agree (msgspec, one C parse
with json values found by name, the member walk), side by side.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from json.decoder import scanstring  # C-accelerated
from json.encoder import encode_basestring  # C-accelerated
from decimal import Decimal
from typing import Any, Protocol

import msgspec
import orjson

from cdc import native
from cdc.events.exact_json import _FAST, _INT_DIGITS, EXACT, loads
from cdc.events.schema_ids import schema_json_of
from cdc.lsn import Position, parse_lsn, parse_position

__all__ = [
    "NotAnEvent", "JsonText", "loads", "decode_event", "decode_event_as", "decode_change_as", "json_columns_of", "decode_source", "decode_position", "position_of",
    "encode_event", "encode_change", "EventSources", "event_sources", "encode_key", "event_source", "transaction_source",
]


class TransactionInfo(Protocol):
    """What the codec reads of a transaction (cdc.events.envelope.TransactionInfo). Protocols, so
    that the codec depends on no builder of events: the envelope encodes through the codec."""

    commit_lsn_text: str
    xid: int
    commit_ts_text: str


class ChangeEvent(Protocol):
    """What the codec reads of a change event (cdc.events.envelope.ChangeEvent)."""

    op: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    key: dict[str, Any] | None
    position: Position
    lsn_text: str
    txn: TransactionInfo
    unchanged: tuple[str, ...]
    snapshot: bool


class NotAnEvent(ValueError):
    """A record that is not a cdc change event: not UTF-8 JSON, not an object, no op or position."""


class JsonText(str):
    """The JSON text of a json/jsonb value, exactly as the event holds it; a sink writes it as is."""

    __slots__ = ()


_scan = EXACT.scan_once  # (text, index) -> (value, end); StopIteration when no value starts there
_WHITESPACE = re.compile(r"[ \t\n\r]*")


# --------------------------------------------------------------------------------------------------
# Events


def decode_event(value: bytes, headers: Iterable[tuple[str, bytes]] | None = ()) -> tuple[dict[str, Any], Position]:
    """A change event's value (and the record's headers) -> (event, position); NotAnEvent otherwise.

    With a schema (``cdc.schema_id`` or ``cdc.schema`` header) naming json/jsonb columns, their values in ``before`` and ``after``
    are :class:`JsonText` (elements of json[]/jsonb[] lists likewise); ``null`` stays ``None``.
    """
    return decode_event_as(value, _json_columns(headers))


def decode_event_as(value: bytes, json_columns: JsonColumns | None) -> tuple[dict[str, Any], Position]:
    """:func:`decode_event` with the json columns of the record's schema known (:func:`json_columns_of`
    its schema JSON): for a reader that resolves each distinct set of headers once."""
    if _read_compiled is not None:
        fast = _read_compiled(value, json_columns)
        if fast is not None:
            return fast
    return _decode_event_in_python(value, json_columns)


def decode_change_as(value: bytes, json_columns: JsonColumns | None) -> tuple[dict[str, Any], Position]:
    """:func:`decode_event_as` without the event's ``source`` and ``ts_ms`` members, for a sink: it
    reads only the position of the source, and the compiled reader then builds fewer objects."""
    if _read_compiled is not None:
        fast = _read_compiled(value, json_columns, True)
        if fast is not None:
            return fast
    event, position = _decode_event_in_python(value, json_columns)
    event.pop("source", None)
    event.pop("ts_ms", None)
    return event, position


def _decode_event_in_python(value: bytes, json_columns: JsonColumns | None) -> tuple[dict[str, Any], Position]:
    fast = _event_by_msgspec(value, json_columns)
    if fast is not None:
        return fast
    try:
        text = value.decode("utf-8")
        if json_columns is None:
            event = loads(text)
        else:  # the walk member by member only where the one C parse cannot tell where json values lie
            event = _event_with_json_spans(text, *json_columns) or _event_keeping_json_text(text, *json_columns[:2])
        position = position_of(_object_of(event)["source"])
        if not isinstance(event["op"], str):
            raise TypeError(f"op is a JSON {type(event['op']).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError,  # IndexError: cut short
            RecursionError) as exc:  # nested deeper than the json module reads
        raise NotAnEvent(_problem(exc)) from None
    return event, position


def decode_source(value: bytes) -> dict[str, Any]:
    """The ``source`` of a change event or a transaction record, checked to hold a position."""
    try:
        source = _object_of(loads(value))["source"]
        position_of(source)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise NotAnEvent(_problem(exc)) from None
    return source


def decode_position(value: bytes) -> Position:
    """The position of a change event or a transaction record; NotAnEvent otherwise."""
    return position_of(decode_source(value))


def position_of(source: dict[str, Any]) -> Position:
    """The position a record's ``source`` holds (events, transaction and schema change records).
    Raises KeyError, TypeError or ValueError naming what is missing or malformed."""
    commit_lsn, lsn, seq = source["commit_lsn"], source["lsn"], source["seq"]
    if type(lsn) is str and type(seq) is int and type(commit_lsn) is str:  # as cdc writes them
        match = _LSN_TEXT(lsn)
        if match is not None:  # the LSN as parse_lsn reads it, without its checks of other forms
            high, low = match.groups()
            return Position(_commit_lsn(commit_lsn), (int(high, 16) << 32) | int(low, 16), seq)
    return parse_position(commit_lsn, lsn, seq)


_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})").fullmatch
# The events of a transaction share its commit LSN: read once for a run of them.
_commit_lsn = functools.lru_cache(maxsize=64)(parse_lsn)


# --------------------------------------------------------------------------------------------------
# Encoding (the event contract in DESIGN.md)


def encode_event(event: ChangeEvent, pipeline: str, db: str, schema: str, table: str, ts_ms: int) -> bytes:
    """The Kafka value of a change event: op, before, after, source, ts_ms (when it was encoded, in
    milliseconds since the epoch), and `unchanged` if the source did not resend some values."""
    source = event_sources(pipeline, db, schema, table, event.txn, event.snapshot)
    return encode_change(event.op, event.before, event.after, source.at(event.lsn_text, event.position.seq), ts_ms,
                         event.unchanged)


def encode_change(op: str, before: Any, after: Any, source: bytes, ts_ms: int, unchanged: tuple[str, ...] = ()) -> bytes:
    """:func:`encode_event` from its parts, `source` already encoded (:meth:`EventSources.at`): the
    connector's path for the usual INSERT, which builds no ChangeEvent."""
    value = {"op": op, "before": before, "after": after, "source": orjson.Fragment(source), "ts_ms": ts_ms}
    if unchanged:  # only then: every other event carries its full row
        value["unchanged"] = list(unchanged)
    return orjson.dumps(value)


class EventSources:
    """The ``source`` of the events of one table in one transaction, as :func:`event_source` would be
    encoded by orjson: everything but ``lsn`` and ``seq`` is encoded once, not for every event."""

    __slots__ = ("txn", "snapshot", "where", "head", "tail")

    def __init__(self, pipeline: str, db: str, schema: str, table: str, txn: TransactionInfo, snapshot: bool):
        self.txn, self.snapshot, self.where = txn, snapshot, (pipeline, db, schema, table)
        # Made once per transaction and table (thousands a second for single-row transactions): the
        # names' part once per table, the transaction's values each encoded on their own.
        self.head = b'%s,"commit_lsn":%s,"lsn":"' % (_where_json(pipeline, db, schema, table),
                                                     orjson.dumps(txn.commit_lsn_text))  # up to the lsn's text
        self.tail = b',"txid":%s,"commit_ts":%s,"snapshot":%s}' % (  # after the seq
            orjson.dumps(txn.xid), orjson.dumps(txn.commit_ts_text), orjson.dumps(snapshot))

    def at(self, lsn_text: str, seq: int) -> bytes:
        """The source of the event at (lsn, seq). LSN text is hex digits and a slash: nothing to escape."""
        return b"".join((self.head, lsn_text.encode(), b'","seq":', b"%d" % seq, self.tail))


@functools.lru_cache(maxsize=1024)
def _where_json(pipeline: str, db: str, schema: str, table: str) -> bytes:
    """The start of a source object: its pipeline, db, schema and table, and no closing brace."""
    return orjson.dumps({"pipeline": pipeline, "db": db, "schema": schema, "table": table})[:-1]


_last_sources: list[EventSources | None] = [None]  # events come in runs of one table and transaction


def event_sources(pipeline: str, db: str, schema: str, table: str, txn: TransactionInfo, snapshot: bool) -> EventSources:
    """The EventSources of a table in a transaction: the last one made, while it fits."""
    sources = _last_sources[0]
    if (sources is None or sources.txn is not txn or sources.snapshot is not snapshot
            or sources.where != (pipeline, db, schema, table)):
        sources = _last_sources[0] = EventSources(pipeline, db, schema, table, txn, snapshot)
    return sources


def encode_key(event: ChangeEvent) -> bytes | None:
    """The Kafka key of a change event: its primary key as a JSON object; None for a truncate."""
    return None if event.key is None else orjson.dumps(event.key)


def event_source(event: ChangeEvent, pipeline: str, db: str, schema: str, table: str) -> dict[str, Any]:
    """The ``source`` of an event, and of a record that stands at an event's position (a schema change)."""
    txn = event.txn
    return {
        "pipeline": pipeline, "db": db, "schema": schema, "table": table,
        "commit_lsn": txn.commit_lsn_text, "lsn": event.lsn_text, "seq": event.position.seq,
        "txid": txn.xid, "commit_ts": txn.commit_ts_text, "snapshot": event.snapshot,
    }


def transaction_source(pipeline: str, db: str, txn: TransactionInfo) -> dict[str, Any]:
    """The ``source`` of a record at a transaction's commit (its END record): lsn = commit LSN, seq 0."""
    return {
        "pipeline": pipeline, "db": db, "commit_lsn": txn.commit_lsn_text, "lsn": txn.commit_lsn_text, "seq": 0,
        "txid": txn.xid, "commit_ts": txn.commit_ts_text,
    }


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
# Which columns hold JSON text, per schema (one parse per distinct schema)

_JSON_KINDS = ("json", "jsonb")
# (json/jsonb columns, json[]/jsonb[] columns, each of them with its name as a JSON string)
JsonColumns = tuple[frozenset[str], frozenset[str], tuple[tuple[str, str], ...]]
_json_columns_cache: dict[bytes, JsonColumns | None] = {}


def _json_columns(headers: Iterable[tuple[str, bytes]] | None) -> JsonColumns | None:
    """The json columns of the record's schema (:func:`json_columns_of`); None without a schema header."""
    raw = schema_json_of(headers)
    return None if raw is None else json_columns_of(raw)


def json_columns_of(raw: bytes) -> JsonColumns | None:
    """(json/jsonb columns, json[]/jsonb[] columns, each of them with its name as a JSON string) of
    a schema JSON; None if it has none."""
    try:
        return _json_columns_cache[raw]
    except KeyError:
        pass
    try:
        columns = [c for c in loads(raw)["columns"] if c["kind"] in _JSON_KINDS]
        scalars = frozenset(c["name"] for c in columns if not c.get("array"))
        arrays = frozenset(c["name"] for c in columns if c.get("array"))
        members = tuple((name, encode_basestring(name)) for name in sorted(scalars | arrays))
        found = (scalars, arrays, members) if columns else None
    except (ValueError, KeyError, TypeError):
        found = None  # the sink reports an unreadable header itself, where it reads the schema
    if len(_json_columns_cache) >= 1024:  # schemas change rarely; a bound all the same
        _json_columns_cache.clear()
    _json_columns_cache[raw] = found
    return found


# --------------------------------------------------------------------------------------------------
# The fast way: one C parse of the whole event, then the text of each json value found by its member
# name. Taken only where that finding is certain; otherwise None, and the walk below decides.

_LONG_INT = re.compile(f"[0-9]{{{_INT_DIGITS + 1}}}")


def _event_with_json_spans(text: str, scalars: frozenset[str], arrays: frozenset[str],
                           members: tuple[tuple[str, str], ...]) -> dict[str, Any] | None:
    """The event as :func:`_event_keeping_json_text` reads it, or None where this way cannot be sure.

    Without a backslash in the text, no string holds a quote, so each ``"name"`` in the text is a
    whole JSON string. When a json column's quoted name occurs exactly once per image holding it,
    each time right before its ``:``, those are the images' members, in the text's order: the
    value's text starts after the ``:``. (The connector writes compact JSON: anything else is walked.)
    """
    if not _spans_findable(text):
        return None
    try:
        event, end = _FAST.scan_once(text, 0)
    except (ValueError, StopIteration):
        return None  # the walk says what is wrong, in its words
    if end != len(text) or type(event) is not dict:
        return None
    return event if _json_spans(text, event, scalars, members) else None


def _spans_findable(text: str) -> bool:
    """No escapes (a member name may be spelt otherwise), nor an int the walk reads as Decimal."""
    return "\\" not in text and not (len(text) > _INT_DIGITS and _LONG_INT.search(text))


def _json_spans(text: str, event: dict[str, Any], scalars: frozenset[str], members: tuple[tuple[str, str], ...]) -> bool:
    """Put the text of each json value in place of its parsed value (`event` read from `text`,
    which :func:`_spans_findable`); False, the event left half done, where that is not certain."""
    before, after = event.get("before"), event.get("after")
    if type(before) is dict:
        if type(after) is dict:
            if not (text.count('"before"') == text.count('"before":') == 1
                    and text.count('"after"') == text.count('"after":') == 1):
                return False  # a repeated image, or an image name inside a value: the order is not certain
            images = [before, after] if text.index('"before":') < text.index('"after":') else [after, before]
        else:
            images = [before]
    elif type(after) is dict:
        images = [after]
    else:
        return True
    for name, quoted in members:
        if len(images) == 1:  # (an insert or a delete: no list to build)
            if name not in images[0]:
                continue
            holders = images
        else:
            holders = [image for image in images if name in image]
            if not holders:
                continue
        if text.count(quoted) != len(holders):
            return False  # the name is also in some value
        start = 0
        for image in holders:
            start = text.index(quoted, start) + len(quoted)
            if not text.startswith(":", start):
                return False  # spaced from its ":"
            start += 1
            value = image[name]
            if value is None:
                continue
            if name in scalars:  # the text up to the next separator, as the walk keeps it
                begin = _skip(text, start) if text[start] in _SPACE else start
                end = _FAST.scan_once(text, begin)[1]  # (no long integer here: checked above)
                image[name] = JsonText(text[start:_skip(text, end) if text[end] in _SPACE else end])
            elif isinstance(value, list):
                image[name] = _array_item_texts(text, _skip(text, start))
    return True


# msgspec reads JSON several times faster than the json module, with numbers as exactly (integers
# as int, every other number as Decimal from its text). It refuses what the json module reads
# beyond the standard (NaN, lone surrogates, integers past Python's digit limit): those, and
# anything that is no event, are read the json module's way above, which says what is wrong.
_MSGSPEC = msgspec.json.Decoder(float_hook=Decimal)


def _event_by_msgspec(value: bytes, json_columns: JsonColumns | None) -> tuple[dict[str, Any], Position] | None:
    """The event and its position as the json module's reading gives them, or None (read that way)."""
    try:
        event = _MSGSPEC.decode(value)
    except (msgspec.MsgspecError, RecursionError):
        return None
    if type(event) is not dict:
        return None
    if json_columns is not None:
        text = value.decode("utf-8")  # valid UTF-8: msgspec checked it
        if not (_spans_findable(text) and _json_spans(text, event, json_columns[0], json_columns[2])):
            return None
    source, op = event.get("source"), event.get("op")
    if type(source) is not dict or type(op) is not str:
        return None
    try:
        return event, position_of(source)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# The compiled reader (cdc.native) gives what the readers here give, in one pass over the bytes, for
# the standard JSON the connector writes; anything else it leaves to them (None).
_read_compiled = None
if native.core is not None and hasattr(native.core, "EventReader"):
    _read_compiled = native.core.EventReader(Decimal, JsonText, Position).read


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
