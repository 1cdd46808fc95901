"""The connector's life: check, start, stream, heal, stop. It wires the stages and runs them:

    ReplicationConnection.read_data    XLogData / keepalive frames                (source.postgres.replication)
      -> pgoutput.decode               Begin, Relation, Insert, Update, ...        (stream: one handler per type)
      -> Tables                        relation -> TableStream: columns, policy    (tables)
      -> changes.row_events            rows as JSON values, full `after`, key,     (changes, positions)
                                       position; privacy filter
      -> EventPublishing.publish       record batches per topic partition, acks=all (publishing, publish.kafka)
      -> AckTracker.confirmed_lsn      sent back in standby status updates          (confirm)

Snapshot chunks enter at the stream (their watermarks are messages in it) and leave through the
same build, filter and publish stages (snapshots). Only LSNs whose events Kafka acknowledged are
confirmed (see cdc.connector.confirm).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from aiokafka.errors import KafkaError

from cdc.config import PipelineConfig
from cdc.connector.startup import (
    CheckedSource, check_bindings, check_missing_slot, check_source, publication, record_bindings,
)
from cdc.connector.confirm import StatusUpdates
from cdc.connector.positions import Positions
from cdc.connector.publishing import EventPublishing, acknowledged_metrics
from cdc.connector.shapes import PublishedShapes
from cdc.connector.snapshots import SnapshotFeed
from cdc.connector.stream import Stream
from cdc.connector.tables import Tables, TopicLayout
from cdc.errors import PublishError
from cdc.events import schema_changes, schema_ids
from cdc.events.transaction import topic_of as transactions_topic
from cdc.lsn import format_lsn
from cdc.publish.admin import end_offsets, ensure_topic_layout
from cdc.publish.kafka import Publisher
from cdc.retry import Outage, run_healing
from cdc.snapshots.progress import state_topic
from cdc.verify import records as verify_records
from cdc.source.postgres.replication import ReplicationConnection, source_failure
from cdc.transform import column_bindings

log = logging.getLogger(__name__)

T = TypeVar("T")

SHUTDOWN_FLUSH_S = 15.0  # how long a stop waits for Kafka to acknowledge what was sent (README: Stopping)


class Connector:
    def __init__(self, config: PipelineConfig, stop: asyncio.Event | None = None, *, create_missing_slot: bool = False,
                 until_request: str | None = None, once_slot_exists: Callable[[], None] | None = None):
        self.config = config
        self.until_request = until_request  # stop once this snapshot request is done (cdc snapshot)
        # Run once the slot exists, before streaming: `cdc snapshot` of a new pipeline writes its request
        # then, so that the request follows the slot's start in the WAL.
        self.once_slot_exists = once_slot_exists
        self.create_missing_slot = create_missing_slot  # a deliberate --create-slot: see run()
        self.stop_event = stop or asyncio.Event()
        self.repl = ReplicationConnection(config.source.conninfo)
        self.positions = Positions()
        self.status = StatusUpdates(self.repl, self.positions, config.source.status_interval_s)
        self.publisher = Publisher(
            config.kafka, f"cdc-{config.pipeline}-connector",
            lambda counts, error: self.positions.tracker.delivered(counts, error),
            stopping=self.stop_event.is_set, while_waiting=self.status.keep_source_alive,
            on_acknowledged=acknowledged_metrics(config),
        )
        # Transient faults once streaming has begun (see run): the state operations can read.
        self.streamed = False
        self.source_outage = Outage("the source", config.source.retry, self.stop_event)  # component: connector
        self.kafka_outage = Outage("Kafka", config.kafka.retry, self.stop_event)
        self.source: CheckedSource | None = None  # what check() found
        self._ends: dict[tuple[str, int], int] = {}  # the topics' end offsets at check()
        self.snapshots: SnapshotFeed | None = None

    async def check(self) -> None:
        """Every check of the source and of Kafka, creating nothing. `cdc run` calls it before it
        checks the sinks' targets; run() calls it when nobody did."""
        if self.source is not None:
            return
        config = self.config
        source = await asyncio.to_thread(check_source, config, self.repl, self.streamed)
        try:
            ends = await end_offsets(config.kafka, self._topics())  # also: is Kafka reachable?
            await check_bindings(config, source.privacy)
            check_missing_slot(config, source.slot, ends, self.create_missing_slot)
        except BaseException:
            source.conn.close()
            raise
        self.source, self._ends = source, ends

    def close_source(self) -> None:
        """After a failed check: the next attempt connects again."""
        self.repl.close()
        if self.source is not None:
            self.source.conn.close()
            self.source = None

    def _topics(self) -> list[str]:
        # The transactions topic goes with the table topics: its records close what they hold.
        return [self.config.topic_for(t) for t in self.config.source.tables] + [transactions_topic(self.config.pipeline)]

    async def run(self) -> None:
        """Stream until stopped. Once streaming has begun, a transient fault of the source or of Kafka
        is healed here: everything is torn down (what Kafka took is flushed, the rest is never
        confirmed) and streaming starts again from the slot's confirmed LSN, which re-sends events
        the sinks absorb by position. A fault at start-up, a fatal one, or an outage longer than
        `source.retry` / `kafka.retry` allow stops with its exit code (README: Faults and retries)."""
        await run_healing(self._run_once, lambda exc: self.kafka_outage if kafka_fault(exc) else self.source_outage,
                          started=lambda: self.streamed, stop=self.stop_event, start_over=self._start_over)

    def _start_over(self) -> None:
        """A connector as at start, but for what outlives one connection: the outages and the offsets
        Kafka gave us (a broker that comes back empty must still be noticed)."""
        kept = (self.source_outage, self.kafka_outage, self.publisher.next_offsets)
        self.__init__(self.config, self.stop_event, create_missing_slot=self.create_missing_slot,  # type: ignore[misc]
                      until_request=self.until_request, once_slot_exists=self.once_slot_exists)
        self.source_outage, self.kafka_outage, next_offsets = kept
        self.publisher.next_offsets.update(next_offsets)
        self.streamed = True

    async def _run_once(self) -> None:
        config = self.config
        topics = self._topics()
        try:
            await self.check()
            source, ends = self.source, self._ends
            assert source is not None
            column_lists_changed = await asyncio.to_thread(publication, config, source)
            layout = TopicLayout(*await ensure_topic_layout(
                config.kafka, topics, [state_topic(config), column_bindings.topic_of(config.pipeline),
                                       schema_changes.topic_of(config.pipeline), schema_ids.topic_of(config.pipeline),
                                       verify_records.results_topic(config.pipeline)]))
            for tp, end in ends.items():  # never below an offset Kafka gave us before a reconnect
                self.publisher.next_offsets[tp] = max(self.publisher.next_offsets.get(tp, 0), end)
            shapes = PublishedShapes(config, self.publisher)
            tables = Tables(config, source.catalog, source.values, source.tables, source.privacy, source.origin,
                            layout, shapes, self.positions, column_lists_changed)
            publishing = EventPublishing(config, self.publisher, self.positions, shapes, source.db_name, source.origin)
            self.snapshots = SnapshotFeed(config, tables, self.positions, publishing, self.publisher)
            # The slot (once the topics exist), the producer and what the pipeline's state topics say:
            # independent round trips, waited for together. Nothing is published before all are done.
            slot_ready = (asyncio.to_thread(self.repl.create_slot, config.source.slot) if source.slot is None
                          else _value(source.slot))
            slot, *_ = await _together(slot_ready, self.publisher.start(), shapes.load(source.db_name, source.origin),
                                       self.snapshots.load_jobs())
            self.positions.start_at(slot.confirmed_flush_lsn)
            if self.once_slot_exists is not None:
                await asyncio.to_thread(self.once_slot_exists)
                self.once_slot_exists = None  # once: a start over after a fault finds it in the WAL
            await record_bindings(config, source.privacy, self.publisher)
            stream = Stream(config, self.stop_event, self.repl, self.publisher, self.positions, self.status, tables,
                            publishing, self.snapshots, self.until_request)
            await self.repl.start(config.source.slot, config.source.publication)
            log.info("streaming slot %s from %s (%s)", config.source.slot, format_lsn(slot.confirmed_flush_lsn),
                     source.origin)
            self.streamed = True
            self.source_outage.recovered()
            self.kafka_outage.recovered()
            self.snapshots.jobs.start()
            try:
                await stream.run()
            except psycopg.Error as exc:  # the catalog connection (new relations, types) while streaming
                raise source_failure("while streaming", exc, config.source.conninfo) from None
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        flushed = False
        tracker = self.positions.tracker
        if self.snapshots is not None:
            await self.snapshots.jobs.stop()
        try:
            flushed = tracker.error is None and await self.publisher.flush(timeout_s=SHUTDOWN_FLUSH_S)
            # Then tell PostgreSQL how far Kafka has everything (delivery callbacks have run by now).
            if flushed and self.repl.streaming:
                try:
                    await self.status.send()
                except Exception:  # the stream may already be gone; the slot keeps the last position
                    log.debug("final status update failed", exc_info=True)
        finally:
            await self.publisher.stop(abandon=not flushed)
            if self.repl.streaming:
                log.info("stopped streaming slot %s: confirmed up to %s (a restart continues from there)",
                         self.config.source.slot, format_lsn(tracker.confirmed_lsn),
                         extra={"lsn": format_lsn(tracker.confirmed_lsn)})
            self.repl.close()
            if self.source is not None:
                self.source.conn.close()


async def _together(*steps: Awaitable[Any]) -> list[Any]:
    """Run start-up steps at once; each finishes (none is left running into the teardown) before
    the first failure in argument order is raised, the one the steps one after another would raise."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _value(value: T) -> T:
    return value


def kafka_fault(exc: BaseException) -> bool:
    """Whether a transient fault was Kafka's (else the source's): which retry ceiling applies."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (PublishError, KafkaError)):
            return True
        current = current.__cause__ or current.__context__
    return False
