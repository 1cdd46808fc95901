"""Publishing to Kafka with aiokafka: topics, and a producer whose acknowledgements drive checkpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from cdc.config import KafkaConfig

log = logging.getLogger(__name__)


async def ensure_topics(config: KafkaConfig, topics: Iterable[str]) -> None:
    """Create the topics that do not exist yet (partitions and replication factor from the YAML)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap_servers, client_id="cdc-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = sorted(set(topics) - existing)
        if not missing:
            return
        log.info("creating topics %s", ", ".join(missing))
        new = [NewTopic(t, num_partitions=config.partitions, replication_factor=config.replication_factor) for t in missing]
        try:
            response = await admin.create_topics(new)
        except TopicAlreadyExistsError:
            return
        for topic, code, *rest in getattr(response, "topic_errors", []):
            if code not in (0, TopicAlreadyExistsError.errno):
                raise KafkaError(f"cannot create topic {topic}: error code {code} {rest[0] if rest else ''}".strip())
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
            # No idempotent producer: not every Kafka protocol broker supports it, and the sink's
            # position check already absorbs the duplicates a retry can cause.
            enable_idempotence=False,
        )
        await self._producer.start()

    async def send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]],
        partition: int | None = None,
    ) -> asyncio.Future:
        return await self._producer.send(topic, value=value, key=key, headers=headers, partition=partition)

    async def partitions(self, topic: str) -> list[int]:
        return sorted(await self._producer.partitions_for(topic))

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
