"""The compiled core's Kafka record batches (RecordBatch; cdc.publish.batches) against aiokafka's own
builder, the one the Publisher used before and still uses without the core: for the same records,
headers, timestamps, batch size and producer state, the same records taken and the same bytes."""

from __future__ import annotations

import os
import time

import pytest
from aiokafka.producer.message_accumulator import MessageBatch
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc import native
from cdc.publish.batches import NativeBatch

core = native.built
pytestmark = pytest.mark.skipif(core is None, reason=f"the compiled core is not built: {native.describe()}")
QUICK = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NOW = 1_765_000_000_000  # ms
maybe_bytes = st.one_of(st.none(), st.binary(max_size=300), st.binary(min_size=1000, max_size=3000))
header = st.tuples(st.sampled_from(["cdc.schema.id", "cdc.origin", "é", "x" * 200, ""]), maybe_bytes)
record = st.tuples(maybe_bytes, maybe_bytes, st.lists(header, max_size=3),
                   st.integers(min_value=-5, max_value=2**40))  # timestamp offset from NOW
producer_state = st.sampled_from([(-1, -1, 0), (4_000_000_123, 7, 123_456), (0, 0, 2**31 - 1)])


def aiokafka_builder(batch_size: int, transactional: bool = False) -> DefaultRecordBatchBuilder:
    return DefaultRecordBatchBuilder(2, 0, is_transactional=transactional, producer_id=-1, producer_epoch=-1,
                                     base_sequence=0, batch_size=batch_size)


@QUICK
@given(records=st.lists(record, max_size=40), batch_size=st.sampled_from([64, 700, 4096, 1 << 20]),
       state=producer_state, transactional=st.booleans())
def test_a_batch_takes_the_records_aiokafka_takes_and_is_the_same_bytes(records, batch_size, state, transactional):
    theirs, ours = aiokafka_builder(batch_size, transactional), core.RecordBatch(batch_size)
    for offset, (key, value, headers, delta) in enumerate(records):
        took = theirs.append(offset, NOW + delta, key, value, headers) is not None
        assert ours.append(key, value, headers, NOW + delta) == took  # the first always; then while it fits
        if not took:
            break
    theirs.set_producer_state(*state)
    assert ours.build(*state, transactional) == bytes(theirs.build())


@QUICK
@given(records=st.lists(st.tuples(maybe_bytes, maybe_bytes), max_size=60), headers=st.lists(header, max_size=2),
       batch_size=st.sampled_from([700, 4096, 1 << 20]), most=st.sampled_from([100, 1000, 1 << 20]),
       start=st.integers(min_value=0, max_value=5))
def test_a_run_appended_in_one_call_is_the_records_appended_one_by_one_up_to_the_first_that_does_not_fit_or_weighs_too_much(
        records, headers, batch_size, most, start):
    header_bytes = sum(len(k) + len(v or b"") for k, v in headers)
    one_by_one, at_once = core.RecordBatch(batch_size), core.RecordBatch(batch_size)
    taken = weight = 0
    for key, value in records[start:]:
        record_weight = len(key or b"") + len(value or b"") + header_bytes
        if record_weight > most or not one_by_one.append(key, value, headers, NOW):
            break
        taken += 1
        weight += record_weight
    assert at_once.append_many(records, start, headers, header_bytes, most, NOW) == (taken, weight)
    assert at_once.build(-1, -1, 0, False) == one_by_one.build(-1, -1, 0, False)


def test_a_built_batch_reads_back_as_kafka_reads_it():
    batch = core.RecordBatch(1 << 20)
    headers = [("cdc.schema.id", b"abc"), ("empty", None)]
    assert batch.append(b'{"id": 1}', b'{"op": "c"}', headers, NOW)
    assert batch.append(None, None, [], NOW + 2)  # a tombstone without a key
    assert batch.append_many([(b"k3", b"v3"), (b"k4", b"v4")], 0, headers, 16, 1000, NOW + 1) == (2, 8 + 2 * 16)
    data = batch.build(42, 3, 9, False)
    read = DefaultRecordBatch(data)
    assert read.validate_crc()
    assert (read.producer_id, read.producer_epoch, read.base_sequence) == (42, 3, 9)
    assert (read.first_timestamp, read.max_timestamp, read.next_offset) == (NOW, NOW + 2, 4)
    assert [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in read] == [
        (0, NOW, b'{"id": 1}', b'{"op": "c"}', headers),
        (1, NOW + 2, None, None, []),
        (2, NOW + 1, b"k3", b"v3", headers),
        (3, NOW + 1, b"k4", b"v4", headers),
    ]
    assert batch.size == len(data) and batch.record_count == 4
    assert not batch.append(b"k", b"v", [], NOW)  # built: it takes nothing more


def test_headers_are_encoded_per_headers_object_and_records_without_a_timestamp_are_stamped_now():
    """A stream passes one headers list with every event of a table; another list is another
    encoding, even right after it."""
    batch = core.RecordBatch(1 << 20)
    first, second = [("h", b"1")], [("h", b"2"), ("i", None)]
    before_ms = int(time.time() * 1000)
    for headers in (first, first, second, first, []):
        assert batch.append(b"k", b"v", headers)
    assert batch.append_many([(b"k", b"v")] * 2, 0, second, 4, 100) == (2, 2 * (1 + 1 + 4))
    after_ms = int(time.time() * 1000)
    read = list(DefaultRecordBatch(batch.build(-1, -1, 0, False)))
    assert [r.headers for r in read] == [first, first, second, first, [], second, second]
    assert all(before_ms <= r.timestamp <= after_ms for r in read)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 65, 4096, 100_003])
def test_the_checksum_is_kafkas_crc32c_with_and_without_the_cpu_instruction(size):
    data = os.urandom(size)
    assert core.crc32c_of(data, False) == core.crc32c_of(data, True) == calc_crc32c(data)


def test_a_header_that_is_not_a_name_and_bytes_is_refused_with_a_message():
    batch = core.RecordBatch(1 << 20)
    with pytest.raises(ValueError, match="a header is a"):
        batch.append(b"k", b"v", [(b"not a str", b"v")], NOW)
    with pytest.raises(TypeError):
        batch.append(b"k", b"v", [("name", "not bytes")], NOW)
    assert batch.record_count == 0


async def test_aiokafkas_producer_builds_a_native_batch_once_with_the_state_it_sets():
    """The calls aiokafka's accumulator and sender make on a batch builder (MessageBatch)."""
    builder = NativeBatch(1 << 20)
    assert builder.add(b"k", b"v", [("h", b"1")])
    assert builder.add_many([(b"k2", b"v2")], 0, [], 0, 1000) == (1, 4)
    builder.close()
    assert builder.closed() and not builder.add(b"k", b"v", [])
    assert builder.append(timestamp=None, key=b"k", value=b"v") is None  # closed: aiokafka's send() goes elsewhere
    batch = MessageBatch(TopicPartition("t", 0), builder, ttl=30, linger_time=0)
    assert batch.record_count == 2 and not batch.is_empty()
    batch.set_producer_state(producer_id=77, producer_epoch=1, base_sequence=5)
    data = batch.get_data_buffer()
    assert batch.get_data_buffer() is data  # a retry sends the same bytes
    read = DefaultRecordBatch(data)
    assert (read.producer_id, read.producer_epoch, read.base_sequence) == (77, 1, 5)
    assert [(r.key, r.value) for r in read] == [(b"k", b"v"), (b"k2", b"v2")]
    assert builder.size() == len(data)
