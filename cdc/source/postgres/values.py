"""Column values: pgoutput text -> Python (psycopg's own loaders) -> the JSON form of the event contract.

One converter function per column is built when a Relation message arrives, so the per-row work is a
single call per value. The JSON forms are listed in :mod:`cdc.events.schema`.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg.adapt import Transformer
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg.types.array import register_array

from cdc.source.postgres.catalog import TypeDescription

Converter = Callable[[bytes], Any]

TEXT_ARRAY_OID = 1009
MAX_SAFE_INTEGER = 2**53  # beyond this a JSON number loses digits in most readers


def _bigint(value: int) -> int | str:
    return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)


def _numeric(value: Decimal) -> str:
    return str(value)


def _float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _bytea(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _timestamptz(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def _iso(value: Any) -> str:
    return value.isoformat()


def _str(value: Any) -> str:
    return str(value)


# Kind -> what to do with the loaded Python value (None: the loaded value is already its JSON form).
_FINISH: dict[str, Callable[[Any], Any] | None] = {
    "boolean": None, "smallint": None, "integer": None, "bigint": _bigint, "numeric": _numeric,
    "real": _float, "double": _float, "text": None, "bytea": _bytea, "date": _iso, "time": _iso,
    "timetz": _iso, "timestamp": _iso, "timestamptz": _timestamptz, "uuid": _str,
}

# Kinds whose psycopg loader refuses values PostgreSQL allows (infinity, years past 9999, BC,
# 24:00:00): those travel as PostgreSQL printed them rather than stop the stream for good.
_OUT_OF_PYTHON_RANGE = frozenset({"date", "time", "timetz", "timestamp", "timestamptz"})
_LOAD_ERRORS = (psycopg.DataError, ValueError, OverflowError)


def _text(data: bytes) -> str:
    return data.decode("utf-8")


def _json_fragment(data: bytes) -> orjson.Fragment:
    # json/jsonb are embedded as PostgreSQL printed them: re-parsing would round big numbers.
    return orjson.Fragment(data)


def _finish_array(items: list, finish: Callable[[Any], Any]) -> list:
    return [None if v is None else _finish_array(v, finish) if isinstance(v, list) else finish(v) for v in items]


class ValueDecoder:
    """Builds per-column converters with psycopg's loaders, using the catalog connection's adapters
    (so types registered there, such as arrays of enums, load properly)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.transformer = Transformer(conn)

    def converter(self, desc: TypeDescription) -> Converter:
        if desc.kind in ("json", "jsonb") and not desc.array:
            return _json_fragment
        if desc.kind == "interval" and not desc.array:
            # psycopg's interval loader folds months into days; the ISO-8601 text is exact.
            return _text
        if desc.kind == "text" and not desc.array:
            return _text
        if desc.array and not desc.builtin:
            self._register_array(desc)
        if desc.array and desc.kind in ("json", "jsonb", "interval"):
            # Split as text[] and keep each element's text, for the same reasons as the scalars above.
            load = self.transformer.get_loader(TEXT_ARRAY_OID, Format.TEXT).load
            finish = None if desc.kind == "interval" else (lambda v: orjson.Fragment(v.encode("utf-8")))
        else:
            load = self.transformer.get_loader(desc.loader_oid, Format.TEXT).load
            finish = _FINISH.get(desc.kind)
        if desc.array:
            if finish is None:
                return load
            if desc.kind in _OUT_OF_PYTHON_RANGE:
                load_text = self.transformer.get_loader(TEXT_ARRAY_OID, Format.TEXT).load

                def convert_array(data: bytes, load=load, finish=finish) -> Any:
                    try:
                        return _finish_array(load(data), finish)
                    except _LOAD_ERRORS:  # some element out of Python's range: all elements as text
                        return load_text(data)

                return convert_array
            return lambda data: _finish_array(load(data), finish)
        if finish is None:
            return load
        if desc.kind in _OUT_OF_PYTHON_RANGE:
            def convert(data: bytes, load=load, finish=finish) -> Any:
                try:
                    return finish(load(data))
                except _LOAD_ERRORS:
                    return data.decode("ascii")
            return convert
        return lambda data: finish(load(data))

    def _register_array(self, desc: TypeDescription) -> None:
        # An array of a user-defined type (enum[] ...): teach psycopg its array OID, elements as text.
        row = self.conn.execute(
            "SELECT typname, typelem FROM pg_type WHERE oid = %s", (desc.loader_oid,)
        ).fetchone()
        if row is not None:
            info = TypeInfo(row[0].lstrip("_"), row[1], desc.loader_oid)
            register_array(info, self.conn)
            self.transformer = Transformer(self.conn)
