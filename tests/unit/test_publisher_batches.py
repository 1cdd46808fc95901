"""The publisher's record batches: events appended without waiting land in Kafka's order, each
counted against its transaction, and a busy stream never waits for Kafka to take a batch. Each test
runs with the batches the compiled core builds and with aiokafka's builder (no core)."""

import asyncio
from collections import deque

import pytest

from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from cdc import native
from cdc.config.kafka import KafkaConfig
from cdc.connector.confirm import AckTracker
from cdc.publish import kafka
from cdc.publish.kafka import Publisher

TP = ("pipe.public.orders", 0)


@pytest.fixture(autouse=True, params=["compiled core", "aiokafka"])
def batches(request, monkeypatch):
    if request.param == "compiled core" and native.core is None:
        pytest.skip(f"the compiled core is not built: {native.describe()}")
    monkeypatch.setattr(kafka, "native_batches", lambda: request.param == "compiled core")


class Producer:
    """What the Publisher uses of aiokafka's producer: record batches, and a queue of one batch per
    partition until a request takes it (like aiokafka's accumulator). Kafka answers when told to."""

    def __init__(self, loop, batch_bytes: int):
        self.loop = loop
        self.batch_bytes = batch_bytes
        self.sent: list[tuple[tuple[str, int], bytes, object]] = []  # (partition, batch bytes, delivery future)
        self._message_accumulator = type("Accumulator", (), {"_batches": {}})()

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_bytes, 0, is_transactional=False)

    async def send_batch(self, builder: BatchBuilder, topic: str, *, partition: int):
        future = self.loop.create_future()
        self.sent.append(((topic, partition), bytes(builder._build()), future))
        self._message_accumulator._batches.setdefault((topic, partition), deque()).append(future)
        return future

    def request_takes_queued(self) -> None:
        self._message_accumulator._batches.clear()

    def answer_all(self, offsets_from: int = 0) -> None:
        offset = offsets_from
        for _, data, future in self.sent:
            if not future.done():
                future.set_result(type("Metadata", (), {"offset": offset})())
                offset += DefaultRecordBatch(data).next_offset


def linger_passes(publisher: Publisher) -> None:
    """As if linger_ms had passed since the open batches opened (no sleeping in tests)."""
    for batch in publisher._open.values():
        batch.opened_at -= 1.0
    publisher._next_linger_check = 0.0


def values_of(data: bytes) -> list[bytes]:
    return [record.value for record in DefaultRecordBatch(data)]


async def started(publisher: Publisher, batch_bytes: int) -> Producer:
    producer = Producer(asyncio.get_running_loop(), batch_bytes)
    publisher._producer = producer  # type: ignore[assignment]
    publisher._batch_size = batch_bytes  # (the producer's max_batch_size)
    return producer


async def test_events_appended_without_waiting_reach_kafka_in_order_and_confirm_only_once_all_are_answered():
    tracker = AckTracker(0)
    publisher = Publisher(KafkaConfig(bootstrap_servers="kafka:9092"), "test", tracker.delivered)
    producer = await started(publisher, batch_bytes=2048)  # a few events per batch
    txn = tracker.begin()
    values = [b"event %03d " % i + b"x" * 200 for i in range(40)]
    for value in values:
        if not publisher.append(TP[0], TP[1], b"k", value, [], txn):
            await publisher.publish(TP[0], TP[1], b"k", value, [], txn)  # full: ships it, starts the next
        tracker.sent(txn)
    tracker.commit(txn, 500)
    await publisher.send_open()
    assert len(producer.sent) > 1  # the batches filled up
    assert [v for _, data, _ in producer.sent for v in values_of(data)] == values
    assert tracker.confirmed_lsn == 0  # nothing answered yet
    producer.answer_all()
    await asyncio.sleep(0)  # delivery callbacks
    assert tracker.confirmed_lsn == 500


async def test_a_busy_stream_keeps_filling_a_batch_while_the_producer_still_queues_the_one_before():
    publisher = Publisher(KafkaConfig(bootstrap_servers="kafka:9092", linger_ms=1), "test", lambda owners, error: None)
    producer = await started(publisher, batch_bytes=1024 * 1024)
    owner = object()
    await publisher.publish(TP[0], TP[1], None, b"first", [], owner)
    await publisher.send_open()  # the stream paused: everything goes
    assert len(producer.sent) == 1
    for value in (b"second", b"third"):
        await publisher.publish(TP[0], TP[1], None, value, [], owner)
    linger_passes(publisher)
    await publisher.send_open(older_than_linger=True)
    assert len(producer.sent) == 1  # handing it over now would wait for Kafka: it stays open
    producer.request_takes_queued()
    await publisher.publish(TP[0], TP[1], None, b"fourth", [], owner)
    linger_passes(publisher)
    await publisher.send_open(older_than_linger=True)
    assert [values_of(data) for _, data, _ in producer.sent] == [[b"first"], [b"second", b"third", b"fourth"]]
