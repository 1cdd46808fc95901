"""The records of a verification: the control record a connector puts on a table's topic, and the
results on the compacted ``{pipeline}.verify`` topic.

A control record stands in the table's topic at the place of the chunk's high watermark, so a
sink reaches it after applying every change before it and before any change after it. It is
shaped like a change event so every reader of the topic passes it: it has an ``op`` ("v"), a
``source`` with a position (status, replay, the sink's stored-offset check read positions), the
table's schema and origin headers (the source-history guard, --skip-record), and ``before`` and
``after`` of null. Its Kafka key is a JSON list, ``["verify", chunk]``: row keys are JSON
objects and the truncate key a string, so it never replaces a row on a compacted topic.

``verify`` holds: request, chunk, table, ``lo`` (key values of the row before the range, null:
from the start; exclusive), ``hi`` (key values of the range's last key, null: no end; inclusive),
``excluded`` (key digests of rows changed while the chunk was read: neither side compares them)
and ``rows`` {key digest: row digest} of the source's rows in the range, as published.
"""

from __future__ import annotations

from typing import Any

import orjson

from cdc.events.codec import loads

CONTROL_OP = "v"
CONTROL_KEY_PREFIX = b'["verify",'
SOURCE_SIDE = "source"  # the `sink` of the connector's summary record of a table


def results_topic(pipeline: str) -> str:
    return f"{pipeline}.verify"


def control_key(chunk: str) -> bytes:
    return orjson.dumps(["verify", chunk])


def is_control(message: Any) -> bool:
    """A verification control record on a table topic (told by its Kafka key, without parsing it)."""
    key = message.key
    return key is not None and key.startswith(CONTROL_KEY_PREFIX)


def control_value(source: dict[str, Any], ts_ms: int, verify: dict[str, Any]) -> bytes:
    return orjson.dumps({"op": CONTROL_OP, "before": None, "after": None, "source": source, "ts_ms": ts_ms,
                         "verify": verify})


def result_key(request: str, sink: str, table: str, chunk: str) -> bytes:
    return orjson.dumps([request, sink, table, chunk])


def summary_key(request: str, table: str, part: int) -> bytes:
    """The connector's record of a finished table (or range `part` of it): the chunks whose results
    the CLI waits for."""
    return orjson.dumps([request, SOURCE_SIDE, table, part])


def decode(value: bytes) -> dict[str, Any]:
    return loads(value)
