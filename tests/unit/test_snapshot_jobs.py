"""Snapshot and verification jobs (cdc.snapshots.jobs): which ranges chunks cover, against an
in-memory table (the chunk reads against PostgreSQL are tests/integration/test_snapshot.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from cdc.config import TableRef
from cdc.snapshots.jobs import Job, Snapshots
from cdc.source.postgres.snapshot import ChunkRead


class TableReader:
    """A ChunkReader over a table of integer keys; `before_read` changes the table before a read."""

    def __init__(self, keys: list[int], high_watermark):
        self.keys = sorted(keys)
        self.high_watermark = high_watermark  # chunk id -> None, called from the reader's thread
        self.reads: list[tuple[list[str] | None, int | None, list[str] | None]] = []  # (after, limit, until)
        self.before_read: list = []

    def estimate_rows(self, table, where) -> int:
        return len(self.keys)

    def watermark(self, chunk_id: str, mark: str) -> None:
        if mark == "high":
            self.high_watermark(chunk_id)

    def select_chunk(self, table, columns, key, after_key, limit, where, dropped, until_key, attnums, types) -> ChunkRead:
        if self.before_read:
            self.before_read.pop(0)(self.keys)
        self.reads.append((after_key, limit, until_key))
        rows = [k for k in self.keys if (after_key is None or k > int(after_key[0]))
                and (until_key is None or k <= int(until_key[0]))][:limit]
        return ChunkRead([(str(k).encode(),) for k in rows], [str(rows[-1])] if rows else None)


def chunks_published(keys: list[int], missed_first_read_after: set[str | None], changes: list) -> tuple[list, list]:
    """Run a verification job over `keys` in chunks of 3; the first read of each chunk starting
    after a key in `missed_first_read_after` misses a commit (it is read again). Returns the chunks
    published, as (after, last key, last chunk, keys), and the reads."""
    table = TableRef("public", "items")
    config = SimpleNamespace(source=SimpleNamespace(snapshot_chunk_size=3))
    snapshots = Snapshots(config, lambda t: 1, lambda t: (["id"], [("id", "bigint")], set(), [1], ["bigint"]),
                          lambda txn: True, lambda key, value: None)
    published: list = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        highs: asyncio.Queue[str] = asyncio.Queue()
        reader = TableReader(keys, lambda chunk_id: loop.call_soon_threadsafe(highs.put_nowait, chunk_id))
        reader.before_read = [lambda keys: None] * 3 + changes  # the three first reads, then the re-reads
        job = Job("r1", table, verify=True)
        runner = asyncio.ensure_future(snapshots._run(job, reader))
        missed = set(missed_first_read_after)
        while not runner.done():
            get = asyncio.ensure_future(highs.get())
            await asyncio.wait([get, runner], return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break
            chunk = snapshots.chunks[get.result()]
            start = chunk.after_key[0] if chunk.after_key else None
            if start in missed:
                missed.discard(start)
                chunk.missed_commit = True
                chunk.published.set_result(None)
                continue
            published.append((start, chunk.read.last_key, chunk.last, [int(r[0]) for r in chunk.read.rows]))
            chunk.published.set_result(object())
        await runner
        return reader.reads

    reads = asyncio.run(run())
    return published, reads


def test_a_chunk_read_again_for_a_missed_commit_keeps_its_range_however_many_rows_it_holds_now():
    def delete_5(keys: list[int]) -> None:
        keys.remove(5)

    def insert_20(keys: list[int]) -> None:
        keys.append(20)

    # Chunks of 3 over 1..8: (start, 3], (3, 6], (6, end]. The second and the last miss a commit;
    # before they are read again, 5 is deleted and 20 inserted.
    published, reads = chunks_published(list(range(1, 9)), {"3", "6"}, [delete_5, insert_20])
    assert sorted(published, key=lambda p: int(p[0] or 0)) == [
        (None, ["3"], False, [1, 2, 3]),
        ("3", ["6"], False, [4, 6]),  # two rows now, and still not the last chunk: it ends at 6
        ("6", ["20"], True, [7, 8, 20]),  # the last chunk read again reads to the table's end
    ]
    # The first reads are limited to a chunk's size; reads again are bounded by the range instead.
    assert reads[-2:] == [(["3"], None, ["6"]), (["6"], None, None)]
