"""ChunkProgress: a snapshot job's progress records while its next chunks are read and published.

The crash guarantee rests on one rule: a record never names a chunk whose events Kafka has not
acknowledged, nor one that comes after such a chunk in key order.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cdc.config import TableRef
from cdc.snapshots.jobs import Chunk, Job
from cdc.snapshots.progress import ChunkProgress
from cdc.source.postgres.snapshot import ChunkRead


class FakeSnapshots:
    """What ChunkProgress uses of Snapshots: which transactions Kafka confirmed, where records go."""

    def __init__(self) -> None:
        self.acknowledged: set[str] = set()
        self.records: list[dict] = []
        self._display = SimpleNamespace(update=lambda job: None)
        self.fail_records = False

    def confirmed(self, txn: str) -> bool:
        return txn in self.acknowledged

    async def _record(self, job: Job) -> None:
        if self.fail_records:
            raise RuntimeError("Kafka refused the record")
        self.records.append(job.record())


def chunk(job: Job, n: int, rows: int = 10) -> Chunk:
    c = Chunk(f"c{n}", job, ["id"], ["bigint"], [str((n - 1) * rows)] if n > 1 else None)
    c.read = ChunkRead([], [str(n * rows)])
    c.emitted = rows
    return c


async def until(condition, what: str) -> None:
    for _ in range(2000):  # polled, never timed: a generous bound on a loaded machine
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def test_records_stop_at_the_first_chunk_kafka_has_not_acknowledged():
    snapshots, job = FakeSnapshots(), Job("initial", TableRef("public", "items"))
    progress = ChunkProgress(snapshots, job)
    for n in range(1, 6):
        progress.add(chunk(job, n), f"t{n}")
    snapshots.acknowledged |= {"t1", "t2", "t4"}  # t3 not yet: chunk 4 must wait behind it
    await until(lambda: progress.pending == 3, "chunks 1 and 2 recorded")
    await until(lambda: snapshots.records, "a record")
    for _ in range(10):  # the recorder polls t3 again and again meanwhile
        await asyncio.sleep(0.03)
    assert [r["after_key"] for r in snapshots.records] == [["20"]]  # one record for both chunks
    assert snapshots.records[-1]["rows"] == 20 and not snapshots.records[-1]["done"]

    snapshots.acknowledged |= {"t3", "t5"}
    await progress.finish()
    progress.cancel()
    assert snapshots.records[-1] == {**snapshots.records[-1], "after_key": ["50"], "rows": 50, "done": True}
    assert [r["after_key"] for r in snapshots.records] == sorted(r["after_key"] for r in snapshots.records)
    assert job.done and progress.pending == 0


async def test_a_record_kafka_refuses_stops_the_job():
    snapshots, job = FakeSnapshots(), Job("initial", TableRef("public", "items"))
    snapshots.fail_records = True
    progress = ChunkProgress(snapshots, job)
    progress.add(chunk(job, 1), "t1")
    snapshots.acknowledged.add("t1")
    with pytest.raises(RuntimeError, match="refused"):
        await progress.recorded_some()
    with pytest.raises(RuntimeError, match="refused"):
        progress.add(chunk(job, 2), "t2")
