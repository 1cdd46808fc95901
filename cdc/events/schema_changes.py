"""Schema change records: each change of a captured table's published shape, on ``{pipeline}.schema_changes``.

The ``cdc.schema`` header of every event already says what shape that event has; these records say
when and how the shape changed, for any consumer (cdc's sinks follow the headers). One record per
change, keyed by the table, published (and acknowledged by Kafka) before the first event of the new
shape, and carrying that event's position: a consumer orders it with the table's events by position.

The shape is the table **as published**: the privacy policy applies (an excluded column is absent,
a masked one has the type it travels as, ``text``), exactly as in the header.

The topic is compacted: the last record of each table is the shape the connector last published,
which a restarted connector compares the table's first Relation message with (a type change made
while it was down is otherwise not seen as one: see cdc.connector.shapes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from cdc.events.codec import event_source, loads, position_of
from cdc.events.envelope import ChangeEvent
from cdc.events.schema import Column, TableSchema, keeps_values
from cdc.lsn import Position


def topic_of(pipeline: str) -> str:
    return f"{pipeline}.schema_changes"


def record_key(schema: str, table: str) -> bytes:
    return orjson.dumps({"schema": schema, "table": table})


def _signature(column: Column) -> tuple:
    # What makes a shape different for a consumer; not `default`, which only matters with an added column.
    return column.attnum, column.name, column.type, column.kind, column.array, column.nullable, column.builtin


def same_shape(a: TableSchema, b: TableSchema) -> bool:
    return a.key == b.key and [_signature(c) for c in a.columns] == [_signature(c) for c in b.columns]


def changes(old: TableSchema, new: TableSchema) -> list[dict[str, Any]]:
    """What changed from `old` to `new`, matched by column identity (attnum; by name for a column
    without one): added, dropped, renamed (from -> to), retyped (from -> to, and whether every old
    value is a value of the new type), nullable (from -> to), and a changed primary key."""
    def identity(c: Column) -> Any:
        return c.attnum if c.attnum is not None else c.name

    before = {identity(c): c for c in old.columns}
    after = {identity(c): c for c in new.columns}
    out: list[dict[str, Any]] = []
    for ident, col in before.items():
        if ident not in after:
            out.append({"change": "dropped", "column": col.name, "attnum": col.attnum, "type": col.type})
    for ident, col in after.items():
        was = before.get(ident)
        if was is None:
            out.append({"change": "added", "column": col.name, "attnum": col.attnum, "type": col.type})
            continue
        if was.name != col.name:
            out.append({"change": "renamed", "attnum": col.attnum, "from": was.name, "to": col.name})
        if was.type != col.type:
            out.append({"change": "retyped", "column": col.name, "attnum": col.attnum, "from": was.type, "to": col.type,
                        "widening": keeps_values(was.type, col.type)})
        if was.nullable != col.nullable:
            out.append({"change": "nullable", "column": col.name, "attnum": col.attnum, "from": was.nullable,
                        "to": col.nullable})
    if old.key != new.key:
        out.append({"change": "key", "from": list(old.key), "to": list(new.key)})
    return out


def _shape(schema: TableSchema) -> dict[str, Any]:
    """The column list as the cdc.schema header writes it, each column with its key flag."""
    return {"key": list(schema.key), "columns": [
        {"name": c.name, "attnum": c.attnum, "type": c.type, "kind": c.kind, "array": c.array, "key": c.name in schema.key,
         "nullable": c.nullable, "builtin": c.builtin, **({"default": c.default} if c.default is not None else {})}
        for c in schema.columns
    ]}


def encode(pipeline: str, db: str, topic: str, old: TableSchema | None, new: TableSchema,
           first: ChangeEvent) -> bytes:
    """The record of a change from `old` (None: the first shape published of the table) to `new`,
    whose first event is `first`: its `source` is that event's, position included."""
    return orjson.dumps({
        "schema": new.schema,
        "table": new.table,
        "topic": topic,
        "old": _shape(old) if old is not None else None,
        "new": _shape(new),
        "changes": changes(old, new) if old is not None else [],
        "source": event_source(first, pipeline, db, new.schema, new.table),
        "ts_ms": time.time_ns() // 1_000_000,
    })


@dataclass(frozen=True, slots=True)
class PublishedShape:
    """A table's shape as last published, and the position of its first event."""

    position: Position
    schema: TableSchema


def decode(value: bytes) -> PublishedShape:
    """Raises ValueError, KeyError or TypeError for anything that is not a schema change record."""
    record = loads(value)
    position = position_of(record["source"])
    new = record["new"]
    columns = tuple(
        Column(c["name"], c["type"], c["kind"], bool(c["array"]), bool(c["nullable"]), bool(c["builtin"]),
               c.get("default"), int(c["attnum"]) if c.get("attnum") is not None else None)
        for c in new["columns"]
    )
    return PublishedShape(position, TableSchema(record["schema"], record["table"], columns, tuple(new["key"])))
