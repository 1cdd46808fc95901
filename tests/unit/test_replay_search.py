"""Replay's search for --from-lsn over a partition whose oldest segments retention deletes meanwhile.

The partition's bounds are read first, then records are fetched at chosen offsets; between the two,
retention may delete the first ones and the broker answers OffsetOutOfRange. The search must then
take the oldest record still held (and so report it as the oldest event held), not crash.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from cdc.lsn import Position, format_lsn
from cdc.sink.backends.base import PartitionProgress
from cdc.sink.replay import Replay, deleted_since_applied

TP = TopicPartition("p.public.items", 0)


class RetainingPartition:
    """A partition of events whose commit LSNs grow with their offset, and whose oldest records are
    deleted once the search has started (as retention does)."""

    def __init__(self, end: int, deleted_before: int):
        self.end, self.deleted_before, self.position, self.fetches = end, deleted_before, 0, 0

    def commit_lsn(self, offset: int) -> int:
        return 0x1000 + 0x100 * offset

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position = offset

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.deleted_before for tp in tps}

    async def getmany(self, tp: TopicPartition, timeout_ms: int, max_records: int) -> dict:
        self.fetches += 1
        if self.position < self.deleted_before:
            raise OffsetOutOfRangeError({tp: self.position})
        records = []
        for offset in range(self.position, min(self.position + max_records, self.end)):
            lsn = format_lsn(self.commit_lsn(offset))
            value = orjson.dumps({"op": "c", "source": {"commit_lsn": lsn, "lsn": lsn, "seq": 0}})
            records.append(SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=offset, value=value))
        self.position += len(records)
        return {tp: records}


def search(partition: RetainingPartition, from_lsn: int, first: int) -> tuple[int, int | None]:
    replay = SimpleNamespace(from_lsn=from_lsn, positions=SimpleNamespace(skipped=lambda message: False))
    replay._commit_at = lambda consumer, tp, offset: Replay._commit_at(replay, consumer, tp, offset)
    return asyncio.run(Replay._first_at_or_after(replay, partition, TP, first, partition.end))


def test_records_deleted_after_the_bounds_were_read_make_the_oldest_held_record_the_oldest():
    partition = RetainingPartition(end=40, deleted_before=12)
    start, oldest = search(partition, from_lsn=0, first=3)  # the bounds said 3; retention moved it to 12
    assert oldest == partition.commit_lsn(12)  # so replay names it, and stops with exit code 4
    assert start == 3  # every offset is at or after LSN 0


def test_a_search_past_the_deleted_records_finds_the_first_offset_at_or_after_the_lsn():
    partition = RetainingPartition(end=40, deleted_before=12)
    start, oldest = search(partition, from_lsn=partition.commit_lsn(25), first=3)
    assert (start, oldest) == (25, partition.commit_lsn(12))


def test_a_partition_emptied_by_retention_refuses_a_replay_unless_the_target_applied_all_it_lost_before_the_lsn():
    def applied(offset: int, commit_lsn: int) -> PartitionProgress:
        return PartitionProgress(TP.topic, TP.partition, offset, Position(commit_lsn, commit_lsn, 0))

    assert not deleted_since_applied(None, first=0, from_lsn=0x5000)  # never held an event
    assert deleted_since_applied(None, first=40, from_lsn=0x5000)  # a target that applied nothing of it
    assert deleted_since_applied(applied(4, 0x1000), first=40, from_lsn=0)  # events 5-39 never applied
    assert deleted_since_applied(applied(39, 0x6000), first=40, from_lsn=0x5000)  # some were after the LSN
    assert not deleted_since_applied(applied(39, 0x4000), first=40, from_lsn=0x5000)  # all applied, all before
