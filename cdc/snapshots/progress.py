"""Snapshot progress records: the Kafka topic ``{pipeline}.snapshots`` (compacted, keyed by request
and table), written by :class:`cdc.snapshots.jobs.Snapshots` once a chunk is confirmed, read back at
start (resuming jobs) and by ``cdc status`` / ``cdc snapshot``; and :class:`ChunkProgress`, which
writes a job's records beside its reading."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc import failpoints
from cdc.config import PipelineConfig
from cdc.publish.admin import partition_counts, track_topics

if TYPE_CHECKING:
    from cdc.snapshots.jobs import Chunk, Job, Snapshots


def state_topic(config: PipelineConfig) -> str:
    return f"{config.pipeline}.snapshots"


async def load_progress(config: PipelineConfig) -> dict[tuple[str, str], dict]:
    """The last progress record per (request, table) in the pipeline's snapshot topic."""
    topic = state_topic(config)
    consumer = AIOKafkaConsumer(**config.kafka.client_options(), enable_auto_commit=False,
                                # a topic created a moment ago: its leader is asked for again soon, not in 100 ms
                                retry_backoff_ms=20)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return {}
        count = (await partition_counts(config.kafka, [topic])).get(topic, 0)
        await track_topics(consumer, [topic])
        parts = [TopicPartition(topic, p) for p in range(count)]
        # The ends before assigning: an assigned partition starts a fetch at once, which an empty
        # one holds for fetch_max_wait_ms (500 ms of every new pipeline's start) before end_offsets answers.
        ends = await consumer.end_offsets(parts)
        records: dict[tuple[str, str], dict] = {}
        remaining = {tp for tp in parts if ends[tp] > 0}
        if not remaining:
            return records
        consumer.assign(list(remaining))
        await consumer.seek_to_beginning(*remaining)
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for messages in batch.values():
                for message in messages:
                    record = orjson.loads(message.value)
                    records[(record["request"], record["table"])] = record
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return records
    finally:
        await consumer.stop()


class ChunkProgress:
    """A job's published chunks until Kafka has their events and their progress is recorded, in key
    order, by a task of its own while the job reads and publishes the next chunks: one progress
    record covers every chunk confirmed since the last, so records keep up however long Kafka takes
    to answer each."""

    def __init__(self, snapshots: Snapshots, job: Job):
        self.snapshots = snapshots
        self.job = job
        self.waiting: deque[tuple[Chunk, Any]] = deque()  # (chunk, the transaction holding its events)
        self.finishing = False  # every chunk of the job is published: the last record says done
        self._task: asyncio.Task | None = None
        self._recorded = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self.waiting)

    def add(self, chunk: Chunk, txn: Any) -> None:
        self._raise_failure()
        self.waiting.append((chunk, txn))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._record_confirmed())

    async def recorded_some(self) -> None:
        """Until a record has been written since the call (or nothing waits any more)."""
        if self._task is not None and not self._task.done():
            self._recorded.clear()
            recorded = asyncio.ensure_future(self._recorded.wait())
            try:
                await asyncio.wait([self._task, recorded], return_when=asyncio.FIRST_COMPLETED)
            finally:
                recorded.cancel()
        self._raise_failure()

    async def finish(self) -> None:
        """Every chunk is published: until all of them are recorded, the last record saying done."""
        self.finishing = True
        if self._task is not None:
            await self._task
        if not self.job.done:
            self.job.done = True
            await self.snapshots._record(self.job)
            self.snapshots._display.update(self.job)

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _raise_failure(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled() and self._task.exception():
            raise self._task.exception()  # type: ignore[misc]

    async def _record_confirmed(self) -> None:
        snapshots, job, waiting = self.snapshots, self.job, self.waiting
        while waiting:
            while not snapshots.confirmed(waiting[0][1]):  # Kafka has the chunk's events and everything before
                await asyncio.sleep(0.02)
            while waiting and snapshots.confirmed(waiting[0][1]):
                chunk, _ = waiting.popleft()
                assert chunk.read is not None
                job.rows += chunk.emitted
                job.after_key = chunk.read.last_key if chunk.read.last_key is not None else job.after_key
            job.done = self.finishing and not waiting
            await snapshots._record(job)
            failpoints.reached("snapshot.chunk_recorded")
            snapshots._display.update(job)
            self._recorded.set()
