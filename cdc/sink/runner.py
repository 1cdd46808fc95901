"""The sink: Kafka topics -> row state in a target database, each change applied exactly once.

    AIOKafkaConsumer.getmany      manual assignment; offsets come from the target, not from Kafka
      -> BatchBuilder.add         parse, skip positions at or below the stored one, collapse per key
      -> Target.apply             rows + positions per topic partition in ONE transaction

Repeats (a restarted connector re-publishes everything after its last confirmed LSN, a restarted
sink re-reads after its last stored offset) are absorbed by the position check.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import PipelineConfig
from cdc.errors import SinkError
from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.events.schema import TableSchema
from cdc.lsn import Position, parse_lsn
from cdc.publish.kafka import ensure_topics
from cdc.sink.target import PartitionProgress, TableChanges, Target, open_target

log = logging.getLogger(__name__)


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


@dataclass
class _PendingTable:
    table: str
    schema: TableSchema
    truncate: bool = False
    rows: dict[tuple, dict[str, Any] | None] = field(default_factory=dict)  # key -> row, None = delete

    def changes(self) -> TableChanges:
        deletes = [{k: v for k, v in zip(self.schema.key, key)} for key, row in self.rows.items() if row is None]
        upserts = [row for row in self.rows.values() if row is not None]
        return TableChanges(self.table, self.schema, self.truncate, deletes, upserts)


class BatchBuilder:
    """Collects consumed events into per-table changes; the last state of each key wins."""

    def __init__(self, topic_tables: dict[str, str], positions: dict[tuple[str, int], PartitionProgress],
                 schemas: dict[bytes, TableSchema]):
        self.topic_tables = topic_tables
        self.positions = positions  # applied so far (shared with the runner, updated after commit)
        self._schemas = schemas  # header bytes -> parsed schema, kept by the runner across batches
        self.pending: dict[str, _PendingTable] = {}
        self.progress: dict[tuple[str, int], PartitionProgress] = {}
        self.applied = 0
        self.skipped = 0

    def __bool__(self) -> bool:
        return bool(self.progress)

    def schema_of(self, message) -> TableSchema:
        raw = next((v for k, v in (message.headers or ()) if k == SCHEMA_HEADER), None)
        if raw is None:
            raise SinkError(f"{message.topic}[{message.partition}]@{message.offset}: event without a {SCHEMA_HEADER} header")
        schema = self._schemas.get(raw)
        if schema is None:
            schema = self._schemas[raw] = TableSchema.from_json(raw)
        return schema

    def needs_flush_before(self, message) -> bool:
        """A new schema for a table with pending rows: apply those first, under their own schema."""
        table = self.topic_tables[message.topic]
        pending = self.pending.get(table)
        return pending is not None and pending.schema != self.schema_of(message)

    def add(self, message) -> None:
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        try:
            event = json.loads(message.value, parse_float=Decimal)  # exact numbers inside json columns
            source = event["source"]
            position = Position(parse_lsn(source["commit_lsn"]), parse_lsn(source["lsn"]), int(source["seq"]))
            op = event["op"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SinkError(f"{where}: not a cdc change event ({type(exc).__name__}: {exc})") from None
        tp = (message.topic, message.partition)
        done = self.progress.get(tp) or self.positions.get(tp)
        if done is not None and position <= done.position:
            self.skipped += 1
            self.progress[tp] = PartitionProgress(message.topic, message.partition, message.offset, done.position)
            return
        self.progress[tp] = PartitionProgress(message.topic, message.partition, message.offset, position)
        schema = self.schema_of(message)
        table = self.topic_tables[message.topic]
        pending = self.pending.get(table)
        if pending is None:
            pending = self.pending[table] = _PendingTable(table, schema)
        pending.schema = schema
        self.applied += 1
        if op == "t":
            pending.truncate = True
            pending.rows.clear()
            return
        try:
            if op in ("c", "r", "u"):
                after = event["after"]
                before = event.get("before")
                if op == "u" and before:
                    old_key = _hashable([before.get(k) for k in schema.key])
                    new_key = _hashable([after[k] for k in schema.key])
                    if old_key != new_key and all(k in before for k in schema.key):
                        pending.rows[old_key] = None
                pending.rows[_hashable([after[k] for k in schema.key])] = after
            elif op == "d":
                before = event["before"]
                pending.rows[_hashable([before[k] for k in schema.key])] = None
            else:
                raise SinkError(f"{where}: unknown op {op!r}")
        except (KeyError, TypeError) as exc:
            raise SinkError(f"{where}: {op!r} event for {table} lacks key column {exc}") from None

    def take(self) -> tuple[list[TableChanges], list[PartitionProgress]]:
        changes = [p.changes() for p in self.pending.values()]
        progress = list(self.progress.values())
        self.pending.clear()
        self.progress = {}
        return changes, progress


class Sink:
    def __init__(self, config: PipelineConfig, name: str, stop: asyncio.Event | None = None):
        self.config = config
        self.name = name
        self.sink_config = config.sinks[name]
        self.stop_event = stop or asyncio.Event()
        self.consumer_name = f"{config.pipeline}.{name}"
        self.topic_tables: dict[str, str] = {
            config.topic_for(ref): config.target_table(name, ref) for ref in config.source.tables
        }
        self.positions: dict[tuple[str, int], PartitionProgress] = {}
        self.schemas: dict[bytes, TableSchema] = {}  # a header is parsed once per process
        self.events_applied = 0
        self.target: Target | None = None

    async def run(self) -> None:
        self.target = await asyncio.to_thread(
            open_target, self.sink_config.connect_url, sqlite_path=self.sink_config.sqlite_path
        )
        partition_counts = await ensure_topics(self.config.kafka, self.topic_tables)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.config.kafka.bootstrap_servers,
            client_id=f"cdc-{self.consumer_name}",
            group_id=None,  # positions live in the target database, in the same transaction as the rows
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            request_timeout_ms=self.config.kafka.request_timeout_ms,  # also bounds connecting
        )
        await consumer.start()
        try:
            await self._assign(consumer, partition_counts)
            await self._consume(consumer)
        finally:
            await consumer.stop()
            await asyncio.to_thread(self.target.close)

    async def _assign(self, consumer: AIOKafkaConsumer, partition_counts: dict[str, int]) -> None:
        self.positions = await asyncio.to_thread(self.target.load_positions, self.consumer_name)
        partitions = [TopicPartition(t, p) for t in self.topic_tables for p in range(partition_counts[t])]
        consumer.assign(partitions)
        for tp in partitions:
            stored = self.positions.get((tp.topic, tp.partition))
            if stored is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, stored.offset + 1)
        log.info("sink %s consuming %d partitions", self.name, len(partitions))

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        batch_size = self.sink_config.batch_size
        while not self.stop_event.is_set():
            fetched = await consumer.getmany(timeout_ms=200, max_records=batch_size)
            if not fetched:
                continue
            builder = BatchBuilder(self.topic_tables, self.positions, self.schemas)
            # Partitions are independent (one table each, keys never span partitions): apply in turn.
            for messages in fetched.values():
                for message in messages:
                    if builder.needs_flush_before(message):
                        await self._apply(builder)
                    builder.add(message)
            await self._apply(builder)

    async def _apply(self, builder: BatchBuilder) -> None:
        if not builder:
            return
        changes, progress = builder.take()
        assert self.target is not None
        # apply() creates or extends the tables inside its transaction as needed
        await asyncio.to_thread(self.target.apply, self.consumer_name, changes, progress)
        for p in progress:
            self.positions[(p.topic, p.partition)] = p
        self.events_applied += builder.applied
        builder.applied = 0
