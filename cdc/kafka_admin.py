"""Kafka topics as both the connector and the sink see them: creation, description, offsets.

One place for the admin side of Kafka, so the sink does not depend on the connector's publisher.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from cdc.config import KafkaConfig
from cdc.errors import PublishError

log = logging.getLogger(__name__)


async def ensure_topics(config: KafkaConfig, topics: Iterable[str], *, compact: bool = False) -> dict[str, int]:
    """Create the topics that do not exist yet; return every topic's partition count.

    A table's events must stay in one partition (truncates are ordered against row changes), so a
    pre-existing topic with another partition count is refused rather than used.
    """
    wanted = sorted(set(topics))
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap_servers, client_id="cdc-admin",
        request_timeout_ms=config.request_timeout_ms,  # also bounds connecting
    )
    await admin.start()
    try:
        missing = sorted(set(wanted) - set(await admin.list_topics()))
        if missing:
            log.info("creating topics %s", ", ".join(missing))
            # compact: a topic of records keyed by what they describe, of which only the last counts
            configs = {"cleanup.policy": "compact"} if compact else {}
            new = [NewTopic(t, num_partitions=config.partitions, replication_factor=config.replication_factor,
                            topic_configs=configs) for t in missing]
            try:
                response = await admin.create_topics(new)
            except TopicAlreadyExistsError:  # created concurrently (connector and sink start together)
                response = None
            for topic, code, *rest in getattr(response, "topic_errors", []):
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise PublishError(f"cannot create topic {topic}: Kafka error code {code} {rest[0] if rest else ''}".strip())
        counts: dict[str, int] = {}
        for description in await admin.describe_topics(wanted):
            topic = description["topic"]
            if description["error_code"] != 0 or not description["partitions"]:
                raise PublishError(f"topic {topic} is not available (Kafka error code {description['error_code']})")
            counts[topic] = len(description["partitions"])
            if counts[topic] != config.partitions:
                raise PublishError(
                    f"topic {topic} has {counts[topic]} partitions; cdc needs {config.partitions} "
                    "(one per table topic, so truncates stay in order with row changes)"
                )
        return counts
    finally:
        await admin.close()


async def end_offsets(config: KafkaConfig, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """End offset of every partition of those of `topics` that exist (a topic that does not exist has
    no entry). Connecting is also the check that Kafka is reachable at all."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.bootstrap_servers, client_id="cdc-admin", enable_auto_commit=False,
        request_timeout_ms=config.request_timeout_ms,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise PublishError(f"Kafka at {config.bootstrap_servers} is not reachable: {exc}") from None
    try:
        existing = set(await consumer.topics())
        partitions = [
            TopicPartition(t, p) for t in sorted(set(topics) & existing) for p in consumer.partitions_for_topic(t) or ()
        ]
        ends = await consumer.end_offsets(partitions) if partitions else {}
        return {(tp.topic, tp.partition): end for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def partition_bounds(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
) -> dict[TopicPartition, tuple[int, int]]:
    """(first retained offset, end offset) per partition; the end is the offset the next record gets."""
    if not partitions:
        return {}
    first = await consumer.beginning_offsets(partitions)
    end = await consumer.end_offsets(partitions)
    return {tp: (first[tp], end[tp]) for tp in partitions}


async def compacted_topics(config: KafkaConfig, topics: list[str]) -> set[str]:
    """Those of `topics` whose cleanup.policy includes compact (only the latest record per key is
    kept): they need a tombstone after each delete and no record without a key."""
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap_servers, request_timeout_ms=config.request_timeout_ms)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    except KafkaError as exc:  # a broker without DescribeConfigs: say so rather than guess silently
        log.warning("cannot read the topics' cleanup.policy (%s); taking them as not compacted", exc)
        return set()
    finally:
        await admin.close()
    compacted = set()
    for response in responses:
        for resource in response.resources:
            name, entries = resource[3], resource[4]
            if any(entry[0] == "cleanup.policy" and entry[1] and "compact" in entry[1] for entry in entries):
                compacted.add(name)
    return compacted
