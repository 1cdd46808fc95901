"""Read and dispatch: replication frames -> pgoutput messages -> one handler per message type.

Each handler hands the message one way down the stages: Begin/Commit to positions (and the END
record to publishing), Relation to tables, row changes through build and filter (cdc.connector.changes) to
publishing, our own logical messages to the snapshot feed. Keepalives and the status interval drive
the standby status updates (confirm).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from cdc import failpoints, metrics
from cdc.config import PipelineConfig
from cdc.connector.changes import RowChange, keys_touched, row_events, truncate_event
from cdc.connector.confirm import StatusUpdates
from cdc.connector.positions import Positions
from cdc.connector.publishing import EventPublishing
from cdc.connector.snapshots import SnapshotFeed
from cdc.connector.tables import COLUMNS_MESSAGE_PREFIX, Tables, TableStream
from cdc.errors import CdcError, DecodeError, EventRefusedError, PublishError
from cdc.events.envelope import ChangeEvent
from cdc.lsn import format_lsn
from cdc.publish.kafka import Publisher
from cdc.source.postgres import frames, pgoutput
from cdc.source.postgres.replication import ReplicationConnection
from cdc.source.postgres.snapshot import message_prefix
from cdc.source.postgres.values import least_event_bytes, least_json_per_text_byte

log = logging.getLogger(__name__)


class Stream:
    # One handler per pgoutput message type (a new kind of message gets its own).
    HANDLERS: dict[type, str] = {
        pgoutput.Begin: "_on_begin",
        pgoutput.Commit: "_on_commit",
        pgoutput.Relation: "_on_relation",
        pgoutput.Insert: "_on_row_change",
        pgoutput.Update: "_on_row_change",
        pgoutput.Delete: "_on_row_change",
        pgoutput.Truncate: "_on_truncate",
        pgoutput.Message: "_on_logical_message",
        pgoutput.Origin: "_ignore",  # not part of row state
        pgoutput.Type: "_ignore",  # we describe types from the catalog
    }

    def __init__(self, config: PipelineConfig, stop: asyncio.Event, repl: ReplicationConnection, publisher: Publisher,
                 positions: Positions, status: StatusUpdates, tables: Tables, publishing: EventPublishing,
                 snapshots: SnapshotFeed, until_request: str | None):
        self.config = config
        self.stop = stop
        self.repl = repl
        self.publisher = publisher
        self.positions = positions
        self.status = status
        self.tables = tables
        self.publishing = publishing
        self.snapshots = snapshots
        self.until_request = until_request  # stop once this snapshot request is done (cdc snapshot)
        self.message_prefix = message_prefix(config.source.slot)
        # A handler returns what is left to await (an async handler: its coroutine), or None.
        self._handlers: dict[type, Callable[[object, int], Awaitable[None] | None]] = {
            kind: getattr(self, name) for kind, name in self.HANDLERS.items()
        }

    async def run(self) -> None:
        interval = self.config.source.status_interval_s
        next_status = time.monotonic() + interval
        reported = -1
        busy_frames = 0
        positions = self.positions
        publisher = self.publisher
        # Looked up once: the loop runs once per change.
        poll_data, decode, dispatch, xlogdata_start_lsn = self.repl.poll_data, pgoutput.decode, self._dispatch, \
            frames.xlogdata_start_lsn
        keepalive_fields = frames.keepalive_fields
        XLOGDATA_PAYLOAD = frames.XLOGDATA_PAYLOAD
        insert_now, begin_or_commit_now = self._insert_now, self._begin_or_commit_now
        checked = False  # nothing awaited since the checks below last ran
        while not self.stop.is_set():
            if not checked:
                # Kafka's answers and the snapshot workers only act while this loop waits for something.
                tracker = positions.tracker
                if tracker.error is not None:
                    if isinstance(tracker.error, CdcError):  # ours, with its own message and exit code
                        raise tracker.error
                    raise PublishError(f"Kafka did not acknowledge an event: {tracker.error!r}") from tracker.error
                failure = self.snapshots.jobs.failed()
                if failure is not None:
                    raise failure
                checked = True
            if self.until_request and self.snapshots.request_done(self.until_request):
                log.info("snapshot request %s is done", self.until_request)
                return
            raw = poll_data()
            now = time.monotonic()
            if raw is None:
                # The stream paused: ship what we have rather than wait for batches to fill.
                await publisher.send_open()
                # While Kafka has yet to answer for what was sent, look again soon: its answer is
                # confirmed to PostgreSQL at the next pass, not after a whole read timeout.
                timeout = 0.01 if positions.tracker.awaiting_kafka else min(interval, 0.2)
                raw = await self.repl.read_data(timeout=timeout)
                now, checked = time.monotonic(), False
            else:
                if publisher.linger_due(now):
                    await publisher.send_open(older_than_linger=True)
                    checked = False
                busy_frames += 1
                if busy_frames % 256 == 0:
                    # Reading a backlog never blocks: let the producer and delivery callbacks run.
                    await asyncio.sleep(0)
                    checked = False
            # An XLogData frame's header is read here, without a frame object: a change per frame.
            start_lsn = None if raw is None else xlogdata_start_lsn(raw)
            if start_lsn is not None:
                try:
                    data = raw[XLOGDATA_PAYLOAD:]
                    kind = data[:1]
                    if kind == b"I":
                        done = insert_now(data, start_lsn)
                    elif kind == b"B" or kind == b"C":
                        done = begin_or_commit_now(data)
                    else:
                        done = False
                    if done is False:
                        message = decode(data, lsn=start_lsn)
                        if len(data) > publisher.max_event_bytes:  # only then can an event be too large
                            self._refuse_oversized(message, start_lsn)
                        if failpoints.armed:
                            failpoints.reached("connector.received")
                        waiting = dispatch(message, start_lsn)
                        if waiting is not None:
                            await waiting
                            checked = False
                    elif done is not True:
                        await done
                        checked = False
                except (DecodeError, EventRefusedError) as exc:
                    raise type(exc)(f"{exc}{positions.skip_hint()}") from None
                if start_lsn > positions.received_lsn:
                    positions.received_lsn = start_lsn
            elif raw is not None:
                keepalive = keepalive_fields(raw)
                if keepalive is None:
                    frames.parse_copy_frame(raw)  # DecodeError: no frame we know
                    raise AssertionError(f"a frame read as neither XLogData nor keepalive: {raw[:1]!r}")
                wal_end, reply_requested = keepalive
                if wal_end > positions.received_lsn:
                    positions.received_lsn = wal_end
                if positions.txn is None:
                    positions.tracker.idle(wal_end)
                if reply_requested:
                    await self.status.send()
                    next_status = time.monotonic() + interval
                    checked = False
            if now >= next_status or (positions.tracker.confirmed_lsn != reported and raw is None):
                await self.status.send()
                reported = positions.tracker.confirmed_lsn
                next_status = now + interval
                checked = False

    def _insert_now(self, message: bytes, lsn: int) -> bool | Awaitable[None]:
        """The usual change, an INSERT into a table published whole, from its pgoutput message to
        Kafka's batch in one step of the compiled core (TableStream.insert_encoder): False, having
        done nothing, where the general way (decode, dispatch) must; else as publish_insert_message."""
        stream = self.tables.streams.get(int.from_bytes(message[1:5], "big"))
        if (stream is None or stream.insert_encoder is None or self.snapshots.jobs.windows_open
                or len(message) > self.publisher.max_event_bytes):
            return False
        return self.publishing.publish_insert_message(stream, message, lsn)

    def _begin_or_commit_now(self, message: bytes) -> bool | Awaitable[None]:
        """A Begin or Commit message handled from its fields, without building the message: a
        stream of single-row transactions has two of them per change. False, having done nothing,
        where the general way (decode, dispatch) must; else as _insert_now."""
        if failpoints.armed:  # the general way reaches connector.received for each message
            return False
        if message[0] == 0x42:  # 'B'
            fields = pgoutput.begin_fields(message)
            if fields is None:
                return False
            self.positions.begin_at(*fields)
            self.snapshots.transactions.note(fields[2])
            return True
        end_lsn = pgoutput.commit_end_lsn(message)
        if end_lsn is None or self.positions.txn is None:
            return False
        return self._commit_now(end_lsn)

    def _dispatch(self, msg: object, lsn: int) -> Awaitable[None] | None:
        """Hand the message to its handler: what is left to await, if anything (a row change is
        built and published without waiting, unless a batch is full or a table's shape must be on
        Kafka first)."""
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise DecodeError(f"unexpected message {type(msg).__name__} at LSN {format_lsn(lsn)}")
        return handler(msg, lsn)

    async def _on_begin(self, msg: pgoutput.Begin, lsn: int) -> None:
        self.positions.begin(msg)
        self.snapshots.transactions.note(msg.xid)

    def _on_commit(self, msg: pgoutput.Commit, lsn: int) -> Awaitable[None] | None:
        done = self._commit_now(msg.end_lsn)
        return None if done is True else done

    def _commit_now(self, end_lsn: int) -> bool | Awaitable[None]:
        """The transaction's END record (if it published any event), then its commit: confirmable
        once Kafka has acknowledged all of it. True once done, else what is left to await."""
        assert self.positions.txn is not None, "Commit without Begin"
        if self.positions.counts:
            waiting = self.publishing.publish_end()
            if waiting is not True:
                return self._commit_after(waiting, end_lsn)
            metrics.COMMIT_TO_PUBLISH.set(max(time.time() - self.positions.commit_epoch, 0.0))
        self.positions.commit(end_lsn)
        return True

    async def _commit_after(self, end_record: Awaitable[None], end_lsn: int) -> None:
        await end_record
        metrics.COMMIT_TO_PUBLISH.set(max(time.time() - self.positions.commit_epoch, 0.0))
        self.positions.commit(end_lsn)

    async def _on_relation(self, msg: pgoutput.Relation, lsn: int) -> None:
        await self.tables.on_relation(msg)

    def _on_row_change(self, msg: RowChange, lsn: int) -> Awaitable[None] | None:
        stream = self.tables.stream_for(msg.relation_id, lsn)
        if stream is None:
            return None
        if type(msg) is pgoutput.Insert and stream.policy is None and not self.snapshots.jobs.windows_open:
            # The usual change, published without building a ChangeEvent (else the general way below).
            if self.publishing.publish_insert_now(stream, stream.row(msg.new, lsn), lsn):
                return None
        events = row_events(self.positions, stream, msg, lsn)
        if self.snapshots.jobs.windows_open:
            self.snapshots.note_changes(msg.relation_id, keys_touched(stream, events))
        publish_now = self.publishing.publish_now
        for i, event in enumerate(events):
            if not publish_now(stream, event):
                return self._publish(stream, events[i:])
        return None

    async def _publish(self, stream: TableStream, events: list[ChangeEvent]) -> None:
        for event in events:
            await self.publishing.publish(stream, event)

    async def _on_truncate(self, msg: pgoutput.Truncate, lsn: int) -> None:
        for relation_id in msg.relation_ids:
            stream = self.tables.stream_for(relation_id, lsn)
            if stream is not None:
                self.snapshots.jobs.note_truncate(relation_id)
                event = truncate_event(self.positions, lsn)
                for partition in range(stream.partitions):  # every partition holds rows of the table
                    await self.publishing.publish(stream, event, partition)

    async def _on_logical_message(self, msg: pgoutput.Message, lsn: int) -> None:
        if msg.prefix == self.message_prefix:
            await self.snapshots.on_message(msg, lsn)
        elif msg.prefix == COLUMNS_MESSAGE_PREFIX and msg.transactional:
            self.tables.note_columns(msg.content)

    async def _ignore(self, msg: object, lsn: int) -> None:
        pass

    def _refuse_oversized(self, msg: object, lsn: int) -> None:
        """Refuse a change whose event cannot fit a Kafka request, from the size of the text PostgreSQL
        sent, before any value is converted: converting a huge value (and encoding its event) would
        take several more copies of it before the publisher could refuse it."""
        if not isinstance(msg, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete)):
            return
        stream = self.tables.streams.get(msg.relation_id)
        policy = stream.policy if stream is not None else None
        if stream is None or (policy is not None and policy.row_filter is not None):
            return  # not ours, or the row filter may publish no event at all: checked once built
        ratios = tuple(
            0.0 if convert is None or (policy is not None and (not policy.passes(c.name) or c.name in policy.masks))
            else least_json_per_text_byte(c.kind, c.array)
            for c, convert in zip(stream.schema.columns, stream.converters)
        )
        if isinstance(msg, pgoutput.Insert):
            size = least_event_bytes(ratios, None, msg.new)
        else:  # the full before-image, or only the key
            size = least_event_bytes(ratios, msg.old if msg.old is not None else msg.key, getattr(msg, "new", None))
        limit = self.publisher.max_event_bytes
        if size > limit:
            raise EventRefusedError(
                f"a change of {stream.ref} at LSN {format_lsn(lsn)} makes an event for topic {stream.topic} of at "
                f"least {size} bytes, more than the {limit} a request may carry: raise kafka.max_batch_bytes (and "
                "the broker's message.max.bytes)"
            )
