"""Table shapes on Kafka, each acknowledged by Kafka before any event of that shape is sent:

- on the schemas topic ({pipeline}.schemas): the published schema that events name by id
  (cdc.events.schema_ids), once per shape and process;
- on the schema changes topic ({pipeline}.schema_changes): loaded at start (the last record per
  table), and a new record before the first event of each new shape; read by cdc.connector.tables
  to notice a type change made while the connector was down.

Fed by the publish stage."""

from __future__ import annotations

import logging
from typing import Any

from cdc.config import PipelineConfig, TableRef
from cdc.events import schema_changes, schema_ids
from cdc.events.envelope import ChangeEvent
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events.schema_changes import PublishedShape
from cdc.publish.admin import latest_per_key
from cdc.publish.kafka import Publisher

log = logging.getLogger(__name__)


class PublishedShapes:
    def __init__(self, config: PipelineConfig, publisher: Publisher):
        self.config = config
        self.publisher = publisher
        self.topic = schema_changes.topic_of(config.pipeline)
        self.last: dict[TableRef, PublishedShape] = {}  # per table, the shape last published
        self.db_name = ""
        self.origin = SourceOrigin("", 0, 0)
        self.schemas_topic = schema_ids.topic_of(config.pipeline)
        self.schema_ids_sent: set[bytes] = set()  # acknowledged on the schemas topic by this process

    async def load(self, db_name: str, origin: SourceOrigin) -> None:
        """The shape last published per table (the schema changes topic keeps the last record of each)."""
        self.db_name, self.origin = db_name, origin
        by_name = {(t.schema, t.name): t for t in self.config.source.tables}
        for value in (await latest_per_key(self.config.kafka, self.topic)).values():
            try:
                shape = schema_changes.decode(value)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable record on %s", self.topic)
                continue
            table = by_name.get((shape.schema.schema, shape.schema.table))
            if table is not None:
                self.last[table] = shape

    async def publish_schema(self, stream: Any) -> None:
        """Before the first event of a relation version (a TableStream): its published schema on the
        schemas topic, keyed by the id its events carry, acknowledged by Kafka. Once per shape and
        process: a restarted connector writes it again (the same key and value; compaction keeps one)."""
        schema_id = schema_ids.schema_id(stream.schema_json)
        if schema_id not in self.schema_ids_sent:
            await self.publisher.send_and_wait(self.schemas_topic, schema_id, stream.schema_json,
                                               [(ORIGIN_HEADER, self.origin.to_json())])
            self.schema_ids_sent.add(schema_id)
        stream.schema_sent = True

    async def record(self, stream: Any, first: ChangeEvent) -> None:
        """Before the first event of a relation version (a TableStream): if its published shape is not
        the one last published for the table, publish the change on the schema changes topic, with
        the position of `first`, and wait for Kafka to acknowledge it, so it is there before any
        event of that shape."""
        assert stream.published is not None
        last = self.last.get(stream.ref)
        if last is not None and first.position <= last.position:
            return  # re-sent after a restart: the shapes of events up to there were recorded then
        stream.shape_recorded = True
        if last is not None and schema_changes.same_shape(last.schema, stream.published):
            return
        value = schema_changes.encode(self.config.pipeline, self.db_name, stream.topic,
                                      last.schema if last is not None else None, stream.published, first)
        await self.publisher.send_and_wait(self.topic,
                                           schema_changes.record_key(stream.ref.schema, stream.ref.name), value,
                                           [(ORIGIN_HEADER, self.origin.to_json())])
        self.last[stream.ref] = PublishedShape(first.position, stream.published)
        if last is not None:
            log.info("%s changed shape at %s: %s", stream.ref, first.position,
                     "; ".join(_describe_change(c) for c in schema_changes.changes(last.schema, stream.published)))


def _describe_change(change: dict[str, Any]) -> str:
    """One change of a schema change record, for the log: names and types only ("b retyped integer -> bigint")."""
    text = " ".join(str(change[k]) for k in ("column", "change") if k in change)
    if "from" in change:
        text += f" {change['from']} -> {change['to']}"
    return text + (" (widening)" if change.get("widening") else "")
