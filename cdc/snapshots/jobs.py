"""Snapshots: the rows a table already holds, published as ``op: "r"`` events, consistent with the stream.

Why watermarks (DBLog) rather than an exported snapshot: ``CREATE_REPLICATION_SLOT ... (SNAPSHOT
'export')`` gives one consistent view, but only while that replication connection stays idle, so a
large table is one long transaction that pins the source's vacuum and dies with the connection: it
cannot be chunked, resumed, run in parallel or repeated while streaming. With watermarks every chunk
is its own short ``SELECT``, the stream never pauses, and the same code serves the initial snapshot
and on-demand re-reads.

How a chunk becomes events (the source side is :mod:`cdc.source.postgres.snapshot`):

1. a low watermark is written to the WAL, the chunk is read, a high watermark is written;
2. the connector sees the watermarks in the stream, in commit order with every other change; any
   key that a streamed change touched between the two is dropped from the chunk (the streamed event
   carries that row's state at least as new as the chunk's);
3. at the high watermark the remaining rows are published as ``r`` events. They carry the high
   watermark's position (its commit, its message LSN, their index in the chunk), so each partition's
   positions keep increasing and a sink's skip-at-or-below rule holds.

Chunks of a table are pipelined (``CHUNKS_AHEAD``): each waits for its high watermark in the stream
while the next are read. Progress is recorded (:mod:`cdc.snapshots.progress`) in the Kafka topic
``{pipeline}.snapshots``, keyed by request and table, in key order, once a chunk's events are
acknowledged by Kafka and confirmed to the source, by a task beside the reading (ChunkProgress): one
record covers every chunk confirmed since the last. At most ``CHUNKS_AHEAD`` chunks of a table are
read and not yet recorded, so a connector killed half-way re-reads at most that many per table.
Kafka was chosen because the pipeline already depends on it and the record is written after the
events it describes: no table in the source, no write privilege beyond emitting WAL messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from cdc import failpoints
from cdc.config import PipelineConfig, TableRef
from cdc.snapshots.display import ProgressDisplay
from cdc.snapshots.progress import ChunkProgress
from cdc.source.postgres.replication import source_failure
from cdc.source.postgres.snapshot import ChunkRead, ChunkReader

# The name snapshot log lines have always had (the `component` of a JSON line comes from it).
log = logging.getLogger("cdc.snapshot")

INITIAL = "initial"  # request id of the initial snapshot
CHUNKS_AHEAD = 8  # chunks of one table read and not yet recorded at once: what a crash re-reads at most


@dataclass
class Job:
    """Reading one table for one request (the initial snapshot, or an on-demand one)."""

    request: str
    table: TableRef
    where: str | None = None
    after_key: list[str] | None = None  # key texts of the last row published; None: from the start
    until_key: list[str] | None = None  # the greatest key when the job started: it reads no further
    rows: int = 0  # rows published so far
    estimate: int = 0  # the planner's row count, for the progress display
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    # A verification (cdc.verify): the chunks are digested, not published as rows, and no progress
    # is recorded (a verification cut short is asked for again, never resumed as a snapshot).
    verify: bool = False
    rate: int | None = None  # rows per second at most (verifications: `cdc verify --rate`)
    chunk_ids: list[str] = field(default_factory=list)  # verifications: chunks whose digests were published
    part: int = 0  # verifications: which of the request's ranges of the table (a re-check asks for several)
    repair: bool = False  # `cdc verify --repair`: the rows are published as r events too, before the digests

    @property
    def id(self) -> tuple[str, str] | tuple[str, str, int]:
        return (self.request, str(self.table)) if not self.verify else (self.request, str(self.table), self.part)

    def record(self) -> dict[str, Any]:
        return {"request": self.request, "table": str(self.table), "where": self.where, "after_key": self.after_key,
                "until_key": self.until_key, "rows": self.rows, "done": self.done}


@dataclass
class Chunk:
    id: str
    job: Job
    columns: list[str]  # as selected, in the stream's column order
    types: list[str]  # the stream's types of those columns when the chunk was read
    after_key: list[str] | None  # where the chunk starts (key texts of the row before it; None: the first)
    read: ChunkRead | None = None  # set by the reader before it writes the high watermark
    # The job's last chunk (set with `read`): its range has no end but the job's (until_key), so
    # its rows are all the job has after `after_key`. A chunk read again keeps its first read's.
    last: bool = False
    in_window: bool = False  # between the low and the high watermark in the stream
    opened_after: int = 0  # how many transactions the stream had read when the low watermark came
    missed_commit: bool = False  # its snapshot missed a commit streamed before its low watermark
    changed: set[tuple] = field(default_factory=set)  # keys the stream touched inside the window
    truncated: bool = False  # the table was truncated inside the window: publish nothing
    emitted: int = 0  # rows published as r events
    published: asyncio.Future | None = None  # -> the stream's transaction holding the r events, or None: redo


class Snapshots:
    """Runs snapshot jobs beside the stream. The connector calls :meth:`on_watermark`,
    :meth:`note_change` and :meth:`note_truncate` from its stream loop, and publishes what
    :meth:`on_watermark` hands back."""

    def __init__(self, config: PipelineConfig, relation_of: Callable[[TableRef], int],
                 columns_of: Callable[[TableRef], tuple[list[str], list[tuple[str, str]], set[str], list[int | None], list[str]]],
                 confirmed: Callable[[Any], bool], save: Callable[[bytes, bytes], Any],
                 row_filter_of: Callable[[TableRef], str | None] = lambda table: None,
                 finished: Callable[[Job], Any] | None = None):
        self.config = config
        # table -> the privacy policy's row filter as SQL: PostgreSQL decides which rows a chunk holds
        self.row_filter_of = row_filter_of
        self.relation_of = relation_of  # table -> relation OID
        # table -> (columns as the stream has them, [(key column, type)], columns the privacy policy
        # drops: read as NULL, so their values never leave the database, the columns' attnums and types)
        self.columns_of = columns_of
        self.confirmed = confirmed  # transaction -> Kafka acknowledged it and all before (see AckTracker)
        self.save = save  # (key, value) -> awaitable: a progress record, acknowledged by Kafka
        self.jobs: dict[tuple[str, str], Job] = {}
        self.chunks: dict[str, Chunk] = {}
        self._open: dict[int, list[Chunk]] = {}  # relation OID -> chunks between their watermarks
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._workers: list[asyncio.Task] = []
        self._display = ProgressDisplay()
        self.requests_done: dict[str, asyncio.Event] = {}
        self.finished = finished  # job -> awaitable, once every chunk of a job is confirmed

    # -- jobs -----------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Queue a job unless it is known already (a request re-read after a restart is one job)."""
        if job.id in self.jobs:
            return
        self.jobs[job.id] = job
        self.requests_done.setdefault(job.request, asyncio.Event())
        if job.done:
            self._check_request(job.request)
            return
        self._queue.put_nowait(job)

    def start(self) -> None:
        for _ in range(self.config.source.snapshot_parallelism):
            self._workers.append(asyncio.ensure_future(self._worker()))

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._display.close()

    def failed(self) -> BaseException | None:
        for task in self._workers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def _worker(self) -> None:
        reader: ChunkReader | None = None
        try:
            while True:
                job = await self._queue.get()
                try:
                    if reader is None:
                        reader = await asyncio.to_thread(ChunkReader, self.config.source.conninfo,
                                                         self.config.source.slot)
                    await self._run(job, reader)
                except psycopg.Error as exc:  # one line naming the table; the server's message has no values
                    raise source_failure(f"snapshot of {job.table}", exc, self.config.source.conninfo) from None
        finally:
            if reader is not None:
                reader.close()

    async def _run(self, job: Job, reader: ChunkReader) -> None:
        table_sql = _table_sql(job.table)
        if not job.estimate:
            job.estimate = await asyncio.to_thread(reader.estimate_rows, table_sql, job.where)
        self._display.start(job)
        if job.until_key is None and not job.done and not job.verify:
            # Bounded at its start (a resumed job keeps the bound it recorded): later rows are streamed.
            _, key, _, _, _ = self.columns_of(job.table)
            job.until_key = await asyncio.to_thread(reader.last_key, table_sql, key)
            if job.until_key is None:  # empty: every row it gets from now on is streamed
                job.done = True
                await self._record(job)
        # Chunks are read ahead of the stream: each waits for its high watermark while the next are
        # read, so a snapshot is not paced by one round trip through the stream (and its lag) per
        # chunk; and their progress is recorded beside the reading (ChunkProgress), not between two
        # chunks. At most CHUNKS_AHEAD chunks of a job are read and not yet recorded: what a crash re-reads.
        ahead: deque[Chunk] = deque()  # read, waiting for their high watermark
        progress = ChunkProgress(self, job)  # published, waiting for Kafka and their progress record
        next_key, read_all = job.after_key, job.done
        published_rows = job.rows
        try:
            while ahead or not read_all:
                while not read_all and len(ahead) + progress.pending < CHUNKS_AHEAD:
                    chunk = await self._read_chunk(job, reader, table_sql, next_key)
                    failpoints.reached("snapshot.chunk_read")
                    ahead.append(chunk)
                    assert chunk.read is not None
                    if chunk.last:
                        read_all = True
                    else:
                        next_key = chunk.read.last_key
                if not ahead:  # every chunk read is published, and CHUNKS_AHEAD of them are not recorded yet
                    await progress.recorded_some()
                    continue
                chunk = ahead.popleft()
                try:
                    txn = await chunk.published
                finally:
                    self.chunks.pop(chunk.id, None)
                assert chunk.read is not None
                if txn is None and chunk.missed_commit:
                    # Its snapshot missed a commit streamed before its low watermark, so nothing of it
                    # was published: read the same range again, next, and go on.
                    ahead.appendleft(await self._read_chunk(job, reader, table_sql, chunk.after_key, again=chunk))
                    continue
                if txn is None:
                    # The table's columns changed under the chunk: the chunks read after it settle as
                    # they may (their rows, if published, are valid r events), then its range is read again.
                    for later in ahead:
                        try:
                            await later.published
                        finally:
                            self.chunks.pop(later.id, None)
                    ahead.clear()
                    next_key, read_all = chunk.after_key, False
                    continue
                failpoints.reached("snapshot.chunk_published")
                chunk.read.rows = []  # published: only its place in the table is needed from here on
                progress.add(chunk, txn)
                published_rows += chunk.emitted
                if job.rate:  # throttled: at most `rate` rows per second since the job started
                    await asyncio.sleep(max(0.0, published_rows / job.rate - (time.monotonic() - job.started)))
            await progress.finish()
        finally:
            progress.cancel()
        log.info("%s of %s (%s) finished: %d rows", "verification" if job.verify else "snapshot", job.table,
                 job.request, job.rows)
        if self.finished is not None:
            await self.finished(job)
        self._check_request(job.request)

    async def _record(self, job: Job) -> None:
        if not job.verify:
            await self.save(orjson.dumps([job.request, str(job.table)]), orjson.dumps(job.record()))

    async def _read_chunk(self, job: Job, reader: ChunkReader, table_sql, after_key: list[str] | None,
                          again: Chunk | None = None) -> Chunk:
        """Read the rows after `after_key` between a low and a high watermark (the stream hands the
        chunk on at its high watermark: on_watermark). With `again`, that chunk's range is read again
        whatever its rows number now: up to the key it ended at, or the last chunk up to the job's end."""
        columns, key, dropped, attnums, types = self.columns_of(job.table)
        chunk = Chunk(uuid.uuid4().hex, job, columns, types, after_key)
        through = again.read.last_key if again is not None and again.read is not None and not again.last else None
        chunk.published = asyncio.get_running_loop().create_future()
        self.chunks[chunk.id] = chunk

        def read() -> None:
            reader.watermark(chunk.id, "low")
            # The row filter goes into the SELECT: PostgreSQL decides which rows pass, as it does for
            # a pushed-down publication filter.
            where = " AND ".join(f"({w})" for w in (job.where, self.row_filter_of(job.table)) if w) or None
            chunk_size = self.config.source.snapshot_chunk_size
            limit = None if again is not None else chunk_size
            read = reader.select_chunk(table_sql, columns, key, after_key, limit, where, dropped,
                                       through or job.until_key, attnums, types)
            if through is not None:
                read.last_key = through
            # Before the high watermark: the stream may hand the chunk on before this task resumes.
            chunk.last = again.last if again is not None else (read.last_key is None or len(read.rows) < chunk_size)
            chunk.read = read
            reader.watermark(chunk.id, "high")

        try:
            await asyncio.to_thread(read)
        except BaseException:
            self.chunks.pop(chunk.id, None)
            raise
        return chunk

    def _check_request(self, request: str) -> None:
        if all(j.done for j in self.jobs.values() if j.request == request):
            self.requests_done.setdefault(request, asyncio.Event()).set()

    # -- the stream's side ----------------------------------------------------------------------

    def on_watermark(self, content: bytes, transactions_read: int = 0) -> Chunk | None:
        """A message of ours: a low mark opens the chunk's window; a high mark closes it and returns
        the chunk, whose remaining rows the connector publishes now. Unknown chunks (re-read after
        a restart, or of a connector that died) are ignored."""
        try:
            payload = orjson.loads(content)
        except orjson.JSONDecodeError:
            return None
        chunk = self.chunks.get(payload.get("chunk")) if isinstance(payload, dict) else None
        if chunk is None:
            return None
        oid = self.relation_of(chunk.job.table)
        if payload.get("mark") == "low":
            chunk.in_window = True
            chunk.opened_after = transactions_read
            self._open.setdefault(oid, []).append(chunk)
            return None
        if payload.get("mark") == "high" and chunk.in_window:
            chunk.in_window = False
            self._open[oid].remove(chunk)
            return chunk
        return None

    def note_change(self, relation_id: int, key: tuple) -> None:
        for chunk in self._open.get(relation_id, ()):
            chunk.changed.add(key)

    def note_truncate(self, relation_id: int) -> None:
        for chunk in self._open.get(relation_id, ()):
            chunk.truncated = True

    @property
    def windows_open(self) -> bool:
        return any(self._open.values())


def _table_sql(table: TableRef):
    from psycopg import sql

    return sql.Identifier(table.schema, table.name)
