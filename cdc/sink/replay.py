"""Replay: re-apply retained events from an LSN, through a sink's normal apply path.

PostgreSQL cannot rewind a logical slot, so replay comes from what the pipeline keeps: the topics.
For each partition, the first offset whose event has ``commit_lsn >= --from-lsn`` is found by a
binary search over offsets (positions strictly increase along a partition), never by scanning.
From there events are applied exactly as a running sink applies them: same batching, same
positions table, same compare-and-set, under the same lock (a running sink of that name refuses a
replay, and the reverse). Against the sink's own target the stored positions move back to just
before ``--from-lsn`` in the transaction of the first batch, so a replay that dies half-way leaves a
target that a normal ``cdc sink`` continues correctly. ``--until-lsn`` stops each partition at the
last event committed at or before it: into an empty ``--target`` that is the state as of that LSN.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from cdc.config import PipelineConfig, SinkConfig
from cdc.errors import KafkaDataMissingError, SinkError
from cdc.events.codec import NotAnEvent, decode_position
from cdc.publish.admin import compacted_topics, partition_bounds
from cdc.lsn import Position, format_lsn
from cdc.sink.assemble import BatchBuilder
from cdc.sink.backends.base import PartitionProgress
from cdc.sink.positions import skipped_offsets
from cdc.sink.runner import Sink

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_S = 5.0
_EMPTY_FETCHES_AT_END = 3  # of 0.5 s each, past the partition's reported end


class RetentionError(KafkaDataMissingError):
    """The topics no longer hold events back to the asked LSN (retention or compaction)."""


class Replay(Sink):
    def __init__(self, config: PipelineConfig, name: str, stop: asyncio.Event | None = None, *,
                 from_lsn: int, until_lsn: int | None = None, target: SinkConfig | None = None,
                 config_file: str = "FILE"):
        super().__init__(config, name, stop, config_file=config_file)
        if target is not None:
            self.sink_config = target  # another database: the sink's own target is not touched
        self.from_lsn = from_lsn
        # A transactional sink's position on the transactions topic moves back with its tables:
        # END records from --from-lsn on must be read again, or the sink takes them as applied
        # and the events after where the replay stopped wait for them for ever.
        self.rewinds_transactions = self.assembler is not None
        self.assembler = None  # replays apply in batches, not whole transactions (see README, Replay)
        self.dead_letters = None  # a rejected change stops a replay (see README, Dead letters)
        self.verifies = False  # verification control records only move the positions (cdc.sink.assemble)
        self._rewind: list[PartitionProgress] = []  # positions moved back, stored with the first batch
        self.until_lsn = until_lsn
        self.replayed: Counter[str] = Counter()  # target table -> events re-applied

    @property
    def topics(self) -> list[str]:
        return list(self.topic_tables) + ([self.transactions_topic] if self.rewinds_transactions else [])

    async def _assign(self, consumer: AIOKafkaConsumer, partition_counts: dict[str, int]) -> None:
        assert self.target is not None
        # what the compare-and-set expects
        stored = await asyncio.to_thread(self.target.load_positions, self.consumer_name)
        self.positions.skipped_offsets = skipped_offsets(stored)
        partitions = [TopicPartition(t, p) for t in self.topic_tables for p in range(partition_counts[t])]
        transactions = [TopicPartition(self.transactions_topic, p) for p in range(partition_counts[self.transactions_topic])
                        ] if self.rewinds_transactions else []
        consumer.assign(partitions + transactions)
        bounds = await partition_bounds(consumer, partitions + transactions)
        compacted = await compacted_topics(self.config.kafka, list(self.topic_tables))
        self.ends: dict[TopicPartition, int] = {}
        problems = []
        # Everything before --from-lsn counts as applied: events from it on are applied again. A
        # real position (stored positions always are): that of a commit record just before the
        # LSN, past every event committed before it (an event's own LSN precedes its commit's).
        before_lsn = max(self.from_lsn - 1, 0)
        before = Position(before_lsn, before_lsn, 0)
        for tp in transactions:
            start, _ = await self._first_at_or_after(consumer, tp, *bounds[tp])
            consumer.pause(tp)  # only its position moves back; its END records are not applied
            self._rewind_stored(stored, tp, start, before)
        for tp in partitions:
            first, end = bounds[tp]
            start, oldest = await self._first_at_or_after(consumer, tp, first, end)
            if oldest is None and deleted_since_applied(stored.get((tp.topic, tp.partition)), first, self.from_lsn):
                problems.append(f"{tp.topic}[{tp.partition}]: it holds no event any more (retention deleted every "
                                f"offset before {first}), and this target had not applied them all before the LSN")
            if oldest is not None and (first > 0 or tp.topic in compacted) and oldest > self.from_lsn:
                problems.append(f"{tp.topic}[{tp.partition}]: the oldest event still held was committed at "
                                f"{format_lsn(oldest)}" + (" (compacted topic)" if tp.topic in compacted else ""))
            if tp.topic in compacted and self.until_lsn is not None:
                problems.append(f"{tp.topic}: a compacted topic keeps only the latest event per key, so the state "
                                "as of --until-lsn cannot be rebuilt from it")
            self.ends[tp] = end
            self.positions.committed([PartitionProgress(tp.topic, tp.partition, start - 1, before)])
            self._rewind_stored(stored, tp, start, before)
            consumer.seek(tp, start)
        if problems:
            raise RetentionError(
                f"cannot replay from {format_lsn(self.from_lsn)}: " + "; ".join(problems)
                + ". Nothing was applied. Replay from a later LSN, or re-read the tables with `cdc snapshot`"
            )
        log.info("replaying sink %s into %s from %s%s", self.name, self.target.description, format_lsn(self.from_lsn),
                 f" until {format_lsn(self.until_lsn)}" if self.until_lsn is not None else "")

    def _rewind_stored(self, stored: dict[tuple[str, int], PartitionProgress], tp: TopicPartition, start: int,
                       before: Position) -> None:
        """Move a stored position past --from-lsn back to just before it, with the first batch: a
        replay that stops half-way then leaves every partition where a normal sink continues."""
        done = stored.get((tp.topic, tp.partition))
        if done is not None and done.position > before:
            self._rewind.append(PartitionProgress(tp.topic, tp.partition, start - 1, before, done.origin))

    async def _first_at_or_after(self, consumer: AIOKafkaConsumer, tp: TopicPartition, first: int,
                                 end: int) -> tuple[int, int | None]:
        """(first offset whose commit_lsn >= from_lsn, or `end`; the commit LSN of the oldest record)."""
        if end <= first:
            return end, None
        oldest = await self._commit_at(consumer, tp, first)
        lo, hi = first, end  # invariant: every offset below lo is before from_lsn; hi is at or after
        while lo < hi:
            mid = (lo + hi) // 2
            commit = await self._commit_at(consumer, tp, mid)
            if commit < self.from_lsn:
                lo = mid + 1
            else:
                hi = mid
        return lo, oldest

    async def _commit_at(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> int:
        """The commit LSN of the first event at or after `offset` (compaction leaves gaps; a
        tombstone after a delete has no event: the next record decides)."""
        consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + _FETCH_TIMEOUT_S
        while asyncio.get_running_loop().time() < deadline:
            try:
                fetched = await consumer.getmany(tp, timeout_ms=500, max_records=8)
            except OffsetOutOfRangeError:
                # Retention deleted the offset since the partition's bounds were read. Commit LSNs only
                # grow along a partition, so the oldest record still held answers for every offset
                # before it: the caller then names it as the oldest event held, and stops.
                offset = max(offset, (await consumer.beginning_offsets([tp]))[tp])
                consumer.seek(tp, offset)
                continue
            for message in fetched.get(tp, ()):
                if message.value is not None and not self.positions.skipped(message):
                    return _commit_lsn(message)
        raise SinkError(f"{tp.topic}[{tp.partition}]: no record could be read at offset {offset}")

    async def _apply(self, builder: BatchBuilder) -> None:
        if builder and self._rewind:  # in the transaction of the first batch, as the tables' positions
            for p in self._rewind:
                builder.progress.setdefault((p.topic, p.partition), p)
            self._rewind = []
        await super()._apply(builder)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        batch_size = self.sink_config.batch_size
        active = set(self.ends)
        idle: dict[TopicPartition, int] = {}
        while active and not self.stop_event.is_set():
            fetched = await consumer.getmany(*active, timeout_ms=500, max_records=batch_size)
            await self.schema_resolver.learn_for(m for messages in fetched.values() for m in messages)
            builder = BatchBuilder(self.topic_tables, self.positions.applied, self.schemas, origins=self.origins, keep=self.keep,
                                   accept_source_history=True)  # the operator asked for these events
            for tp, messages in fetched.items():
                for message in messages:
                    if tp not in active:
                        break
                    if self.positions.skipped(message):
                        continue  # a record that is no cdc event, skipped on purpose (cdc sink --skip-record)
                    if message.value is not None and self.until_lsn is not None and _commit_lsn(message) > self.until_lsn:
                        active.discard(tp)
                        consumer.pause(tp)
                        break
                    if message.value is None:
                        continue  # a tombstone: only for log compaction
                    if builder.needs_flush_before(message):
                        await self._apply(builder)
                    if not builder.add(message):
                        await self._apply(builder)
                        builder.add(message)
                    self.replayed[self.topic_tables[message.topic]] += 1
            await self._apply(builder)
            # Done with a partition once it is past the end it had at the start and fetches keep
            # finding nothing more (some brokers report end offsets below the records they hold).
            for tp in list(active):
                if tp in fetched or await consumer.position(tp) < self.ends[tp]:
                    idle[tp] = 0
                    continue
                idle[tp] = idle.get(tp, 0) + 1
                if idle[tp] >= _EMPTY_FETCHES_AT_END:
                    active.discard(tp)
                    consumer.pause(tp)
        for table, count in sorted(self.replayed.items()):
            log.info("replayed %d events into table %s", count, table)


def deleted_since_applied(done: PartitionProgress | None, first: int, from_lsn: int) -> bool:
    """Whether a partition that holds no event lost some the replay needs: retention deleted its
    offsets before `first`, and the target's stored progress does not show them all applied and all
    committed before `from_lsn` (positions grow along a partition, so its last applied one decides)."""
    if first == 0:
        return False  # nothing was ever deleted
    return done is None or done.offset < first - 1 or done.position.commit_lsn >= from_lsn


def _commit_lsn(message: Any) -> int:
    try:
        return decode_position(message.value).commit_lsn
    except NotAnEvent:
        raise SinkError(f"{message.topic}[{message.partition}]@{message.offset}: not a cdc change event") from None
