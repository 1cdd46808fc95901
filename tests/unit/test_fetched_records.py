"""Fetched records read by the compiled core (cdc.sink.fetched_records) against aiokafka's own reader:
for the same fetched bytes, the same records with the same attributes, the same next offset to
fetch wherever the consumer stops taking them, and the same errors for what the core leaves to
aiokafka."""

from __future__ import annotations


import pytest
from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc import native
from cdc.config.kafka import KafkaConfig
from cdc.sink import fetched_records
from cdc.sink.consume import kafka_consumer

pytestmark = pytest.mark.skipif(not fetched_records.compiled(), reason=f"the compiled core is not built: {native.describe()}")
QUICK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TP = TopicPartition("shop.public.orders", 3)
ATTRIBUTES = ("topic", "partition", "offset", "timestamp", "timestamp_type", "key", "value", "checksum",
              "serialized_key_size", "serialized_value_size", "headers")

maybe_bytes = st.one_of(st.none(), st.binary(max_size=200), st.binary(min_size=1000, max_size=2000))
header = st.tuples(st.sampled_from(["cdc.schema_id", "cdc.origin", "é", ""]), maybe_bytes)
record = st.tuples(maybe_bytes, maybe_bytes, st.lists(header, max_size=3), st.integers(min_value=0, max_value=2**40))


def batch(base_offset: int, records: list, *, compression: int = 0, transactional: bool = False,
          log_append_time: bool = False, control: bool = False, gap: int = 1) -> bytes:
    """A record batch as a broker returns it: aiokafka's builder, at `base_offset`, offsets `gap` apart
    (compaction), with the attribute bits asked for and the CRC over them."""
    builder = DefaultRecordBatchBuilder(2, compression, is_transactional=transactional, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 24)
    for i, (key, value, headers, timestamp) in enumerate(records):
        builder.append(i * gap, timestamp, key, value, headers)
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big", signed=True)
    attributes = int.from_bytes(data[21:23], "big") | (0x08 if log_append_time else 0) | (0x20 if control else 0)
    data[21:23] = attributes.to_bytes(2, "big")
    data[17:21] = calc_crc32c(bytes(data[21:])).to_bytes(4, "big")
    return bytes(data)


def read(data: bytes, fetch_offset: int, *, compiled: bool, take: int | None = None,
         isolation=fetcher.READ_UNCOMMITTED, check_crcs: bool = True):
    """(records' attributes, next offset to fetch) after taking `take` records (None: all)."""
    records_class = fetched_records.CompiledPartitionRecords if compiled else fetched_records._AIOKAFKA_RECORDS
    memory = fetched_records._KeptMemoryRecords if compiled else fetched_records._AIOKAFKA_MEMORY_RECORDS
    partition = records_class(TP, memory(data), [], fetch_offset, None, None, check_crcs, isolation)
    taken = []
    for r in partition:
        taken.append(tuple(getattr(r, name) for name in ATTRIBUTES))
        if take is not None and len(taken) == take:
            break
    return taken, partition.next_fetch_offset


def both(data: bytes, fetch_offset: int, **options):
    ours, theirs = read(data, fetch_offset, compiled=True, **options), read(data, fetch_offset, compiled=False, **options)
    assert ours == theirs
    return ours


@QUICK
@given(batches=st.lists(st.tuples(st.lists(record, min_size=1, max_size=12), st.booleans(), st.booleans(),
                                  st.integers(min_value=1, max_value=3)), min_size=1, max_size=4),
       cut=st.integers(min_value=0, max_value=40), skip=st.integers(min_value=0, max_value=5),
       take=st.one_of(st.none(), st.integers(min_value=1, max_value=30)))
def test_the_core_reads_the_records_aiokafka_reads(batches, cut, skip, take):
    data, base = b"", 100
    for records, log_append_time, control, gap in batches:
        data += batch(base, records, log_append_time=log_append_time, control=control, gap=gap)
        base += len(records) * gap
    # A fetch may end inside a batch (the broker cuts at the fetch's size); it may start past the
    # first offsets of its first batch.
    both(data[:len(data) - cut], 100 + skip, take=take)


def test_equal_headers_are_one_tuple_object():
    headers = [("cdc.schema_id", b"0123456789abcdef"), ("cdc.origin", None)]
    data = batch(0, [(b"k", b"v", headers, 1), (b"k", b"w", list(headers), 2)]) + batch(2, [(None, b"x", headers, 3)])
    records = list(fetched_records.CompiledPartitionRecords(TP, fetched_records._KeptMemoryRecords(data), [], 0, None,
                                                            None, True, fetcher.READ_UNCOMMITTED))
    assert [r.headers for r in records] == [tuple(headers)] * 3
    assert records[0].headers is records[1].headers is records[2].headers


@pytest.mark.parametrize("case", ["compressed", "read_committed", "no crc check"])
def test_what_the_core_does_not_read_is_read_by_aiokafka_the_same(case):
    records = [(b"k%d" % i, b"v" * i, [("h", b"x")], 10 + i) for i in range(5)]
    if case == "compressed":
        taken, _ = both(batch(7, records, compression=1) + batch(12, records), 7)
    elif case == "read_committed":
        taken, _ = both(batch(7, records, transactional=True), 7, isolation=fetcher.READ_COMMITTED)
    else:
        taken, _ = both(batch(7, records), 7, check_crcs=False)
    assert [t[2] for t in taken][:5] == [7, 8, 9, 10, 11]


@pytest.mark.parametrize("damage", ["crc", "record length", "header name"])
def test_a_damaged_batch_raises_aiokafka_s_error_after_the_records_before_it(damage):
    good = batch(0, [(b"a", b"1", [], 1), (b"b", b"2", [], 2)])
    bad = bytearray(batch(2, [(b"c", b"3", [("name", b"x")], 3)]))
    if damage == "crc":
        bad[-1] ^= 0xFF
    elif damage == "record length":
        bad[61] += 2  # the record's length varint says more than it holds
        bad[17:21] = calc_crc32c(bytes(bad[21:])).to_bytes(4, "big")
    else:
        at = bytes(bad).index(b"name")
        bad[at] = 0xFF  # not UTF-8
        bad[17:21] = calc_crc32c(bytes(bad[21:])).to_bytes(4, "big")
    errors = []
    for compiled in (True, False):
        records_class = fetched_records.CompiledPartitionRecords if compiled else fetched_records._AIOKAFKA_RECORDS
        memory = fetched_records._KeptMemoryRecords if compiled else fetched_records._AIOKAFKA_MEMORY_RECORDS
        taken = []
        with pytest.raises(Exception) as raised:
            for r in records_class(TP, memory(good + bytes(bad)), [], 0, None, None, True, fetcher.READ_UNCOMMITTED):
                taken.append(r.value)
        errors.append((taken, type(raised.value)))
    assert errors[0] == errors[1]
    assert errors[0][0] == [b"1", b"2"]
    if damage == "crc":
        assert errors[0][1] is CorruptRecordException


async def test_the_sink_s_consumer_reads_with_the_core():
    fetched_records.uninstall()
    try:
        consumer = kafka_consumer(KafkaConfig(bootstrap_servers="127.0.0.1:1"), "test")
        assert fetcher.PartitionRecords is fetched_records.CompiledPartitionRecords
        await consumer.stop()
    finally:
        fetched_records.install()
