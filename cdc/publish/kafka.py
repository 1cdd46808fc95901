"""Publishing to Kafka with aiokafka: topics, and a producer whose acknowledgements drive checkpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from cdc.config import KafkaConfig
from cdc.errors import PublishError

log = logging.getLogger(__name__)


async def ensure_topics(config: KafkaConfig, topics: Iterable[str]) -> dict[str, int]:
    """Create the topics that do not exist yet; return every topic's partition count.

    A table's events must stay in one partition (truncates are ordered against row changes), so a
    pre-existing topic with another partition count is refused rather than used.
    """
    wanted = sorted(set(topics))
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap_servers, client_id="cdc-admin")
    await admin.start()
    try:
        missing = sorted(set(wanted) - set(await admin.list_topics()))
        if missing:
            log.info("creating topics %s", ", ".join(missing))
            new = [NewTopic(t, num_partitions=config.partitions, replication_factor=config.replication_factor) for t in missing]
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


class Publisher:
    """An aiokafka producer with acks=all. `send` returns the delivery future; the caller tracks it."""

    def __init__(self, config: KafkaConfig, client_id: str):
        self.config = config
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        config = self.config
        self._producer = AIOKafkaProducer(
            bootstrap_servers=config.bootstrap_servers,
            client_id=self.client_id,
            acks="all",
            linger_ms=config.linger_ms,
            max_batch_size=min(config.max_batch_bytes, 16 * 1024 * 1024),
            max_request_size=max(config.max_batch_bytes, 1024 * 1024),
            # Idempotence keeps a partition's batches in order even when one fails and is retried;
            # brokers without idempotent producers need `kafka.idempotence: false` in the YAML.
            enable_idempotence=config.idempotence,
        )
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self.stop()
            if config.idempotence:
                raise PublishError(
                    f"Kafka at {config.bootstrap_servers} refused an idempotent producer ({exc!r}); a broker "
                    "without idempotent producers needs `idempotence: false` under `kafka:` in the pipeline YAML"
                ) from None
            raise

    async def send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]],
        partition: int | None = None,
    ) -> asyncio.Future:
        return await self._producer.send(topic, value=value, key=key, headers=headers, partition=partition)

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def flush(self) -> None:
        if self._producer is not None:
            await self._producer.flush()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
