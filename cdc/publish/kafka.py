"""Publishing to Kafka with aiokafka: topics, and a producer whose acknowledgements drive checkpoints."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from cdc.config import KafkaConfig
from cdc.errors import EventRefusedError, PublishError, WouldLoseDataError
from cdc.publish.batches import NativeBatch, native_batches

log = logging.getLogger(__name__)


WAITING_TICK_S = 1.0
DeliveryCallback = Callable[[dict[Any, int], BaseException | None], None]


class _OpenBatch:
    """Events for one topic partition not yet handed to the producer, and whose they are."""

    __slots__ = ("builder", "owners", "opened_at", "size")

    def __init__(self, builder: Any):
        self.builder = builder
        self.owners: dict[Any, int] = {}  # owner (the connector's transaction) -> events in this batch
        self.opened_at = time.monotonic()
        self.size = 0  # bytes of its records' keys, values and headers


class Publisher:
    """An aiokafka producer with acks=all, fed whole record batches.

    Building the batches ourselves (one per topic partition) costs one future and one callback per
    batch instead of per event; with the compiled core, a run of events is one call into the batch
    (cdc.publish.batches). `publish` appends; a full batch is sent at once, the others when
    the caller says the stream has paused (`send_open`) or when they are older than `linger_ms`.
    Each delivered (or failed) batch reports its owners' event counts to `on_delivery`.

    After the first failure nothing more is sent: a later batch landing after a lost one would
    leave a hole that the sink's position check could never fill after the connector replays.
    """

    def __init__(self, config: KafkaConfig, client_id: str, on_delivery: DeliveryCallback,
                 stopping: Callable[[], bool] = lambda: False,
                 while_waiting: Callable[[], Awaitable[None]] | None = None,
                 on_acknowledged: Callable[[str, int, int, float], None] | None = None):
        self.config = config
        self.stopping = stopping  # a stop was asked for: give up waiting for a broker that is away
        # Called about every second while a send or a flush waits for Kafka (the connector keeps its
        # replication connection alive with it).
        self.while_waiting = while_waiting
        self.client_id = client_id
        self.on_delivery = on_delivery
        # (topic, records, bytes, seconds since the batch opened) per acknowledged batch: metrics
        self.on_acknowledged = on_acknowledged
        # A floor of 1 ms: linger 0 would ship one event per batch while a backlog drains.
        self._linger_s = max(config.linger_ms, 1) / 1000
        self._next_linger_check = 0.0  # no open batch can be older than linger before this time
        # Largest event the producer may send: one record alone in a request, less batch overhead.
        self.max_event_bytes = max(config.max_batch_bytes, 1024 * 1024) - 512
        self._producer: AIOKafkaProducer | None = None
        self._batch_size = min(config.max_batch_bytes, 16 * 1024 * 1024)
        # Batches built by the compiled core (cdc.publish.batches), else by aiokafka's builder.
        self._native_batches = native_batches()
        self._open: dict[tuple[str, int], _OpenBatch] = {}
        self.failure: BaseException | None = None
        # Next offset each partition must give our next batch: Kafka offsets only grow, so a lower
        # one means the topic was deleted and re-created (or the broker lost its data) under us.
        self.next_offsets: dict[tuple[str, int], int] = {}
        # Bytes of each headers list seen, by identity: the connector builds one list per relation
        # version and passes it with every event of it, so its size is summed once, not per event.
        self._header_bytes: dict[int, tuple[list[tuple[str, bytes]], int]] = {}

    async def start(self) -> None:
        config = self.config
        self._producer = AIOKafkaProducer(
            **config.client_options(),  # brokers, timeout (also bounds connecting), TLS/SASL
            client_id=self.client_id,
            acks="all",
            linger_ms=config.linger_ms,
            max_batch_size=self._batch_size,
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

    def linger_due(self, now: float) -> bool:
        """Whether an open batch may be older than linger_ms at `now` (time.monotonic()): then
        `send_open(older_than_linger=True)`. A cheap test for every frame of a busy stream."""
        return now >= self._next_linger_check and bool(self._open)

    def append(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]],
        owner: Any,
    ) -> bool:
        """Add an event to its partition's open batch without waiting: False when that batch is full
        (then `publish` the event, which ships the batch and may wait for room)."""
        if self.failure is not None:
            raise PublishError(f"Kafka did not acknowledge an earlier event: {self.failure!r}") from self.failure
        size = len(value or b"") + (len(key) if key else 0) + self._headers_size(headers)
        if size > self.max_event_bytes:
            # Refused before anything of it is sent, so no later event can overtake it.
            raise EventRefusedError(
                f"an event for topic {topic} is {size} bytes, more than the {self.max_event_bytes} a request may "
                "carry: raise kafka.max_batch_bytes (and the broker's message.max.bytes)"
            )
        batch = self._open.get((topic, partition)) or self._new_batch((topic, partition))
        if self._native_batches:
            if not batch.builder.add(key, value, headers):
                return False
        elif batch.builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            return False
        owners = batch.owners
        owners[owner] = owners.get(owner, 0) + 1
        batch.size += size
        return True

    def append_many(self, topic: str, partition: int, records: list[tuple[bytes, bytes]], start: int,
                    headers: list[tuple[str, bytes]], owner: Any) -> int:
        """`append` for records[start:] (keys and values), one call for a run of them: how many it
        added before the partition's open batch was full (`publish` the next one)."""
        if self.failure is not None:
            raise PublishError(f"Kafka did not acknowledge an earlier event: {self.failure!r}") from self.failure
        batch = self._open.get((topic, partition)) or self._new_batch((topic, partition))
        header_bytes, most = self._headers_size(headers), self.max_event_bytes
        # A record heavier than `most` stops the run: `publish` refuses it, as `append` would.
        if self._native_batches:
            added, size = batch.builder.add_many(records, start, headers, header_bytes, most)
        else:
            append, added, size = batch.builder.append, 0, 0
            for key, value in itertools.islice(records, start, None):
                record_size = len(value or b"") + (len(key) if key else 0) + header_bytes
                if record_size > most or append(timestamp=None, key=key, value=value, headers=headers) is None:
                    break
                added += 1
                size += record_size
        if added:
            batch.owners[owner] = batch.owners.get(owner, 0) + added
            batch.size += size
        return added

    async def publish(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]],
        owner: Any,
    ) -> None:
        if self.append(topic, partition, key, value, headers, owner):
            return
        await self._send((topic, partition))  # full: ship it and start the next one
        if not self.append(topic, partition, key, value, headers, owner):
            raise PublishError(f"an event for topic {topic} does not fit in an empty record batch")

    def _new_batch(self, tp: tuple[str, int]) -> _OpenBatch:
        assert self._producer is not None
        builder = NativeBatch(self._batch_size) if self._native_batches else self._producer.create_batch()
        batch = self._open[tp] = _OpenBatch(builder)
        return batch

    def _headers_size(self, headers: list[tuple[str, bytes]]) -> int:
        known = self._header_bytes.get(id(headers))
        if known is not None and known[0] is headers:
            return known[1]
        size = sum(len(k) + len(v) for k, v in headers)
        if len(self._header_bytes) >= 1024:  # relation versions come and go; a bound all the same
            self._header_bytes.clear()
        self._header_bytes[id(headers)] = (headers, size)
        return size

    async def send_open(self, *, older_than_linger: bool = False) -> None:
        """Hand the open batches to the producer (only those older than linger_ms, if asked)."""
        if not self._open or self.failure is not None:
            return
        now = time.monotonic()
        if older_than_linger and now < self._next_linger_check:
            return
        self._next_linger_check = now + self._linger_s
        deadline = now - self._linger_s
        for tp in [tp for tp, b in self._open.items() if not older_than_linger or b.opened_at <= deadline]:
            if older_than_linger and self._producer_holds_unsent(tp):
                # Handing it over now would make the stream wait (a round trip to Kafka) for the
                # producer to take the batch before; keep filling this one meanwhile.
                continue
            await self._send(tp)

    def _producer_holds_unsent(self, tp: tuple[str, int]) -> bool:
        """Whether the producer still holds a batch for `tp` that is in no request yet: it takes one
        only when the partition's request before is answered, and until it has, send_batch waits.
        aiokafka has no public call for this; its accumulator's queue per partition is it."""
        queued = getattr(getattr(self._producer, "_message_accumulator", None), "_batches", None)
        return bool(queued and queued.get(tp))  # keyed by TopicPartition, a named (topic, partition)

    async def _send(self, tp: tuple[str, int]) -> None:
        assert self._producer is not None
        batch = self._open.pop(tp, None)
        if batch is None or self.failure is not None:
            # A delivery failure while an earlier batch waited dropped the open ones: their events
            # are re-read from the slot when the connector starts over.
            return
        batch.builder.close()
        owners = batch.owners
        waited_since = None
        while True:
            gave_up = None
            try:
                future = await self._while_waiting(self._producer.send_batch(batch.builder, tp[0], partition=tp[1]))
                break
            except KafkaTimeoutError as exc:
                # The partition's previous batch is still unacknowledged after request_timeout_ms (the
                # broker is slow, restarting or electing a leader). An idempotent producer retries it
                # until it lands, exactly once; this batch was not queued, so waiting keeps the order
                # and loses nothing. Without idempotence, that earlier batch has failed: stop here.
                if not self.config.idempotence or self.stopping():
                    self._delivered(owners, exc)
                    return
                if waited_since is not None and time.monotonic() - waited_since >= self.config.retry.give_up_after_s:
                    # Chained to no driver error: final for the connector's retries (cdc.retry).
                    gave_up = PublishError(
                        f"Kafka has not acknowledged topic {tp[0]}[{tp[1]}] for {time.monotonic() - waited_since:.0f} s: "
                        f"giving up (kafka.retry.give_up_after_s is {self.config.retry.give_up_after_s:.0f})")
                elif waited_since is None:
                    waited_since = time.monotonic()
                    log.warning("Kafka has not acknowledged topic %s[%d] for %.0f s; waiting (nothing after it is "
                                "confirmed to PostgreSQL)", tp[0], tp[1], self.config.request_timeout_ms / 1000)
            except KafkaError as exc:
                self._delivered(owners, exc)
                return
            if gave_up is not None:
                self._delivered(owners, gave_up)
                return
        if waited_since is not None:
            log.warning("Kafka accepts topic %s[%d] again after %.0f s more", tp[0], tp[1], time.monotonic() - waited_since)
        count = sum(owners.values())
        acked = (lambda: self.on_acknowledged(tp[0], count, batch.size, time.monotonic() - batch.opened_at)
                 ) if self.on_acknowledged is not None else None
        future.add_done_callback(lambda f: self._delivered(owners, _failure(f) or self._check_offset(tp, f, count),
                                                           acked))

    def _check_offset(self, tp: tuple[str, int], future: asyncio.Future, count: int) -> BaseException | None:
        metadata = future.result()
        if metadata is None or metadata.offset is None or metadata.offset < 0:
            return None  # no offset reported (acks=0): nothing to check
        expected = self.next_offsets.get(tp, 0)
        self.next_offsets[tp] = max(expected, metadata.offset + count)
        if metadata.offset >= expected:
            return None
        return WouldLoseDataError(
            f"topic {tp[0]} partition {tp[1]} gave our events offset {metadata.offset}, but it already held "
            f"offsets up to {expected - 1}: the topic was deleted and re-created, or the broker lost its data. "
            "Events published before are gone from Kafka; sinks that had not applied them all stop with "
            "'Kafka lost events' (README: When Kafka lost events). Restart the connector to go on publishing "
            "into the topic as it is now (delete it first if the broker auto-created it with other settings)"
        )

    def _delivered(self, owners: dict[Any, int], error: BaseException | None,
                   acknowledged: Callable[[], None] | None = None) -> None:
        if error is not None and self.failure is None:
            self.failure = error
            self._open.clear()
            self._fail_queued(error)
        elif error is None and acknowledged is not None:
            acknowledged()
        self.on_delivery(owners, error)

    def _fail_queued(self, error: BaseException) -> None:
        """Fail every batch the producer still holds instead of letting it send (or, at stop, flush)
        them: without idempotence a batch queued behind a failed one for the same partition would
        land after a gap. aiokafka has no public call for this; its accumulator's fail_all is it."""
        accumulator = getattr(self._producer, "_message_accumulator", None)
        if accumulator is not None:
            accumulator.fail_all(error if isinstance(error, Exception) else PublishError(repr(error)))

    async def send_and_wait(self, topic: str, key: bytes, value: bytes,
                            headers: list[tuple[str, bytes]] | None = None) -> None:
        """One record outside the event batches (snapshot progress, a schema change), acknowledged
        before returning."""
        assert self._producer is not None
        if self.failure is not None:
            raise PublishError(f"Kafka did not acknowledge an earlier event: {self.failure!r}") from self.failure
        try:
            await self._producer.send_and_wait(topic, value, key=key, headers=headers)
        except KafkaError as exc:
            raise PublishError(f"Kafka did not acknowledge a record for {topic}: {exc!r}") from None

    async def flush(self, timeout_s: float) -> bool:
        """Send everything and wait until Kafka answered for all of it; False on time-out."""
        if self._producer is None:
            return True
        await self.send_open()
        try:
            await asyncio.wait_for(self._while_waiting(self._producer.flush()), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def _while_waiting(self, awaitable: Awaitable[Any]) -> Any:
        """Await a producer call, calling `while_waiting` about every second until it is done."""
        if self.while_waiting is None:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WAITING_TICK_S)
                if done:
                    return task.result()
                await self.while_waiting()
        finally:
            if not task.done():  # cancelled, or while_waiting failed (the source went away too)
                task.cancel()

    async def stop(self, *, abandon: bool = False, timeout_s: float = 10.0) -> None:
        """Close the producer. `abandon`: what is still queued is not sent (a flush timed out, e.g.
        the broker is down); it will be re-read from the slot, whose position it never confirmed."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if abandon and self.failure is None:
            self._fail_queued(PublishError("the connector stopped before Kafka acknowledged this batch"))
        try:
            await asyncio.wait_for(producer.stop(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("the Kafka producer did not close within %.0f s; leaving it", timeout_s)


def _failure(future: asyncio.Future) -> BaseException | None:
    return asyncio.CancelledError() if future.cancelled() else future.exception()
