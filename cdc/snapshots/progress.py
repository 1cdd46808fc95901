"""Snapshot progress records: the Kafka topic ``{pipeline}.snapshots`` (compacted, keyed by request
and table), written by :class:`cdc.snapshots.jobs.Snapshots` once a chunk is confirmed, read back at
start (resuming jobs) and by ``cdc status`` / ``cdc snapshot``."""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import PipelineConfig
from cdc.publish.admin import partition_counts


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
