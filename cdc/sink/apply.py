"""Applying batches: dead letters first, then rows and positions in one target transaction.

The :class:`Applier` takes a :class:`~cdc.sink.assemble.BatchBuilder`'s batch to the backend
(``Target.apply``, cdc.sink.backends), commits the positions it stored (cdc.sink.positions) and
records the sink's metrics. With ``on_error: dlq``, a batch the target rejects for its data is
bisected until the rejected records are alone; those go to the dead-letter topic and hold their
keys, and later changes of a held key wait there too (cdc.sink.dead_letters, README "Dead letters").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc import failpoints, metrics
from cdc.errors import RowRejectedError
from cdc.events.schema import TableSchema
from cdc.sink.assemble import BatchBuilder
from cdc.sink.backends.base import PartitionProgress, Prepared, TableChanges, Target
from cdc.sink.dead_letters import DeadLetterQueue, KeyId, canonical_key
from cdc.sink.guards import UnreadableRecordError
from cdc.sink.positions import Positions
from cdc.sink.transactions import TransactionAssembler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ahead:
    """A batch taken out of its builder and converted while the batch before it is applied."""

    changes: list[TableChanges]
    progress: list[PartitionProgress]
    prepared: Prepared | None  # None: the target converts them itself (Target.prepare)


def keys_of(message, event: dict[str, Any] | None = None, schema: TableSchema | None = None) -> set[KeyId]:
    """The keys a record changes: its Kafka key, and the old key of a row that moves to a new one."""
    keys = {(message.topic, canonical_key(message.key) if message.key is not None else "")}
    before = event.get("before") if event is not None else None
    if isinstance(before, dict) and schema is not None and all(k in before for k in schema.key):
        keys.add((message.topic, canonical_key({k: before[k] for k in schema.key})))
    return keys


class Applier:
    """The apply stage of one sink attempt: one target connection, the sink's positions."""

    def __init__(self, target: Target, positions: Positions, new_builder: Callable[..., BatchBuilder], *, name: str,
                 consumer_name: str, topic_tables: dict[str, str], source_tables: dict[str, str],
                 dead_letters: DeadLetterQueue | None, assembler: TransactionAssembler | None,
                 consumer: AIOKafkaConsumer | None):
        self.target = target
        self.positions = positions  # committed here, after each target transaction
        self.new_builder = new_builder  # an empty batch, without dead-letter holds
        self.name = name
        self.consumer_name = consumer_name
        self.topic_tables = topic_tables  # topic -> target table
        self.source_tables = source_tables  # topic -> source table, the `table` label of the metrics
        self.dead_letters = dead_letters
        self.assembler = assembler  # `apply: transactional`: offsets of held events are never stored
        self._consumer = consumer  # for the lag metric: the partitions' ends as of each fetch
        self.events_applied = 0

    def builder(self, *, hold: bool = True, after: dict[tuple[str, int], PartitionProgress] | None = None
                ) -> BatchBuilder:
        builder = self.new_builder(after) if after else self.new_builder()
        if hold and self.dead_letters is not None:
            builder.hold = self.held_back
        return builder

    def held_back(self, message, event: dict[str, Any], schema: TableSchema) -> str | None:
        """Why an event waits in the dead-letter queue behind an earlier change of its key, or None."""
        assert self.dead_letters is not None
        if not self.dead_letters.holding:
            return None
        keys = keys_of(message, event, schema)
        if not any(self.dead_letters.holds(k) for k in keys):
            return None
        for key in keys:  # a row that moves: its new key waits as well
            self.dead_letters.hold(key)
        return "held back: an earlier change of this key is in the dead-letter queue"

    def old_keys(self, message) -> list[str]:
        """The old key of a row that moves to a new one (its Kafka key): held by its dead letter too."""
        event, _ = BatchBuilder.parse(message)
        schema = self.new_builder().schema_of(message)
        own = (message.topic, canonical_key(message.key) if message.key is not None else "")
        return [key for topic, key in keys_of(message, event, schema) if (topic, key) != own]

    async def dead_letter_unreadable(self, message, exc: UnreadableRecordError) -> None:
        """A record that is no cdc event goes to the DLQ at once, before any position passes it."""
        assert self.dead_letters is not None
        self.dead_letters.hold(next(iter(keys_of(message))))
        await self.dead_letters.write(message, str(exc), self.topic_tables.get(message.topic, ""), "")
        metrics.DEAD_LETTERS.labels(sink=self.name, table=self.source_tables.get(message.topic, message.topic)).inc()

    async def apply_taken(self, builder: BatchBuilder, taken: list, ahead: Ahead | None = None) -> list:
        """Apply the batch (`ahead`: taken from it by :meth:`take_ahead`); if the target rejects it for
        a reason in its data and the sink dead-letters (on_error: dlq), find the rejected records by
        bisection. Returns a new empty list of taken records."""
        try:
            await self.apply(builder, ahead)
        except RowRejectedError as exc:
            if self.dead_letters is None:
                raise
            log.info("sink %s: the target rejected a batch of %d records (%s); looking for the rejected ones",
                     self.consumer_name, len(taken), exc)
            await self.isolate(taken, str(exc))
        return []

    async def isolate(self, records: list, rejected: str | None = None) -> None:
        """Apply `records` (in order, each part in a target transaction of its own), halving any part
        the target rejects until the rejected records are alone; those go to the DLQ and hold their
        keys, so later records of the same key in the parts after them are held back too.
        `rejected`: the target's reason when this part is known to be rejected."""
        assert self.dead_letters is not None
        if rejected is None:
            builder = self.builder()
            for message in records:
                if builder.needs_flush_before(message):
                    builder.cut()
                if not builder.add(message):
                    builder.cut()
                    builder.add(message)
            try:
                await self.apply(builder)
                return
            except RowRejectedError as exc:
                rejected = str(exc)
        if len(records) > 1:
            half = len(records) // 2
            await self.isolate(records[:half])
            await self.isolate(records[half:])
            return
        (message,) = records
        event, position = BatchBuilder.parse(message)
        dead = self.builder()
        for key in keys_of(message, event, dead.schema_of(message)):
            self.dead_letters.hold(key)
        dead.add_dead(message, position, rejected)
        await self.apply(dead)

    def take_ahead(self, builder: BatchBuilder) -> Ahead:
        """Take a batch (no dead letters) out of `builder` and convert its values while the batch
        before it is being applied, so that the target's thread only writes."""
        assert not builder.dead
        changes, progress = builder.take()
        return Ahead(changes, self._storable(progress), self.target.prepare(changes))

    async def apply(self, builder: BatchBuilder, ahead: Ahead | None = None) -> None:
        """Dead letters first (acknowledged by Kafka), then the batch's rows and positions in one
        target transaction; the positions are committed here only once the target has them.
        `ahead`: the batch as :meth:`take_ahead` took it from `builder`."""
        if ahead is not None:
            if ahead.progress:  # (else nothing was taken: tombstones, records skipped on purpose)
                failpoints.reached("sink.consumed")
                await self._apply(builder, ahead.changes, ahead.progress, ahead.prepared)
            return
        if builder.dead:
            # Acknowledged by Kafka before the positions that pass them are stored.
            assert self.dead_letters is not None
            dead, builder.dead = builder.dead, []
            for message, reason, table, position in dead:
                await self.dead_letters.write(message, reason, table, position, also=self.old_keys(message))
                metrics.DEAD_LETTERS.labels(sink=self.name, table=self.source_tables.get(message.topic, table)).inc()
            failpoints.reached("dlq.written")
        if not builder:
            return
        changes, progress = builder.take()
        failpoints.reached("sink.consumed")
        await self._apply(builder, changes, self._storable(progress))

    def _storable(self, progress: list[PartitionProgress]) -> list[PartitionProgress]:
        if self.assembler is None:
            return progress
        # Never store an offset at or past an event still held: a restart seeks past stored offsets.
        first = self.assembler.first_held_offsets()
        return [replace(p, offset=min(p.offset, first[(p.topic, p.partition)] - 1))
                if (p.topic, p.partition) in first else p for p in progress]

    async def _apply(self, builder: BatchBuilder, changes: list[TableChanges], progress: list[PartitionProgress],
                     prepared: Prepared | None = None) -> None:
        assert self.target is not None
        # apply() creates or extends the tables inside its transaction as needed
        started = time.monotonic()
        missing = await asyncio.to_thread(self.target.apply, self.consumer_name, changes, progress, prepared)
        failpoints.reached("sink.committed")
        self.positions.committed(progress)
        self._record_metrics(builder, progress, time.monotonic() - started)
        for change in changes:
            if missing.get(change.table):
                # Named by table and key columns only: key values may be private data.
                log.warning(
                    "sink %s: %d partial rows for table %s (key %s) found no row to update; the target "
                    "lacks these rows and they stay missing until their next full change (see README, Partial rows)",
                    self.consumer_name, missing[change.table], change.table, ", ".join(change.schema.key),
                )
                missing[change.table] = 0
        self.events_applied += builder.applied
        builder.applied = 0
        builder.applied_by_topic = {}

    def _record_metrics(self, builder: BatchBuilder, progress: list[PartitionProgress], took_s: float) -> None:
        metrics.SINK_APPLY_LATENCY.labels(sink=self.name).observe(took_s)
        metrics.SINK_BATCH.labels(sink=self.name).observe(builder.applied)
        for topic, count in builder.applied_by_topic.items():
            metrics.SINK_APPLIED.labels(sink=self.name, table=self.source_tables.get(topic, topic)).inc(count)
        for p in progress:
            labels = {"sink": self.name, "topic": p.topic, "partition": str(p.partition)}
            metrics.SINK_OFFSET.labels(**labels).set(p.offset)
            end = self._consumer.highwater(TopicPartition(p.topic, p.partition)) if self._consumer else None
            if end is not None:  # the partition's end as of the last fetch
                metrics.SINK_LAG.labels(**labels).set(max(end - p.offset - 1, 0))
