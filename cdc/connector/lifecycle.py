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
from dataclasses import dataclass, replace
from typing import Any

import orjson
import psycopg
from aiokafka.errors import KafkaError

from cdc import column_bindings
from cdc import failpoints
from cdc.checkpoint import AckTracker, Transaction
from cdc.config import PipelineConfig, TableRef
from cdc.errors import (
    AlreadyRunningError, CdcError, DecodeError, EventRefusedError, PublishError, SourceError, SourceLostError, WouldLoseDataError,
)
from cdc.events import build, schema_changes
from cdc.events.keys import hashable_key
from cdc.events.build import UNCHANGED
from cdc.events.envelope import ChangeEvent, TransactionInfo
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.events.schema import Column, TableSchema, keeps_values
from cdc.events.schema_changes import PublishedShape
from cdc.events.transaction import encode_end
from cdc.events.transaction import topic_of as transactions_topic
from cdc.kafka_admin import compacted_topics, end_offsets, ensure_topics, latest_per_key
from cdc.lsn import Position, format_lsn, parse_lsn
from cdc.privacy_plan import PrivacyPlan, check_source_and_privacy
from cdc.publish.kafka import Publisher
from cdc.redact import one_line, redact
from cdc import metrics
from cdc.retry import Outage, run_healing
from cdc.snapshot import INITIAL, Chunk, Job, Snapshots, load_progress, state_topic
from cdc.source.postgres import pgoutput
from cdc.source.postgres.catalog import Catalog, ColumnIdentityError, TableInfo, ensure_publication, resolve_attnums
from cdc.source.postgres.snapshot import message_prefix
from cdc.source.postgres.replication import (
    SESSION_OPTIONS, ReplicationConnection, SlotState, connect_failure, source_failure,
)
from cdc.source.postgres.values import Converter, ValueDecoder, least_event_bytes, least_json_per_text_byte
from cdc.transform.privacy import TablePolicy
from cdc.transform.rowfilter import FilterError

log = logging.getLogger(__name__)

_UNCHANGED = pgoutput.UNCHANGED_TOAST
# The key of truncate events on a compacted topic. Row keys are JSON objects, so it never collides.
TRUNCATE_KEY = b'"truncate"'
# Prefix of the messages sql/column_identity.sql's event trigger writes after every ALTER TABLE.
COLUMNS_MESSAGE_PREFIX = "cdc.columns"
SHUTDOWN_FLUSH_S = 15.0  # how long a stop waits for Kafka to acknowledge what was sent (README: Stopping)


@dataclass(slots=True)
class TableStream:
    """One relation as the stream last described it: how to turn its tuples into events."""

    ref: TableRef
    topic: str
    schema: TableSchema
    names: tuple[str, ...]
    converters: tuple[Converter | None, ...]  # None: a column the privacy policy drops, never decoded
    key_names: tuple[str, ...]
    headers: list[tuple[str, bytes]]  # the same for every event of this relation version
    partitions: int = 1
    partial_updates: int = 0  # events published with `unchanged` columns (see cdc.events.build)
    compacted: bool = False  # the topic keeps only the latest record per key (cleanup.policy compact)
    policy: TablePolicy | None = None  # privacy: what of each row is published (None: everything)
    published: TableSchema | None = None  # the shape as published (the header): `schema` after the policy
    shape_recorded: bool = False  # its shape is on the schema changes topic (see Connector._record_shape)

    def row(self, values: tuple, lsn: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, convert, raw in zip(self.names, self.converters, values):
            if convert is None:
                continue
            if raw is None:
                out[name] = None
                continue
            if raw is _UNCHANGED:
                out[name] = UNCHANGED
                continue
            try:
                out[name] = convert(raw)
            except Exception as exc:  # the message names the place, never the value (it may be private)
                raise DecodeError(
                    f"cannot decode column {name} of {self.ref} ({self.schema.column(name).type}) at LSN "
                    f"{format_lsn(lsn)}: {type(exc).__name__}"
                ) from None
        return out

class Connector:
    def __init__(self, config: PipelineConfig, stop: asyncio.Event | None = None, *, create_missing_slot: bool = False,
                 until_request: str | None = None):
        self.config = config
        self.until_request = until_request  # stop once this snapshot request is done (cdc snapshot)
        self.create_missing_slot = create_missing_slot  # a deliberate --create-slot: see run()
        self.stop_event = stop or asyncio.Event()
        self.catalog_conn: psycopg.Connection | None = None
        self.repl = ReplicationConnection(config.source.conninfo)
        self.publisher = Publisher(
            config.kafka, f"cdc-{config.pipeline}-connector", lambda counts, error: self.tracker.delivered(counts, error),
            stopping=self.stop_event.is_set, while_waiting=self._keep_source_alive, on_acknowledged=self._acknowledged,
        )
        self._table_of_topic = {config.topic_for(t): str(t) for t in config.source.tables}  # metrics labels
        self._commit_epoch = 0.0  # source commit time of the transaction being read, seconds since the epoch
        # Transient faults once streaming has begun (see run): the state operations can read.
        self.streamed = False
        self.source_outage = Outage("the source", config.source.retry, self.stop_event)  # component: connector
        self.kafka_outage = Outage("Kafka", config.kafka.retry, self.stop_event)
        self._last_status = 0.0  # time.monotonic() of the last standby status update
        self.tables: dict[int, TableInfo] = {}  # by table OID = pgoutput relation id
        self.privacy = PrivacyPlan({})
        self.streams: dict[int, TableStream | None] = {}  # relation id -> stream (None: not ours)
        # Column identity (see _column_identities): each relation's last version as name -> attnum,
        # and per table the names the catalog had at start by attnum (the policy is bound to those).
        self._identities: dict[int, dict[str, int]] = {}
        self._start_names: dict[TableRef, dict[int, str]] = {}
        self._renames_logged: set[tuple[TableRef, str, str]] = set()
        self._catalog_names: dict[int, str] = {}  # attnum -> name now, of the relation being described
        self._column_lists_changed: set[tuple[str, str]] = set()  # tables whose publication column list this start changed
        self._columns_after_ddl: dict[int, dict[str, int]] = {}  # relation id -> name -> attnum, from the event trigger
        # Per table, the shape last published on the schema changes topic (loaded at start).
        self._published_shapes: dict[TableRef, PublishedShape] = {}
        self.schema_changes_topic = schema_changes.topic_of(config.pipeline)
        self.tracker = AckTracker(0)
        self.db_name = ""
        self.origin = SourceOrigin("", 0, 0)  # set from IDENTIFY_SYSTEM at start
        self.topic_partitions: dict[str, int] = {}
        self.compacted_topics: set[str] = set()
        self.events_published = 0
        self._txn: Transaction | None = None
        self._txn_info: TransactionInfo | None = None
        self._txn_counts: dict[str, int] = {}  # events of the current transaction per topic
        self.transactions_topic = transactions_topic(config.pipeline)
        self._end_headers: list[tuple[str, bytes]] = []
        self._seq_lsn = -1  # LSN of the change record the last event came from
        self._seq = 0  # next index among the events of changes at _seq_lsn
        self._seq_lsn_text = ""
        self._received_lsn = 0
        self.snapshots: Snapshots | None = None
        self.message_prefix = message_prefix(config.source.slot)
        # What check() found: the slot (None: missing) and the topics' end offsets.
        self._slot_checked = False
        self._slot: SlotState | None = None
        self._ends: dict[tuple[str, int], int] = {}

    # -- set-up ---------------------------------------------------------------------------------

    # Every check comes before any side effect: a wrong broker address or a missing table must not
    # leave a slot behind pinning WAL, nor topics for tables that do not exist.

    async def check(self) -> None:
        """Every check of the source and of Kafka, creating nothing. `cdc run` calls it before it
        checks the sinks' targets; run() calls it when nobody did."""
        if self._slot_checked:
            return
        config = self.config
        slot = await asyncio.to_thread(self._check_source)
        ends = await end_offsets(config.kafka, self._topics())  # also: is Kafka reachable?
        await self._check_bindings()
        holding = sorted({topic for (topic, _), end in ends.items() if end > 0})
        if slot is None and holding and not self.create_missing_slot:
            raise WouldLoseDataError(
                f"{config.where('source', 'slot')}: replication slot {config.source.slot} does not exist, but "
                f"topic(s) {', '.join(holding)} hold events of this pipeline: the slot was dropped, and every "
                "change made since then is lost to it. To start a new slot anyway (changes made while it was "
                "missing stay missing downstream), run once with --create-slot"
            )
        self._slot, self._ends, self._slot_checked = slot, ends, True

    def _topics(self) -> list[str]:
        # The transactions topic goes with the table topics: its records close what they hold.
        return [self.config.topic_for(t) for t in self.config.source.tables] + [transactions_topic(self.config.pipeline)]

    async def run(self) -> None:
        """Stream until stopped. Once streaming has begun, a transient fault of the source or of Kafka
        is healed here: everything is torn down (what Kafka took is flushed, the rest is never
        confirmed) and streaming starts again from the slot's confirmed LSN, which re-sends events
        the sinks absorb by position. A fault at start-up, a fatal one, or an outage longer than
        `source.retry` / `kafka.retry` allow stops with its exit code (README: Faults and retries)."""
        await run_healing(self._run_once, lambda exc: self.kafka_outage if _kafka_fault(exc) else self.source_outage,
                          started=lambda: self.streamed, stop=self.stop_event, start_over=self._start_over)

    def _start_over(self) -> None:
        """A connector as at start, but for what outlives one connection: the outages, the offsets
        Kafka gave us (a broker that comes back empty must still be noticed) and the counters."""
        kept = (self.source_outage, self.kafka_outage, self.publisher.next_offsets, self.events_published)
        self.__init__(self.config, self.stop_event, create_missing_slot=self.create_missing_slot,  # type: ignore[misc]
                      until_request=self.until_request)
        self.source_outage, self.kafka_outage, next_offsets, self.events_published = kept
        self.publisher.next_offsets.update(next_offsets)
        self.streamed = True

    async def _run_once(self) -> None:
        config = self.config
        topics = self._topics()
        try:
            await self.check()
            slot, ends = self._slot, self._ends
            await asyncio.to_thread(self._ensure_publication)
            self.topic_partitions = await ensure_topics(config.kafka, topics)
            self.compacted_topics = await compacted_topics(config.kafka, topics)
            await ensure_topics(config.kafka, [state_topic(config), column_bindings.topic_of(config.pipeline),
                                               self.schema_changes_topic], compact=True)
            if slot is None:
                slot = await asyncio.to_thread(self.repl.create_slot, config.source.slot)
            self.tracker = AckTracker(slot.confirmed_flush_lsn)
            self._received_lsn = slot.confirmed_flush_lsn
            for tp, end in ends.items():  # never below an offset Kafka gave us before a reconnect
                self.publisher.next_offsets[tp] = max(self.publisher.next_offsets.get(tp, 0), end)
            await self.publisher.start()
            await self._record_bindings()
            await self._load_published_shapes()
            await self._prepare_snapshots()
            await self.repl.start(config.source.slot, config.source.publication)
            log.info("streaming slot %s from %s (%s)", config.source.slot, format_lsn(slot.confirmed_flush_lsn), self.origin)
            self.streamed = True
            self.source_outage.recovered()
            self.kafka_outage.recovered()
            self.snapshots.start()
            try:
                await self._stream()
            except psycopg.Error as exc:  # the catalog connection (new relations, types) while streaming
                raise source_failure("while streaming", exc, config.source.conninfo) from None
        finally:
            await self._shutdown()

    async def _prepare_snapshots(self) -> None:
        """Jobs from the recorded progress: the initial snapshot (unless `snapshot: never`) and
        on-demand requests a previous run had not finished."""
        config = self.config
        self.snapshots = Snapshots(
            config, self._relation_of, self._snapshot_columns,
            lambda txn: txn.committed and self.tracker.confirmed_lsn >= txn.end_lsn,
            lambda key, value: self.publisher.send_and_wait(state_topic(config), key, value),
            self._snapshot_row_filter,
        )
        progress = await load_progress(config)
        by_name = {str(t): t for t in config.source.tables}
        for (request, name), record in progress.items():
            if name in by_name and (request != INITIAL or config.source.snapshot == "initial"):
                self.snapshots.add(Job(request, by_name[name], record.get("where"), record.get("after_key"),
                                       record.get("until_key"), int(record.get("rows", 0)),
                                       done=bool(record.get("done"))))
        if config.source.snapshot == "initial":
            for table in config.source.tables:
                self.snapshots.add(Job(INITIAL, table))  # no-op for tables with a record above

    def _relation_of(self, table: TableRef) -> int:
        return next(oid for oid, info in self.tables.items() if info.ref == table)

    def _snapshot_stream(self, oid: int) -> TableStream | None:
        """The relation as the stream knows it, or as the catalog describes it now when no change of
        it has been streamed yet (pgoutput sends a Relation message before a relation's first change)."""
        stream = self.streams.get(oid)
        if stream is None:
            rel = self.catalog.relation(oid, self.config.source.publication)
            stream = self.streams[oid] = self._table_stream(rel, from_catalog=True)
        return stream

    def _snapshot_row_filter(self, table: TableRef) -> str | None:
        stream = self._snapshot_stream(self._relation_of(table))
        policy = stream.policy if stream is not None else None
        return policy.row_filter.sql() if policy is not None and policy.row_filter is not None else None

    def _snapshot_columns(self, table: TableRef) -> tuple[list[str], list[tuple[str, str]], set[str], list[int | None],
                                                          list[str]]:
        stream = self._snapshot_stream(self._relation_of(table))
        assert stream is not None
        dropped = {name for name, convert in zip(stream.names, stream.converters) if convert is None}
        columns = [stream.schema.column(n) for n in stream.names]  # chunks read columns by identity, and type
        return (list(stream.names), [(k, stream.schema.column(k).type) for k in stream.key_names], dropped,
                [c.attnum for c in columns], [c.type for c in columns])

    def _check_source(self) -> SlotState | None:
        """Connect, check tables, privileges and the slot; returns the slot, None if it is missing."""
        config = self.config
        try:
            # The same session settings as the walsender's, so loaders read its text the way it was printed.
            self.catalog_conn = psycopg.connect(config.source.conninfo, autocommit=True, options=SESSION_OPTIONS)
        except psycopg.Error as exc:  # one line, and never the password (libpq may quote the DSN)
            dsn = config.source.postgres
            raise connect_failure(f"{config.where('source', 'postgres')}: cannot connect to the source {redact(dsn)}",
                                  exc, dsn) from None
        self.catalog = Catalog(self.catalog_conn)
        self.values = ValueDecoder(self.catalog_conn)
        checked, self.privacy = check_source_and_privacy(config, self.catalog)
        self.tables = {info.oid: info for info in checked.values()}
        self._start_names = {ref: {c.attnum: c.name for c in plan.columns} for ref, plan in self.privacy.tables.items()}
        self.db_name = self.catalog_conn.info.dbname
        self.repl.open()
        system_id, timeline = self.repl.identify_system()
        self.origin = SourceOrigin(system_id, timeline, self.repl.timeline_start(timeline))
        self._end_headers = [(ORIGIN_HEADER, self.origin.to_json())]
        slot = self.repl.find_slot(config.source.slot)
        if slot is not None and slot.active_pid is not None and self.streamed and slot.holder == self.repl.application_name:
            # Our own walsender from before a reconnect, which has not noticed yet that we left.
            self.catalog_conn.execute("SELECT pg_terminate_backend(%s)", (slot.active_pid,))
            raise SourceLostError(f"slot {slot.name} is still held by this process's previous walsender (PID "
                                  f"{slot.active_pid}): ended it")
        if slot is not None and slot.active_pid is not None:
            raise AlreadyRunningError(
                f"pipeline {config.pipeline} is already running: slot {slot.name} is held by "
                + (f"{slot.holder[4:].replace('pid', 'PID', 1)}, the cdc process (its walsender on the source is PID "
                   f"{slot.active_pid}): stop it first" if slot.holder else
                   f"PID {slot.active_pid} on the source, a walsender of a client that is not cdc: stop that client first")
            )
        if slot is not None and slot.wal_status == "lost":
            raise WouldLoseDataError(
                f"replication slot {slot.name} was invalidated: PostgreSQL removed WAL it still needed "
                "(max_slot_wal_keep_size), so changes are missing. Drop it (SELECT pg_drop_replication_slot"
                f"('{slot.name}')) and start with --create-slot; the tables need a re-snapshot"
            )
        return slot

    def _ensure_publication(self) -> None:
        config = self.config
        try:
            self._column_lists_changed = ensure_publication(
                self.catalog_conn, config.source.publication, list(config.source.tables), self.privacy.publication())
        except psycopg.Error as exc:  # e.g. a role that may not alter the publication; names no value
            raise SourceError(
                f"{config.where('source', 'publication')}: cannot create or update publication "
                f"{config.source.publication}: {one_line(exc)}"
            ) from None

    async def _stream(self) -> None:
        interval = self.config.source.status_interval_s
        next_status = time.monotonic() + interval
        reported = -1
        busy_frames = 0
        while not self.stop_event.is_set():
            if self.tracker.error is not None:
                if isinstance(self.tracker.error, CdcError):  # ours, with its own message and exit code
                    raise self.tracker.error
                raise PublishError(f"Kafka did not acknowledge an event: {self.tracker.error!r}") from self.tracker.error
            if self.snapshots is not None:
                failure = self.snapshots.failed()
                if failure is not None:
                    raise failure
                if self.until_request and self.snapshots.requests_done.get(self.until_request, asyncio.Event()).is_set():
                    log.info("snapshot request %s is done", self.until_request)
                    return
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
                try:
                    message = pgoutput.decode(frame.payload, lsn=frame.start_lsn)
                    if len(frame.payload) > self.publisher.max_event_bytes:  # only then can an event be too large
                        self._refuse_oversized(message, frame.start_lsn)
                    failpoints.reached("connector.received")
                    await self._on_message(message, frame.start_lsn)
                except (DecodeError, EventRefusedError) as exc:
                    raise type(exc)(f"{exc}{self._skip_hint()}") from None
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

    def _refuse_oversized(self, msg: object, lsn: int) -> None:
        """Refuse a change whose event cannot fit a Kafka request, from the size of the text PostgreSQL
        sent, before any value is converted: converting a huge value (and encoding its event) would
        take several more copies of it before the publisher could refuse it."""
        if not isinstance(msg, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete)):
            return
        stream = self.streams.get(msg.relation_id)
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

    def _skip_hint(self) -> str:
        """How to get past a transaction that cannot be published (README: Skipping a transaction)."""
        if self._txn_info is None or self._txn is None:
            return ""
        # Logical decoding skips a transaction whose commit record starts before the confirmed LSN.
        past = format_lsn(self._txn_info.commit_lsn + 1)
        return (f". To publish nothing of transaction {self._txn_info.xid} (commit at {self._txn_info.commit_lsn_text}) "
                f"and go on, stop cdc and run: cdc connector FILE --skip-to-lsn {past}")

    async def _send_status(self) -> None:
        await self.repl.send_status(self._received_lsn, self.tracker.confirmed_lsn)
        failpoints.reached("connector.confirmed")
        self._last_status = time.monotonic()
        metrics.CONFIRMED_LSN.set(self.tracker.confirmed_lsn)

    def _acknowledged(self, topic: str, records: int, size: int, seconds: float) -> None:
        """Kafka acknowledged a batch: the published-events metrics (a table's tombstones count as its records)."""
        metrics.PRODUCE_LATENCY.observe(seconds)
        table = self._table_of_topic.get(topic)
        if table is not None:
            metrics.EVENTS_PUBLISHED.labels(table=table).inc(records)
            metrics.BYTES_PUBLISHED.labels(table=table).inc(size)

    async def _keep_source_alive(self) -> None:
        """While the publisher waits for Kafka: a standby status update (the confirmed LSN unchanged)
        every status interval, so the walsender does not end the connection at wal_sender_timeout
        and a broker outage is never taken for a source failure."""
        if self.repl.streaming and time.monotonic() - self._last_status >= self.config.source.status_interval_s:
            await self._send_status()

    async def _shutdown(self) -> None:
        flushed = False
        if self.snapshots is not None:
            await self.snapshots.stop()
        try:
            flushed = self.tracker.error is None and await self.publisher.flush(timeout_s=SHUTDOWN_FLUSH_S)
            # Then tell PostgreSQL how far Kafka has everything (delivery callbacks have run by now).
            if flushed and self.repl.streaming:
                try:
                    await self._send_status()
                except Exception:  # the stream may already be gone; the slot keeps the last position
                    log.debug("final status update failed", exc_info=True)
        finally:
            await self.publisher.stop(abandon=not flushed)
            if self.repl.streaming:
                log.info("stopped streaming slot %s: confirmed up to %s (a restart continues from there)",
                         self.config.source.slot, format_lsn(self.tracker.confirmed_lsn),
                         extra={"lsn": format_lsn(self.tracker.confirmed_lsn)})
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
            self._commit_epoch = msg.commit_time.timestamp()
            self._txn_counts = {}
        elif isinstance(msg, pgoutput.Commit):
            assert self._txn is not None, "Commit without Begin"
            if self._txn_counts:
                await self._publish_end()
                metrics.COMMIT_TO_PUBLISH.set(max(time.time() - self._commit_epoch, 0.0))
            self.tracker.commit(self._txn, msg.end_lsn)
            self._txn = None
        elif isinstance(msg, pgoutput.Relation):
            self.streams[msg.relation_id] = await asyncio.to_thread(self._table_stream, msg)
        elif isinstance(msg, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete)):
            stream = self._stream_for(msg.relation_id, lsn)
            if stream is not None:
                events = self._row_events(stream, msg, lsn)
                if self.snapshots is not None and self.snapshots.windows_open:
                    for event in events:  # a snapshot chunk must not publish an older state of these rows
                        self.snapshots.note_change(msg.relation_id, hashable_key(event.key))
                        if event.before is not None:
                            self.snapshots.note_change(msg.relation_id, hashable_key(build.key_of(event.before, stream.key_names)))
                for event in events:
                    await self._publish(stream, event)
        elif isinstance(msg, pgoutput.Truncate):
            for relation_id in msg.relation_ids:
                stream = self._stream_for(relation_id, lsn)
                if stream is not None:
                    if self.snapshots is not None:
                        self.snapshots.note_truncate(relation_id)
                    self._seq_lsn = -1  # one TRUNCATE record, one event per table: each is seq 0 in its own topic
                    event = self._event("t", None, None, None, lsn)
                    for partition in range(stream.partitions):  # every partition holds rows of the table
                        await self._publish(stream, event, partition)
        elif isinstance(msg, pgoutput.Message):
            if msg.prefix == self.message_prefix and self.snapshots is not None:
                await self._on_our_message(msg, lsn)
            elif msg.prefix == COLUMNS_MESSAGE_PREFIX and msg.transactional:
                self._note_columns(msg.content)
        elif isinstance(msg, (pgoutput.Origin, pgoutput.Type)):
            pass  # Type: we describe types from the catalog; Origin: not part of row state
        else:
            raise DecodeError(f"unexpected message {type(msg).__name__} at LSN {format_lsn(lsn)}")

    async def _on_our_message(self, msg: pgoutput.Message, lsn: int) -> None:
        """A snapshot watermark or an on-demand snapshot request (see cdc.snapshot)."""
        assert self.snapshots is not None
        try:
            payload = orjson.loads(msg.content)
        except orjson.JSONDecodeError:
            log.warning("ignoring an unreadable message with prefix %s at LSN %s", msg.prefix, format_lsn(lsn))
            return
        if isinstance(payload, dict) and "request" in payload:
            wanted = set(payload.get("tables") or ())
            for table in self.config.source.tables:
                if str(table) in wanted:
                    self.snapshots.add(Job(str(payload["request"]), table, payload.get("where")))
            return
        chunk = self.snapshots.on_watermark(msg.content)
        if chunk is not None:
            await self._publish_chunk(chunk, lsn)

    async def _publish_chunk(self, chunk: Chunk, lsn: int) -> None:
        """The chunk's rows that no change inside its window touched, as r events at this place."""
        assert chunk.published is not None and chunk.read is not None
        stream = self._snapshot_stream(self._relation_of(chunk.job.table))
        if stream is None or list(stream.names) != chunk.columns or [c.type for c in stream.schema.columns] != chunk.types:
            chunk.published.set_result(None)  # the table changed shape: read the range again
            return
        if not chunk.truncated:
            changed = chunk.changed
            for raw in chunk.read.rows:
                after = stream.row(raw, lsn)
                if stream.policy is not None:  # masks as streamed rows; PostgreSQL applied the row filter
                    after = stream.policy.map_row(after)
                key = build.key_of(after, stream.key_names)  # as published, like the keys noted from the stream
                if changed and hashable_key(key) in changed:
                    continue
                await self._publish(stream, self._event("r", None, after, key, lsn, snapshot=True))
                chunk.emitted += 1
        chunk.published.set_result(self._txn)

    def _stream_for(self, relation_id: int, lsn: int) -> TableStream | None:
        try:
            return self.streams[relation_id]
        except KeyError:
            raise DecodeError(f"change for relation {relation_id} at LSN {format_lsn(lsn)} before its Relation message") from None

    def _table_stream(self, rel: pgoutput.Relation, *, from_catalog: bool = False) -> TableStream | None:
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
        policy = self.privacy.policy(ref)
        if rel.replica_identity != "f":
            # Checked at start too, but the identity can change while we run, or a column that may
            # be stored out of line can be added: say so now, not when an UPDATE arrives.
            toastable = [c for c in self.catalog.toastable_columns(info.oid) if c in names and (policy is None or policy.passes(c))]
            if toastable:
                log.warning(
                    "%s: %s no longer has REPLICA IDENTITY FULL; an UPDATE that leaves %s unchanged is "
                    "published with those columns listed in `unchanged` and absent from `after` "
                    "(ALTER TABLE %s REPLICA IDENTITY FULL restores full rows for later changes)",
                    self.config.table_location(ref), ref, ", ".join(toastable), ref,
                )
        attnums = self._column_identities(rel, ref)
        columns, converters = [], []
        old_rows_hold = self.catalog.missing_values(rel.relation_id)  # values of rows older than an added column
        for col, attnum in zip(rel.columns, attnums):
            desc = self.catalog.describe_type(col.type_oid, col.type_modifier)
            convert = self.values.converter(desc)
            default = None
            if col.name in old_rows_hold:
                try:
                    default = convert(old_rows_hold[col.name].encode("utf-8"))
                except Exception as exc:  # names the place, never the value
                    raise DecodeError(
                        f"cannot decode the default of column {col.name} of {ref} ({desc.type}): {type(exc).__name__}"
                    ) from None
            columns.append(
                Column(col.name, desc.type, desc.kind, desc.array, col.name not in info.not_null, desc.builtin, default,
                       attnum)
            )
            converters.append(convert)
        schema = TableSchema(ref.schema, ref.name, tuple(columns), info.primary_key)
        published = schema
        if policy is not None:  # the header describes columns as published: a sink never sees a dropped one
            policy = self._policy_by_identity(ref, policy, names, attnums)
            try:
                policy = policy.bind(schema)
            except FilterError as exc:
                raise SourceError(f"{self.config.privacy_where(ref, 'rows')}: {ref}: row filter {exc}") from None
            published = policy.published_schema(schema)
            needed = set(policy.row_filter.columns) if policy.row_filter is not None else set()
            converters = [c if policy.passes(n) or n in needed or n in info.primary_key else None
                          for n, c in zip(names, converters)]
        self._reread_if_rewritten(rel.relation_id, ref, schema, published, from_catalog)
        topic = self.config.topic_for(ref)
        return TableStream(
            ref=ref, topic=topic, schema=schema, names=names,
            converters=tuple(converters), key_names=info.primary_key,
            headers=[(SCHEMA_HEADER, published.to_json()), (ORIGIN_HEADER, self.origin.to_json())],
            partitions=self.topic_partitions[topic], compacted=topic in self.compacted_topics, policy=policy,
            published=published,
        )

    def _reread_if_rewritten(self, relation_id: int, table: TableRef, schema: TableSchema, published: TableSchema,
                             from_catalog: bool) -> None:
        """A column that changed type in a way that may have changed its values (anything but a
        widening, see keeps_values: e.g. ALTER ... TYPE integer USING length(d)) was rewritten by
        the source without a row change in the WAL. Request an on-demand snapshot of the table, as
        `cdc snapshot` does: its r events, after this change, carry the values the source computed,
        and the sinks rewrite the column from them. The request is in the WAL before this
        transaction can be confirmed, and before the new shape is recorded on the schema changes
        topic (see _record_shape), so a crash cannot lose it.

        The first description of a table in a run has no earlier one to compare with: it is compared
        with the shape last published (the sinks' view, so by published type), when it is newer than
        that: a change made while the connector was down, or before a kill."""
        previous = self.streams.get(relation_id)
        if previous is not None:
            old, new = previous.schema, schema
        else:
            last = self._published_shapes.get(table)
            if last is None:
                return  # nothing published of the table yet
            if not from_catalog and (self._txn_info is None or self._txn_info.commit_lsn <= last.position.commit_lsn):
                return  # a change up to the last recorded one, read again after a restart: compared then
            old, new = last.schema, published
        old_types = {c.attnum: c.type for c in old.columns if c.attnum is not None}
        rewritten = [c.name for c in new.columns
                     if c.attnum in old_types and not keeps_values(old_types[c.attnum], c.type)]
        if rewritten:
            request, _ = request_snapshot(self.config, [table], None)
            log.warning("%s: the type of %s changed (the source rewrote the values); re-reading the table "
                        "(snapshot request %s) so that the sinks get the new values", table,
                        ", ".join(rewritten), request)

    async def _load_published_shapes(self) -> None:
        """The shape last published per table (the schema changes topic keeps the last record of each)."""
        by_name = {(t.schema, t.name): t for t in self.config.source.tables}
        for value in (await latest_per_key(self.config.kafka, self.schema_changes_topic)).values():
            try:
                shape = schema_changes.decode(value)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable record on %s", self.schema_changes_topic)
                continue
            table = by_name.get((shape.schema.schema, shape.schema.table))
            if table is not None:
                self._published_shapes[table] = shape

    async def _record_shape(self, stream: TableStream, first: ChangeEvent) -> None:
        """Before the first event of a relation version: if its published shape is not the one last
        published for the table, publish the change on the schema changes topic, with the position
        of `first`, and wait for Kafka to acknowledge it, so it is there before any event of that shape."""
        assert stream.published is not None
        last = self._published_shapes.get(stream.ref)
        if last is not None and first.position <= last.position:
            return  # re-sent after a restart: the shapes of events up to there were recorded then
        stream.shape_recorded = True
        if last is not None and schema_changes.same_shape(last.schema, stream.published):
            return
        value = schema_changes.encode(self.config.pipeline, self.db_name, stream.topic,
                                      last.schema if last is not None else None, stream.published, first)
        await self.publisher.send_and_wait(self.schema_changes_topic,
                                           schema_changes.record_key(stream.ref.schema, stream.ref.name), value,
                                           [(ORIGIN_HEADER, self.origin.to_json())])
        self._published_shapes[stream.ref] = PublishedShape(first.position, stream.published)
        if last is not None:
            log.info("%s changed shape at %s: %s", stream.ref, first.position,
                     "; ".join(_describe_change(c) for c in schema_changes.changes(last.schema, stream.published)))

    async def _check_bindings(self) -> None:
        """Refuse rules whose name named another column at the last start (see cdc.column_bindings)."""
        last = await column_bindings.load(self.config)
        problems = []
        for ref, plan in self.privacy.tables.items():
            if plan.policy is not None:
                now = {c.attnum: c.name for c in plan.columns}
                problems += column_bindings.problems(self.config, ref, plan.info.oid, now, last.get(str(ref)))
        if problems:
            raise SourceError("\n".join(problems))

    async def _record_bindings(self) -> None:
        """What each rule means as of this start, for the next start to compare with."""
        topic = column_bindings.topic_of(self.config.pipeline)
        for ref, plan in self.privacy.tables.items():
            if plan.policy is not None:
                value = column_bindings.record(plan.info.oid, {c.name: c.attnum for c in plan.columns})
                await self.publisher.send_and_wait(topic, str(ref).encode(), value)

    def _note_columns(self, content: bytes) -> None:
        """A table's columns after an ALTER TABLE, from the event trigger of sql/column_identity.sql."""
        try:
            payload = orjson.loads(content)
            self._columns_after_ddl[int(payload["oid"])] = {str(n): int(a) for a, n in payload["columns"] or ()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring an unreadable %s message", COLUMNS_MESSAGE_PREFIX)

    def _column_identities(self, rel: pgoutput.Relation, ref: TableRef) -> list[int]:
        """The attnum of each of the Relation message's columns (see resolve_attnums); stops with
        ColumnIdentityError, before the change is published, where that is not conclusive."""
        live, dropped, self._catalog_names = self.catalog.live_columns(rel.relation_id, self.config.source.publication)
        previous = self._identities.get(rel.relation_id)
        names = [c.name for c in rel.columns]
        after_ddl = self._columns_after_ddl.get(rel.relation_id)
        if after_ddl is not None and all(n in after_ddl for n in names):
            # The event trigger described the table as this change sees it: the last ALTER TABLE before it.
            attnums = [after_ddl[n] for n in names]
            if all(a < b for a, b in zip(attnums, attnums[1:])):
                self._identities[rel.relation_id] = dict(zip(names, attnums))
                return attnums
        try:
            attnums = resolve_attnums(names, [c.type_oid for c in rel.columns], live, dropped, previous,
                                      exact_prefix=(ref.schema, ref.name) not in self._column_lists_changed)
        except ColumnIdentityError as exc:
            at = f" at commit {self._txn_info.commit_lsn_text}" if self._txn_info is not None else ""
            skip = (f"; or, to publish nothing of that transaction, stop and run: cdc connector FILE --skip-to-lsn "
                    f"{format_lsn(self._txn_info.commit_lsn + 1)}") if self._txn_info is not None else ""
            raise ColumnIdentityError(
                f"{self.config.table_location(ref)}: cannot tell which columns of {ref} a change{at} holds "
                f"(columns then: {', '.join(names)}; now: {', '.join(c.name for c in live)}): {exc}. Nothing of "
                "it was published. Name the columns in the privacy policy as they are now and restart (a change "
                f"older than the schema change is then read by position where that is exact){skip}"
            ) from None
        self._identities[rel.relation_id] = dict(zip(names, attnums))
        return attnums

    def _policy_by_identity(self, ref: TableRef, policy: TablePolicy, names: tuple[str, ...],
                            attnums: list[int]) -> TablePolicy:
        """The start's policy (bound to names as the catalog had them at start) for this relation
        version: a renamed column keeps its fate, a column added since gets the one its name gives
        (an include list blocks it). Logs a rename of a column the pipeline file names, once."""
        at_start = self._start_names.get(ref, {})
        passing, masks, renamed = [], {}, {}
        for name, attnum in zip(names, attnums):
            start_name = at_start.get(attnum)
            if start_name is None:  # added since start
                passes = policy.include is None and policy.passes(name)
                mask = policy.masks.get(name)
            else:
                passes, mask = policy.passes(start_name), policy.masks.get(start_name)
                if start_name != name:
                    renamed[start_name] = name
                    self._log_rename(ref, start_name, name)
            if passes:
                passing.append(name)
                if mask is not None:
                    masks[name] = mask
        for attnum, start_name in at_start.items():  # renamed, but out of the stream (a publication column list)
            now = self._catalog_names.get(attnum)
            if attnum not in attnums and now is not None and now != start_name:
                self._log_rename(ref, start_name, now)
        # The row filter follows its columns too: it names them as they are in this version.
        row_filter = policy.row_filter.renamed(renamed) if policy.row_filter is not None else None
        return replace(policy, include=frozenset(passing), exclude=frozenset(), masks=masks, row_filter=row_filter)

    def _log_rename(self, ref: TableRef, old: str, new: str) -> None:
        if (ref, old, new) in self._renames_logged:
            return
        self._renames_logged.add((ref, old, new))
        line = column_bindings.rule_line(self.config, ref, old)
        if line is None:
            return  # the pipeline file does not name it: nothing to update
        where, fate = line
        log.warning("%s: column %s of %s was renamed to %s; it keeps its policy (%s). Write its new name %s "
                    "there: a restart refuses the old one", where, old, ref, new, fate, new)

    def _event(self, op: str, before, after, key, lsn: int, unchanged: tuple[str, ...] = (), *,
               snapshot: bool = False) -> ChangeEvent:
        assert self._txn_info is not None, "row change outside a transaction"
        # The position depends on the WAL alone: changes sharing one record (the rows of a
        # COPY) all belong to one table, so their order among the events of that LSN does not
        # depend on which tables the pipeline captures.
        if lsn != self._seq_lsn:
            self._seq_lsn, self._seq, self._seq_lsn_text = lsn, 0, format_lsn(lsn)
        position = Position(self._txn_info.commit_lsn, lsn, self._seq)
        self._seq += 1
        return ChangeEvent(op, before, after, key, position, self._seq_lsn_text, self._txn_info, unchanged, snapshot)

    def _row_events(self, stream: TableStream, msg, lsn: int) -> list[ChangeEvent]:
        keys = stream.key_names
        if isinstance(msg, pgoutput.Insert):
            built = build.insert_events(stream.row(msg.new, lsn), keys)
        elif isinstance(msg, pgoutput.Delete):
            full = msg.old is not None  # 'O': full before-image (REPLICA IDENTITY FULL); else 'K': the key
            built = build.delete_events(stream.row(msg.old if full else msg.key, lsn), full, keys)
        else:
            # 'O' (full before-image) or 'K' (old key, sent when the key changed), or neither.
            if msg.old is not None:
                old = stream.row(msg.old, lsn)
            else:
                old = build.key_of(stream.row(msg.key, lsn), keys) if msg.key is not None else None
            try:
                built = build.update_events(stream.row(msg.new, lsn), old, keys)
            except build.KeyNotSent as exc:
                raise DecodeError(
                    f"UPDATE of {stream.ref} at LSN {format_lsn(lsn)} did not resend key column(s) {exc} and no "
                    f"before-image holds them; skip it with: cdc connector FILE --skip-to-lsn (see the README)"
                ) from None
            if built[-1].unchanged:
                stream.partial_updates += 1
        events = [self._event(e.op, e.before, e.after, e.key, lsn, e.unchanged) for e in built]
        if stream.policy is not None:
            # After positions are taken: an event the filter drops keeps its seq, so positions do
            # not depend on the policy.
            try:
                events = [e for e in stream.policy.apply(events) if e is not None]
            except FilterError as exc:
                raise DecodeError(f"{exc} (at LSN {format_lsn(lsn)})") from None
        return events

    async def _publish(self, stream: TableStream, event: ChangeEvent, partition: int = 0) -> None:
        # Topics have one partition (see KafkaConfig.partitions): every event of a table, in order.
        assert self._txn is not None
        try:
            value = event.encode_value(self.config.pipeline, self.db_name, stream.ref.schema, stream.ref.name)
        except orjson.JSONEncodeError:  # converters return JSON values; this names the place if one did not
            raise DecodeError(
                f"cannot encode an event of {stream.ref} at LSN {event.lsn_text} as JSON: column(s) "
                f"{', '.join(_unencodable(event.after or event.before or {}))} (please report this type)"
            ) from None
        if not stream.shape_recorded:
            await self._record_shape(stream, event)
        key = event.encode_key()
        if key is None and stream.compacted:
            key = TRUNCATE_KEY  # a compacted topic refuses records without a key
        await self.publisher.publish(stream.topic, partition, key, value, stream.headers, self._txn)
        self.tracker.sent(self._txn)
        self.events_published += 1
        failpoints.reached("connector.published")
        if event.op == "d" and stream.compacted:
            # A tombstone lets compaction drop the key for good; sinks skip it (no value).
            await self.publisher.publish(stream.topic, partition, key, None, [], self._txn)
            self.tracker.sent(self._txn)
        self._txn_counts[stream.topic] = self._txn_counts.get(stream.topic, 0) + 1

    async def _publish_end(self) -> None:
        """Close the transaction on the transactions topic: what it published, per topic. Owned by the
        transaction like its events, so its commit LSN is confirmed only once Kafka has this too."""
        assert self._txn is not None and self._txn_info is not None
        key, value = encode_end(self.config.pipeline, self.db_name, self._txn_info, self._txn_counts)
        await self.publisher.publish(self.transactions_topic, 0, key, value, self._end_headers, self._txn)
        self.tracker.sent(self._txn)


def _kafka_fault(exc: BaseException) -> bool:
    """Whether a transient fault was Kafka's (else the source's): which retry ceiling applies."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (PublishError, KafkaError)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _describe_change(change: dict[str, Any]) -> str:
    """One change of a schema change record, for the log: names and types only ("b retyped integer -> bigint")."""
    text = " ".join(str(change[k]) for k in ("column", "change") if k in change)
    if "from" in change:
        text += f" {change['from']} -> {change['to']}"
    return text + (" (widening)" if change.get("widening") else "")



def _unencodable(row: dict[str, Any]) -> list[str]:
    bad = []
    for name, value in row.items():
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            bad.append(name)
    return bad


def request_snapshot(config: PipelineConfig, tables: list[TableRef], where: str | None) -> tuple[str, bool]:
    """Write an on-demand snapshot request into the source's WAL, for the pipeline's connector.

    Checks `where` against every table first (exit 2 on a filter the server refuses; nothing is
    written then). Returns the request id, and whether a connector holds the slot now."""
    import uuid

    from psycopg import sql

    from cdc.source.postgres.snapshot import check_filter

    with psycopg.connect(config.source.conninfo, autocommit=True) as conn:
        if where is not None:
            for table in tables:
                problem = check_filter(conn, sql.Identifier(table.schema, table.name), where)
                if problem:
                    raise SourceError(f"--where does not work on {table}: {problem}")
        request = uuid.uuid4().hex[:12]
        payload = {"request": request, "tables": [str(t) for t in tables], "where": where}
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s::text)",
                     (message_prefix(config.source.slot), orjson.dumps(payload).decode()))
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                           (config.source.slot,)).fetchone()
    return request, row is not None and row[0] is not None


def slot_position(config: PipelineConfig) -> int:
    """The slot's confirmed LSN; refuses a missing slot or one a running connector holds."""
    with psycopg.connect(config.source.conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (config.source.slot,),
        ).fetchone()
    if row is None:
        raise SourceError(f"{config.where('source', 'slot')}: replication slot {config.source.slot} does not exist")
    if row[1] is not None:
        raise AlreadyRunningError(f"pipeline {config.pipeline} is running: slot {config.source.slot} is held by PID {row[1]}; stop it first")
    return parse_lsn(row[0])


def skip_slot_to(config: PipelineConfig, lsn: int) -> int:
    """Confirm the slot up to `lsn` without publishing what lies before it: the deliberate way past a
    transaction that cannot be published. Refuses to move the slot backwards (PostgreSQL cannot)."""
    confirmed = slot_position(config)
    if lsn < confirmed:
        raise SourceError(
            f"--skip-to-lsn {format_lsn(lsn)} is behind slot {config.source.slot}'s confirmed position "
            f"{format_lsn(confirmed)}: a slot cannot go back"
        )
    with psycopg.connect(config.source.conninfo, autocommit=True) as conn:
        (moved,) = conn.execute(
            "SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)", (config.source.slot, format_lsn(lsn))
        ).fetchone()
    return parse_lsn(moved)
