"""Snapshots feeding the stream's stages: jobs from the recorded progress and from requests in the
WAL, watermarks opening and closing each chunk's window, and a closed chunk's rows published as r
events through the same build, filter and publish stages as streamed changes.

Fed by the stream stage (our pg_logical_emit_message messages, the keys row changes touch);
scheduling and chunk reads are cdc.snapshots.jobs and cdc.source.postgres.snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import orjson

from cdc.config import PipelineConfig, TableRef
from cdc.connector.changes import snapshot_row
from cdc.connector.positions import Positions
from cdc.connector.publishing import EventPublishing
from cdc.connector.tables import Tables, TableStream
from cdc.connector.verification import VerifyPublishing, ranges_of
from cdc.events.envelope import ChangeEvent
from cdc.events.keys import hashable_key
from cdc.lsn import format_lsn
from cdc.publish.kafka import Publisher
from cdc.snapshots.jobs import INITIAL, Chunk, Job, Snapshots
from cdc.snapshots.progress import load_progress, state_topic
from cdc.source.postgres import pgoutput

log = logging.getLogger(__name__)

# How many of the last streamed transactions are remembered to check a chunk's snapshot against
# (RecentTransactions): a transaction whose commit the source had not shown yet when a chunk was
# read is among the last few before the chunk's low watermark.
REMEMBERED_TRANSACTIONS = 65_536


class RecentTransactions:
    """The xids of the last transactions the stream read, each with its place in the stream."""

    def __init__(self, size: int = REMEMBERED_TRANSACTIONS):
        self.size = size
        self.read = 0  # transactions read so far
        self._place: OrderedDict[int, int] = OrderedDict()  # xid -> its place (the count before it)

    def note(self, xid: int) -> None:
        self._place[xid] = self.read
        self._place.move_to_end(xid)
        self.read += 1
        if len(self._place) > self.size:
            self._place.popitem(last=False)

    def read_before(self, xids: frozenset[int], place: int) -> list[int]:
        """Which of `xids` the stream read before `place`."""
        return [x for x in xids if self._place.get(x, place) < place]


class SnapshotFeed:
    def __init__(self, config: PipelineConfig, tables: Tables, positions: Positions, publishing: EventPublishing,
                 publisher: Publisher):
        self.config = config
        self.tables = tables
        self.positions = positions
        self.publishing = publishing
        self.transactions = RecentTransactions()
        self.verification = VerifyPublishing(config, publisher, positions, publishing)
        self.jobs = Snapshots(
            config, tables.relation_of, self._columns,
            lambda txn: txn.committed and positions.tracker.confirmed_lsn >= txn.end_lsn,
            lambda key, value: publisher.send_and_wait(state_topic(config), key, value),
            self._row_filter,
            self._finished,
        )

    async def load_jobs(self) -> None:
        """Jobs from the recorded progress: the initial snapshot (unless `snapshot: never`) and
        on-demand requests a previous run had not finished."""
        config = self.config
        progress = await load_progress(config)
        by_name = {str(t): t for t in config.source.tables}
        for (request, name), record in progress.items():
            if name in by_name and (request != INITIAL or config.source.snapshot == "initial"):
                self.jobs.add(Job(request, by_name[name], record.get("where"), record.get("after_key"),
                                  record.get("until_key"), int(record.get("rows", 0)),
                                  done=bool(record.get("done"))))
        if config.source.snapshot == "initial":
            for table in config.source.tables:
                self.jobs.add(Job(INITIAL, table))  # no-op for tables with a record above

    def request_done(self, request: str) -> bool:
        return self.jobs.requests_done.get(request, asyncio.Event()).is_set()

    def note_changes(self, relation_id: int, keys: list[Any]) -> None:
        """Keys a streamed change touched: a snapshot chunk must not publish an older state of these rows."""
        for key in keys:
            self.jobs.note_change(relation_id, hashable_key(key))

    async def _finished(self, job: Job) -> None:
        if job.verify:
            await self.verification.publish_summary(job)

    def _row_filter(self, table: TableRef) -> str | None:
        stream = self.tables.snapshot_stream(table)
        policy = stream.policy if stream is not None else None
        return policy.row_filter.sql() if policy is not None and policy.row_filter is not None else None

    def _columns(self, table: TableRef) -> tuple[list[str], list[tuple[str, str]], set[str], list[int | None], list[str]]:
        stream = self.tables.snapshot_stream(table)
        assert stream is not None
        dropped = {name for name, convert in zip(stream.names, stream.converters) if convert is None}
        columns = [stream.schema.column(n) for n in stream.names]  # chunks read columns by identity, and type
        return (list(stream.names), [(k, stream.schema.column(k).type) for k in stream.key_names], dropped,
                [c.attnum for c in columns], [c.type for c in columns])

    async def on_message(self, msg: pgoutput.Message, lsn: int) -> None:
        """A snapshot watermark or an on-demand snapshot request (see cdc.snapshots.jobs)."""
        try:
            payload = orjson.loads(msg.content)
        except orjson.JSONDecodeError:
            log.warning("ignoring an unreadable message with prefix %s at LSN %s", msg.prefix, format_lsn(lsn))
            return
        if isinstance(payload, dict) and "request" in payload:
            wanted = set(payload.get("tables") or ())
            verify = bool(payload.get("verify"))  # cdc verify (cdc.verify.requests)
            repair = verify and bool(payload.get("repair"))
            rate = payload.get("rate") if isinstance(payload.get("rate"), int) else None
            for table in self.config.source.tables:
                if str(table) in wanted:
                    self.jobs.add(Job(str(payload["request"]), table, payload.get("where"), verify=verify, rate=rate))
            for part, (name, after_key, until_key) in enumerate(ranges_of(payload) if verify else ()):
                table = next((t for t in self.config.source.tables if str(t) == name), None)
                if table is not None:  # a range of a table verified again (cdc.verify.requests)
                    self.jobs.add(Job(str(payload["request"]), table, None, after_key, until_key, verify=True,
                                      rate=rate, part=part, repair=repair))
            return
        chunk = self.jobs.on_watermark(msg.content, self.transactions.read)
        if chunk is not None:
            await self._publish_chunk(chunk, lsn)

    async def _publish_chunk(self, chunk: Chunk, lsn: int) -> None:
        """The chunk's rows that no change inside its window touched, as r events at this place."""
        assert chunk.published is not None and chunk.read is not None
        stream: TableStream | None = self.tables.snapshot_stream(chunk.job.table)
        if stream is None or list(stream.names) != chunk.columns or [c.type for c in stream.schema.columns] != chunk.types:
            chunk.published.set_result(None)  # the table changed shape: read the range again
            return
        if missed := self.transactions.read_before(chunk.read.unseen, chunk.opened_after):
            # Streamed before the low watermark, yet not shown to the chunk's snapshot (see
            # ChunkReader.unseen_transactions): its rows may predate those changes. Read it again.
            log.info("snapshot chunk of %s read again: its snapshot did not show transaction(s) %s",
                     chunk.job.table, ", ".join(map(str, missed)))
            chunk.missed_commit = True
            chunk.published.set_result(None)
            return
        if chunk.job.verify and not chunk.job.repair:
            await self.verification.publish_chunk(stream, chunk, lsn)
            chunk.published.set_result(self.positions.txn)
            return
        if not chunk.truncated:
            changed = chunk.changed
            # The compiled core encodes the rows' events from their texts, many in one call, unless
            # a key must be compared with the ones the window's changes touched (then each row is
            # built); a row it leaves to the general path is built, and the core goes on after it.
            one_step = stream.insert_encoder is not None and not changed
            rows, i = chunk.read.rows, 0
            while i < len(rows):
                if one_step:
                    published = await self.publishing.publish_snapshot_rows(stream, rows, i, lsn)
                    chunk.emitted += published
                    i += published
                    if i == len(rows):
                        break
                after, key = snapshot_row(stream, rows[i], lsn)
                i += 1
                if changed and hashable_key(key) in changed:
                    continue
                event: ChangeEvent = self.positions.event("r", None, after, key, lsn, snapshot=True)
                await self.publishing.publish(stream, event)
                chunk.emitted += 1
        if chunk.job.repair:  # after the rows: the sink deletes what else its target holds in the range
            chunk.emitted = 0
            await self.verification.publish_chunk(stream, chunk, lsn)
        chunk.published.set_result(self.positions.txn)
