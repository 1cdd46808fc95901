"""The connector: PostgreSQL logical replication (pgoutput) -> change events -> Kafka.

    ReplicationConnection.read_frame   XLogData / keepalive frames
      -> pgoutput.decode               Begin, Relation, Insert, Update, Delete, Truncate, Commit ...
      -> TableStream.event(s)          rows as JSON values, full `after`, key, position
      -> Publisher.publish             record batches per topic partition, acks=all; each delivered
                                       batch reports its events per transaction to the AckTracker
      -> AckTracker.confirmed_lsn      sent back in standby status updates

Only LSNs whose events Kafka acknowledged are confirmed (see cdc.checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from cdc.checkpoint import AckTracker, Transaction
from cdc.config import PipelineConfig, TableRef
from cdc.errors import DecodeError, PublishError, SourceError
from cdc.events.envelope import ChangeEvent, TransactionInfo
from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.events.schema import Column, TableSchema
from cdc.lsn import Position, format_lsn
from cdc.kafka_admin import ensure_topics
from cdc.publish.kafka import Publisher
from cdc.source.postgres import pgoutput
from cdc.source.postgres.catalog import Catalog, TableInfo, check_source, ensure_publication
from cdc.source.postgres.replication import SESSION_OPTIONS, ReplicationConnection
from cdc.source.postgres.values import Converter, ValueDecoder

log = logging.getLogger(__name__)

_UNCHANGED = pgoutput.UNCHANGED_TOAST
SHUTDOWN_FLUSH_S = 30.0  # how long a stop waits for Kafka to acknowledge what was sent


@dataclass(slots=True)
class TableStream:
    """One relation as the stream last described it: how to turn its tuples into events."""

    ref: TableRef
    topic: str
    schema: TableSchema
    schema_header: bytes
    names: tuple[str, ...]
    converters: tuple[Converter, ...]
    key_names: tuple[str, ...]
    partitions: int = 1

    def row(self, values: tuple, lsn: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, convert, raw in zip(self.names, self.converters, values):
            if raw is None or raw is _UNCHANGED:
                out[name] = raw
                continue
            try:
                out[name] = convert(raw)
            except Exception as exc:  # the message names the place, never the value (it may be private)
                raise DecodeError(
                    f"cannot decode column {name} of {self.ref} ({self.schema.column(name).type}) at LSN "
                    f"{format_lsn(lsn)}: {type(exc).__name__}"
                ) from None
        return out

    def key_of(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: row[k] for k in self.key_names}

    def full_after(self, new: dict[str, Any], old: dict[str, Any] | None, lsn: int) -> dict[str, Any]:
        """Replace values PostgreSQL did not resend (unchanged TOAST) with the before-image's."""
        for name, value in new.items():
            if value is _UNCHANGED:
                previous = old.get(name, _UNCHANGED) if old is not None else _UNCHANGED
                if previous is _UNCHANGED:
                    raise DecodeError(
                        f"UPDATE of {self.ref} at LSN {format_lsn(lsn)} left column {name} unchanged (TOAST) "
                        f"and no before-image holds it: ALTER TABLE {self.ref} REPLICA IDENTITY FULL"
                    )
                new[name] = previous
        return new


class Connector:
    def __init__(self, config: PipelineConfig, stop: asyncio.Event | None = None):
        self.config = config
        self.stop_event = stop or asyncio.Event()
        self.catalog_conn: psycopg.Connection | None = None
        self.repl = ReplicationConnection(config.source.postgres)
        self.publisher = Publisher(
            config.kafka, f"cdc-{config.pipeline}-connector", lambda counts, error: self.tracker.delivered(counts, error)
        )
        self.tables: dict[int, TableInfo] = {}  # by table OID = pgoutput relation id
        self.streams: dict[int, TableStream | None] = {}  # relation id -> stream (None: not ours)
        self.tracker = AckTracker(0)
        self.db_name = ""
        self.topic_partitions: dict[str, int] = {}
        self.events_published = 0
        self._txn: Transaction | None = None
        self._txn_info: TransactionInfo | None = None
        self._seq_lsn = -1  # LSN of the change record the last event came from
        self._seq = 0  # next index among the events of changes at _seq_lsn
        self._received_lsn = 0

    # -- set-up ---------------------------------------------------------------------------------

    def _prepare_source(self) -> None:
        try:
            # The same session settings as the walsender's, so loaders read its text the way it was printed.
            self.catalog_conn = psycopg.connect(self.config.source.postgres, autocommit=True, options=SESSION_OPTIONS)
        except psycopg.OperationalError as exc:
            raise SourceError(f"{self.config.where('source', 'postgres')}: cannot connect to the source: {exc}".strip()) from exc
        self.catalog = Catalog(self.catalog_conn)
        self.values = ValueDecoder(self.catalog_conn)
        self.tables = {info.oid: info for info in check_source(self.catalog, self.config).values()}
        ensure_publication(self.catalog_conn, self.config)
        self.db_name = self.catalog_conn.info.dbname
        self.repl.open()
        slot = self.repl.ensure_slot(self.config.source.slot)
        self.tracker = AckTracker(slot.confirmed_flush_lsn)
        self._received_lsn = slot.confirmed_flush_lsn

    async def run(self) -> None:
        try:
            await asyncio.to_thread(self._prepare_source)
            self.topic_partitions = await ensure_topics(
                self.config.kafka, [self.config.topic_for(t) for t in self.config.source.tables]
            )
            await self.publisher.start()
            await self.repl.start(self.config.source.slot, self.config.source.publication)
            log.info("streaming slot %s from %s", self.config.source.slot, format_lsn(self.tracker.confirmed_lsn))
            await self._stream()
        finally:
            await self._shutdown()

    async def _stream(self) -> None:
        interval = self.config.source.status_interval_s
        next_status = time.monotonic() + interval
        reported = -1
        busy_frames = 0
        while not self.stop_event.is_set():
            if self.tracker.error is not None:
                raise PublishError(f"Kafka did not acknowledge an event: {self.tracker.error!r}") from self.tracker.error
            frame = self.repl.poll_frame()
            if frame is None:
                # The stream paused: ship what we have rather than wait for batches to fill.
                await self.publisher.send_open()
                frame = await self.repl.read_frame(timeout=min(interval, 0.2))
            else:
                await self.publisher.send_open(older_than_linger=True)
                busy_frames += 1
                if busy_frames % 256 == 0:
                    # Reading a backlog never blocks: let the producer and delivery callbacks run.
                    await asyncio.sleep(0)
            if isinstance(frame, pgoutput.XLogData):
                await self._on_message(pgoutput.decode(frame.payload, lsn=frame.start_lsn), frame.start_lsn)
                self._received_lsn = max(self._received_lsn, frame.start_lsn)
            elif isinstance(frame, pgoutput.Keepalive):
                self._received_lsn = max(self._received_lsn, frame.wal_end)
                if self._txn is None:
                    self.tracker.idle(frame.wal_end)
                if frame.reply_requested:
                    await self._send_status()
                    next_status = time.monotonic() + interval
            now = time.monotonic()
            if now >= next_status or (self.tracker.confirmed_lsn != reported and frame is None):
                await self._send_status()
                reported = self.tracker.confirmed_lsn
                next_status = now + interval

    async def _send_status(self) -> None:
        await self.repl.send_status(self._received_lsn, self.tracker.confirmed_lsn)

    async def _shutdown(self) -> None:
        try:
            flushed = self.tracker.error is None and await self.publisher.flush(timeout_s=SHUTDOWN_FLUSH_S)
            # Then tell PostgreSQL how far Kafka has everything (delivery callbacks have run by now).
            if flushed and self.repl.streaming:
                try:
                    await self._send_status()
                except Exception:  # the stream may already be gone; the slot keeps the last position
                    log.debug("final status update failed", exc_info=True)
        finally:
            await self.publisher.stop()
            self.repl.close()
            if self.catalog_conn is not None:
                self.catalog_conn.close()

    # -- messages -------------------------------------------------------------------------------

    async def _on_message(self, msg: object, lsn: int) -> None:
        if isinstance(msg, pgoutput.Begin):
            self._txn = self.tracker.begin()
            self._seq_lsn = -1
            commit_ts = msg.commit_time.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
            self._txn_info = TransactionInfo(msg.final_lsn, format_lsn(msg.final_lsn), msg.xid, commit_ts)
        elif isinstance(msg, pgoutput.Commit):
            assert self._txn is not None, "Commit without Begin"
            self.tracker.commit(self._txn, msg.end_lsn)
            self._txn = None
        elif isinstance(msg, pgoutput.Relation):
            self.streams[msg.relation_id] = await asyncio.to_thread(self._table_stream, msg)
        elif isinstance(msg, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete)):
            stream = self._stream_for(msg.relation_id, lsn)
            if stream is not None:
                for event in self._row_events(stream, msg, lsn):
                    await self._publish(stream, event)
        elif isinstance(msg, pgoutput.Truncate):
            for relation_id in msg.relation_ids:
                stream = self._stream_for(relation_id, lsn)
                if stream is not None:
                    self._seq_lsn = -1  # one TRUNCATE record, one event per table: each is seq 0 in its own topic
                    event = self._event("t", None, None, None, lsn)
                    for partition in range(stream.partitions):  # every partition holds rows of the table
                        await self._publish(stream, event, partition)
        elif isinstance(msg, (pgoutput.Origin, pgoutput.Type, pgoutput.Message)):
            pass  # Type: we describe types from the catalog; Origin/Message: not part of row state
        else:
            raise DecodeError(f"unexpected message {type(msg).__name__} at LSN {format_lsn(lsn)}")

    def _stream_for(self, relation_id: int, lsn: int) -> TableStream | None:
        try:
            return self.streams[relation_id]
        except KeyError:
            raise DecodeError(f"change for relation {relation_id} at LSN {format_lsn(lsn)} before its Relation message") from None

    def _table_stream(self, rel: pgoutput.Relation) -> TableStream | None:
        # Matched by OID, not name: a table renamed while the pipeline runs keeps its topic.
        info = self.tables.get(rel.relation_id)
        if info is None:
            log.info("ignoring changes of %s.%s: published but not in the pipeline", rel.namespace, rel.name)
            return None
        ref = info.ref
        names = tuple(c.name for c in rel.columns)
        missing = [k for k in info.primary_key if k not in names]
        if missing:
            raise SourceError(f"{self.config.table_location(ref)}: primary key column(s) {', '.join(missing)} of {ref} not in the stream")
        columns, converters = [], []
        for col in rel.columns:
            desc = self.catalog.describe_type(col.type_oid, col.type_modifier)
            columns.append(Column(col.name, desc.type, desc.kind, desc.array, col.name not in info.not_null, desc.builtin))
            converters.append(self.values.converter(desc))
        schema = TableSchema(ref.schema, ref.name, tuple(columns), info.primary_key)
        topic = self.config.topic_for(ref)
        return TableStream(
            ref=ref, topic=topic, schema=schema, schema_header=schema.to_json(), names=names,
            converters=tuple(converters), key_names=info.primary_key,
            partitions=self.topic_partitions[topic],
        )

    def _event(self, op: str, before, after, key, lsn: int) -> ChangeEvent:
        assert self._txn_info is not None, "row change outside a transaction"
        # The position depends on the WAL alone: changes sharing one record (a multi-row INSERT or
        # COPY) all belong to one table, so their order among the events of that LSN does not
        # depend on which tables the pipeline captures.
        if lsn != self._seq_lsn:
            self._seq_lsn, self._seq = lsn, 0
        position = Position(self._txn_info.commit_lsn, lsn, self._seq)
        self._seq += 1
        return ChangeEvent(op, before, after, key, position, format_lsn(lsn), self._txn_info)

    def _row_events(self, stream: TableStream, msg, lsn: int) -> list[ChangeEvent]:
        if isinstance(msg, pgoutput.Insert):
            after = stream.row(msg.new, lsn)  # an INSERT always carries every value
            return [self._event("c", None, after, stream.key_of(after), lsn)]
        if isinstance(msg, pgoutput.Delete):
            old = stream.row(msg.old if msg.old is not None else msg.key, lsn)
            before = old if msg.old is not None else stream.key_of(old)
            return [self._event("d", before, None, stream.key_of(old), lsn)]
        # Update: 'O' (full before-image, REPLICA IDENTITY FULL) or 'K' (old key, when the key changed).
        old = stream.row(msg.old, lsn) if msg.old is not None else None
        if old is None and msg.key is not None:
            old = stream.key_of(stream.row(msg.key, lsn))
        after = stream.full_after(stream.row(msg.new, lsn), old, lsn)
        key = stream.key_of(after)
        if old is not None:
            old_key = stream.key_of(old)
            if old_key != key:
                # A primary-key change is a delete of the old key and a create of the new one, so every
                # key's events stay on its own partition, in order, and log compaction stays correct.
                return [self._event("d", old, None, old_key, lsn), self._event("c", None, after, key, lsn)]
        return [self._event("u", old, after, key, lsn)]

    async def _publish(self, stream: TableStream, event: ChangeEvent, partition: int = 0) -> None:
        # Topics have one partition (see KafkaConfig.partitions): every event of a table, in order.
        assert self._txn is not None
        value = event.encode_value(self.config.pipeline, self.db_name, stream.ref.schema, stream.ref.name)
        headers = [(SCHEMA_HEADER, stream.schema_header)]
        await self.publisher.publish(stream.topic, partition, event.encode_key(), value, headers, self._txn)
        self.tracker.sent(self._txn)
        self.events_published += 1
