"""Publishing to Kafka with aiokafka: topics, and a producer whose acknowledgements drive checkpoints."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

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


DeliveryCallback = Callable[[dict[Any, int], BaseException | None], None]


class _OpenBatch:
    """Events for one topic partition not yet handed to the producer, and whose they are."""

    __slots__ = ("builder", "owners", "opened_at")

    def __init__(self, builder: Any):
        self.builder = builder
        self.owners: dict[Any, int] = {}  # owner (the connector's transaction) -> events in this batch
        self.opened_at = time.monotonic()


class Publisher:
    """An aiokafka producer with acks=all, fed whole record batches.

    Building the batches ourselves (one per topic partition) costs one future and one callback per
    batch instead of per event. `publish` appends; a full batch is sent at once, the others when
    the caller says the stream has paused (`send_open`) or when they are older than `linger_ms`.
    Each delivered (or failed) batch reports its owners' event counts to `on_delivery`.
    """

    def __init__(self, config: KafkaConfig, client_id: str, on_delivery: DeliveryCallback):
        self.config = config
        self.client_id = client_id
        self.on_delivery = on_delivery
        self._linger_s = config.linger_ms / 1000
        self._next_linger_check = 0.0  # no open batch can be older than linger before this time
        self._producer: AIOKafkaProducer | None = None
        self._open: dict[tuple[str, int], _OpenBatch] = {}

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

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def publish(
        self, topic: str, partition: int, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
        owner: Any,
    ) -> None:
        assert self._producer is not None
        tp = (topic, partition)
        batch = self._open.get(tp)
        if batch is None:
            batch = self._open[tp] = _OpenBatch(self._producer.create_batch())
        if batch.builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            await self._send(tp)  # full: ship it and start the next one
            batch = self._open[tp] = _OpenBatch(self._producer.create_batch())
            # An empty batch takes any record; one too large for the broker fails at delivery.
            batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
        batch.owners[owner] = batch.owners.get(owner, 0) + 1

    async def send_open(self, *, older_than_linger: bool = False) -> None:
        """Hand the open batches to the producer (only those older than linger_ms, if asked)."""
        if not self._open:
            return
        now = time.monotonic()
        if older_than_linger and now < self._next_linger_check:
            return
        self._next_linger_check = now + self._linger_s
        deadline = now - self._linger_s
        for tp in [tp for tp, b in self._open.items() if not older_than_linger or b.opened_at <= deadline]:
            await self._send(tp)

    async def _send(self, tp: tuple[str, int]) -> None:
        assert self._producer is not None
        batch = self._open.pop(tp)
        batch.builder.close()
        owners = batch.owners
        try:
            future = await self._producer.send_batch(batch.builder, tp[0], partition=tp[1])
        except KafkaError as exc:
            self.on_delivery(owners, exc)
            return
        future.add_done_callback(lambda f: self.on_delivery(owners, _failure(f)))

    async def flush(self) -> None:
        """Send everything and wait until Kafka answered for all of it."""
        if self._producer is not None:
            await self.send_open()
            await self._producer.flush()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def _failure(future: asyncio.Future) -> BaseException | None:
    return asyncio.CancelledError() if future.cancelled() else future.exception()
