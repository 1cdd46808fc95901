"""The Publisher's record batches in a real Apache Kafka: an idempotent producer's batches, built by
the compiled core (cdc.publish.batches) or by aiokafka, are taken by the broker (their checksums,
producer ids and sequence numbers) and read back by a consumer as published, in order."""

from __future__ import annotations

import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc import native
from cdc.config.kafka import KafkaConfig
from cdc.publish import kafka
from cdc.publish.kafka import Publisher

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("builder", ["compiled core", "aiokafka"])
async def test_batches_of_an_idempotent_producer_read_back_from_kafka_as_published(broker, monkeypatch, builder):
    if builder == "compiled core":
        assert native.core is not None, native.describe()
    monkeypatch.setattr(kafka, "native_batches", lambda: builder == "compiled core")
    topic = f"batches_{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []
    publisher = Publisher(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, max_batch_bytes=64 * 1024),
                          "test", lambda owners, error: errors.append(error) if error else None)
    await publisher.start()
    headers = [("cdc.schema.id", b"3f2a"), ("cdc.origin", b'{"system_id":"1"}')]
    records = [(b'{"id":%d}' % i, b'{"op":"c","after":{"id":%d,"note":"%s"}}' % (i, b"x" * (i % 300)))
               for i in range(5000)]
    started_ms = int(time.time() * 1000)
    try:
        owner, done = object(), 0
        while done < len(records):  # runs of them, as a snapshot chunk publishes them
            done += publisher.append_many(topic, 0, records, done, headers, owner)
            if done < len(records):
                await publisher.publish(topic, 0, *records[done], headers, owner)  # full: ship it, go on
                done += 1
        await publisher.publish(topic, 0, None, b"alone", [], owner)  # one record, no key, no headers
        assert await publisher.flush(timeout_s=30)
    finally:
        await publisher.stop()
    assert errors == []
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        read = []
        deadline = time.monotonic() + 30
        while len(read) < len(records) + 1 and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=1000)).values():
                read.extend(messages)
    finally:
        await consumer.stop()
    assert [(m.key, m.value) for m in read] == [*records, (None, b"alone")]
    assert [m.offset for m in read] == list(range(len(records) + 1))
    assert all(list(m.headers) == headers for m in read[:-1]) and list(read[-1].headers) == []
    assert all(started_ms <= m.timestamp <= int(time.time() * 1000) for m in read)
