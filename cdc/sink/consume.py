"""Reading the sink's topics from Kafka, and the guard against data the broker lost.

The consumer is assigned every partition of the sink's topics by hand (no consumer group): the
offsets to read from are the ones stored in the target with the rows (cdc.sink.positions), checked
first against what the broker still has. A stored offset below the partition's first retained one
or past its end, or a record there that carries another position, means the broker lost events or
the topic was re-created: the sink stops with KafkaDataMissingError (exit 4) instead of waiting at an
offset that will never come, or skipping what it never applied. While idle, the partitions' ends
are checked again now and then. ``--skip-record`` (a record that is no cdc event) is recorded here
too, before anything is read. The schemas that fetched records name by id are learnt from the
pipeline's schemas topic (cdc.publish.schemas) before a fetch is handed on to be parsed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from cdc.config import KafkaConfig
from cdc.errors import KafkaDataMissingError
from cdc.events.codec import NotAnEvent, decode_position
from cdc.events.origin import SourceOrigin
from cdc.events.transaction import decode_end
from cdc.publish.admin import partition_bounds
from cdc.publish.schemas import SchemaResolver
from cdc.lsn import Position
from cdc.sink.assemble import BatchBuilder, schema_json_of_record
from cdc.sink import fetched_records
from cdc.sink.backends.base import PartitionProgress, Target
from cdc.sink.guards import SkipRefusedError, UnreadableRecordError, origin_of
from cdc.sink.positions import Positions

log = logging.getLogger(__name__)

# How long to wait for the record at a stored offset when checking it against the stored position.
_RECORD_CHECK_TIMEOUT_MS = 5_000
# While nothing arrives, how often to ask the broker whether the partitions still reach the offsets
# the sink reads from: not every broker answers a fetch past the end with "offset out of range".
_IDLE_CHECK_S = 5.0


def kafka_consumer(kafka: KafkaConfig, consumer_name: str) -> AIOKafkaConsumer:
    fetched_records.install()  # the compiled core reads fetched records, where it is built
    return AIOKafkaConsumer(
        **kafka.client_options(),  # brokers, timeout (also bounds connecting), TLS/SASL
        client_id=f"cdc-{consumer_name}",
        group_id=None,  # positions live in the target database, in the same transaction as the rows
        enable_auto_commit=False,
        # Never jump quietly: an offset the broker does not have is checked and reported.
        auto_offset_reset="none",
        fetch_max_wait_ms=100,
        # A fetch holds up to 4 MiB of a partition (Kafka's default: 1 MiB, about 2,000 events of a
        # typical table): a batch of `batch_size` events then comes from one fetch, not several.
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )


class PartitionReader:
    """The sink's consumer: assigned its partitions at the stored positions, checked, fetched."""

    def __init__(self, consumer: AIOKafkaConsumer, positions: Positions, *, name: str, consumer_name: str,
                 transactions_topic: str, origins: dict[bytes, SourceOrigin], schemas: SchemaResolver):
        self.consumer = consumer
        self.positions = positions  # read here; written only by record_skip (Positions.committed)
        self.name = name
        self.consumer_name = consumer_name
        self.transactions_topic = transactions_topic
        self.origins = origins  # header bytes -> parsed origin, shared with the batches
        self.schemas = schemas  # learns the schemas that fetched records name, before they are parsed
        self._idle_since: float | None = None

    async def assign(self, partitions: list[TopicPartition], target: Target,
                     skip_record: tuple[str, int, int] | None) -> None:
        """Load the stored positions, record a --skip-record, and seek each partition past its
        stored offset once the broker is known to still have it (or to its beginning)."""
        self.positions.load(await asyncio.to_thread(target.load_positions, self.consumer_name))
        self.consumer.assign(partitions)
        if skip_record is not None:
            await self.record_skip(partitions, target, skip_record)
        self.positions.started()
        for tp in partitions:
            if self.positions.get((tp.topic, tp.partition)) is None:
                await self.consumer.seek_to_beginning(tp)
        await self.check_stored_offsets(partitions)  # and seeks to the next offset
        log.info("sink %s consuming %d partitions", self.name, len(partitions))

    async def fetch(self, max_records: int) -> dict[TopicPartition, list]:
        """The next records of the assigned partitions (maybe none); KafkaDataMissingError if the
        broker no longer has what the sink reads from."""
        loop = asyncio.get_running_loop()
        if self._idle_since is None:
            self._idle_since = loop.time()
        if loop.time() - self._idle_since >= _IDLE_CHECK_S:
            await self._check_partition_ends()
            self._idle_since = loop.time()
        try:
            fetched = await self.consumer.getmany(timeout_ms=200, max_records=max_records)
        except OffsetOutOfRangeError as exc:
            # The broker has no record at the offset we asked for: find out what it lacks.
            out = [tp for tp in (exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {})]
            await self.check_stored_offsets(out or list(self.consumer.assignment()))
            raise KafkaDataMissingError(
                f"the broker reports offsets out of range for {', '.join(f'{tp.topic}[{tp.partition}]' for tp in out)} "
                "although it has the stored ones: see README, When Kafka lost events"
            ) from None
        if fetched:
            self._idle_since = loop.time()
            await self.schemas.learn_for(share_headers(fetched))
        return fetched

    async def record_skip(self, partitions: list[TopicPartition], target: Target,
                          skip_record: tuple[str, int, int]) -> None:
        """Store that the record asked for with --skip-record is skipped, after checking that it is
        one this sink has not read past and that it is no cdc event."""
        topic, partition, offset = skip_record
        where = f"{topic}[{partition}]@{offset}"
        tp = TopicPartition(topic, partition)
        if tp not in partitions:
            raise SkipRefusedError(f"--skip-record {where}: sink {self.name} reads no such partition "
                                   f"(it reads {', '.join(sorted({p.topic for p in partitions}))}); nothing was skipped")
        done = self.positions.get((topic, partition))
        if done is not None and offset <= done.offset:
            raise SkipRefusedError(f"--skip-record {where}: the sink applied up to offset {done.offset} there "
                                   "already; nothing was skipped")
        first, end = (await partition_bounds(self.consumer, [tp]))[tp]
        message = await self._message_at(tp, offset) if offset >= first else None
        if message is None or message.value is None:
            raise SkipRefusedError(f"--skip-record {where}: the broker holds no record there (partition {first} to "
                                   f"{end - 1}) or only a tombstone; nothing was skipped")
        try:
            if topic == self.transactions_topic:
                decode_end(message.value)
            else:
                await self.schemas.learn_for([message])
                BatchBuilder.parse(message)
                schema_json_of_record(message)
        except UnreadableRecordError as exc:
            reason = str(exc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = f"{where}: not a transaction END record ({type(exc).__name__})"
        else:
            raise SkipRefusedError(f"--skip-record {where}: that record is a cdc event and is applied as such; "
                                   "--skip-record only skips records that are not; nothing was skipped")
        # No position stored yet: one before the partition's first record, which reads it from there as before.
        progress = replace(done, skipped_offset=offset) if done is not None else PartitionProgress(
            topic, partition, first - 1, Position(0, 0, 0), None, None, offset)
        await asyncio.to_thread(target.record_skip, self.consumer_name, progress)
        self.positions.committed([progress])
        log.warning("sink %s: skipping one record as asked (--skip-record), its content never reaches the target: %s; "
                    "recorded in %s.skipped_offset", self.consumer_name, reason, "cdc_sink_positions")

    async def _message_at(self, tp: TopicPartition, offset: int) -> Any:
        """The record at `offset`, or None if the broker returns none there."""
        self.consumer.seek(tp, offset)
        try:
            fetched = await self.consumer.getmany(tp, timeout_ms=_RECORD_CHECK_TIMEOUT_MS, max_records=1)
        except OffsetOutOfRangeError:
            return None
        found = [m for m in fetched.get(tp, ()) if m.offset == offset]
        return found[0] if found else None

    async def check_stored_offsets(self, partitions: list[TopicPartition]) -> None:
        """Check that the broker still has what the sink stored, then seek past it.

        The stored offset must be inside the partition, not below its first retained offset, and
        the record there must carry the stored position (or an earlier one: a repeat that was
        skipped). Otherwise the broker lost events, or the topic was re-created: stop and say so.
        """
        applied = self.positions.applied
        stored = [(tp, applied[(tp.topic, tp.partition)]) for tp in partitions if (tp.topic, tp.partition) in applied]
        bounds = await partition_bounds(self.consumer, [tp for tp, _ in stored])
        for tp, progress in stored:
            first, end = bounds[tp]
            record = None
            if progress.offset >= first:
                # Read it even when the end offset says it is not there: some brokers (tansu) report
                # end offsets too low, and the record itself is the evidence that counts.
                record = await self._record_at(tp, progress.offset)
            problem = stored_offset_problem(progress, first, end, record)
            if problem is not None:
                raise KafkaDataMissingError(
                    f"{problem}. Nothing was applied past it. Restore the topic if you can; otherwise "
                    "see README, When Kafka lost events"
                )
            self.consumer.seek(tp, progress.offset + 1)

    async def _record_at(self, tp: TopicPartition, offset: int) -> Any:
        """(position, origin) of the record at `offset`, "none" if it is no cdc event, or None if
        the broker returns no record there (compacted away)."""
        self.consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + _RECORD_CHECK_TIMEOUT_MS / 1000
        while asyncio.get_running_loop().time() < deadline:
            try:
                fetched = await self.consumer.getmany(tp, timeout_ms=500, max_records=1)
            except OffsetOutOfRangeError:
                return None
            for message in fetched.get(tp, ()):
                if message.offset != offset:
                    return None
                try:
                    position = decode_position(message.value)
                except NotAnEvent:
                    return "none"
                origin = origin_of(message, self.origins, f"{tp.topic}[{tp.partition}]@{offset}")
                return position, (origin.system_id, origin.timeline) if origin else None
        return None

    async def _check_partition_ends(self) -> None:
        """A partition that now ends before the offset we read from lost records: check it."""
        partitions = sorted(self.consumer.assignment())
        try:
            ends = await self.consumer.end_offsets(partitions)
        except KafkaError as exc:  # the broker is away: the consumer reconnects, ask again later
            log.debug("sink %s: cannot ask for end offsets now: %s", self.name, exc)
            return
        behind = [tp for tp in partitions if tp in ends and ends[tp] < await self.consumer.position(tp)]
        if behind:
            await self.check_stored_offsets(behind)


def share_headers(fetched: dict[Any, list]) -> list:
    """One record per distinct set of headers among the fetched records (tombstones name no schema):
    the others name the same schema. A partition's records mostly repeat the headers of the record
    before them: each is compared with those, and then given the very same headers object, which
    the stages after this one compare by identity (it is only hashed where the headers differ)."""
    distinct: dict[Any, Any] = {}
    for messages in fetched.values():
        last = _NO_HEADERS
        for m in messages:
            if m.value is None:
                continue
            headers = m.headers
            if headers is last:
                continue
            if headers == last:
                m.headers = last
            else:
                distinct[headers] = m
                last = headers
    return list(distinct.values())


_NO_HEADERS = object()


def stored_offset_problem(stored: PartitionProgress, first: int, end: int, record: Any) -> str | None:
    """What the broker lacks of what the sink stored for a partition, or None if it has it all.

    `first`/`end`: the partition's first retained offset and the offset its next record gets.
    `record`: (position, origin) of the record at the stored offset, "none" if that is no cdc
    event, None if the broker has no record there. A record found there outweighs `end`.
    """
    where = f"{stored.topic}[{stored.partition}]"
    had = f"the sink applied up to offset {stored.offset} (position {stored.position})"
    if record is None:  # no record at the stored offset
        if end <= stored.offset:
            return (f"{where}: {had}, but the broker's partition ends at offset {end - 1 if end else 'none (empty)'}: "
                    "the broker lost events or the topic was re-created, and events after the stored position that "
                    "are no longer on the topic are missing from the target")
        if stored.offset + 1 < first:
            return (f"{where}: {had}, but the broker's first retained offset is {first}: events at offsets "
                    f"{stored.offset + 1} to {first - 1} were deleted (retention) before the sink applied them")
        return None  # gone by retention or compaction, nothing after it: no unread event is lost
    if record == "none":
        return f"{where}: {had}, but offset {stored.offset} holds no cdc event: the topic was re-created"
    position, origin = record
    if position > stored.position or (origin and stored.origin and origin != stored.origin):
        return (f"{where}: {had}, but offset {stored.offset} holds position {position}: the topic was re-created "
                "or the broker lost its data, and events that were after the stored offset may be missing")
    return None
