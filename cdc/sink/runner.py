"""The sink: Kafka topics -> row state in a target database, each change applied exactly once.

A sink is three stages wired together here, each in a module of its own:

    consume   cdc.sink.consume      PartitionReader: manual assignment at the offsets stored in the
                                    target, checked against the broker (lost data), then fetches
    assemble  cdc.sink.assemble     BatchBuilder: parse, source-history guard (cdc.sink.guards),
                                    skip positions at or below the stored one, collapse per key;
                                    `apply: transactional`: whole source transactions first, held
                                    by cdc.sink.transactions (the one judge of completeness)
    apply     cdc.sink.apply        Applier: rows + positions per topic partition in ONE target
                                    transaction through the database's backend (cdc.sink.backends;
                                    a MySQL/MariaDB backend plugs in there), compared-and-set
                                    against the positions this process saw

Positions have one owner, cdc.sink.positions: loaded from the target at start, committed after each
target transaction; the stages above only read them. Target.lock keeps one process per sink and
target, for the life of the sink. Transient faults (target or Kafka away) are healed by run(): a
new attempt opens the target and the consumer again and resumes from the stored positions.

With `on_error: dlq`, a change the target refuses for its data goes to the sink's dead-letter topic
instead, and later changes of its key wait there (cdc.sink.dead_letters, README "Dead letters").

Repeats (a restarted connector or sink) are absorbed by the position check. A broker that no
longer has what the sink stored stops the sink with KafkaDataMissingError (cdc.sink.consume).

Over 400 lines: the loop in both apply modes, with and without dead letters, and where verification
control records take their turn in it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import ChainMap
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import PipelineConfig
from cdc.errors import RowRejectedError, SinkConflictError, SinkError, TargetError
from cdc.events.origin import SourceOrigin
from cdc.events.schema import TableSchema
from cdc.events.transaction import End, decode_end, topic_of as transactions_topic
from cdc.lsn import format_lsn
from cdc.publish.admin import ensure_topics
from cdc.publish.schemas import SchemaResolver
from cdc.redact import one_line, scrub
from cdc.retry import Outage, run_healing
from cdc.sink.apply import Applier, keys_of
from cdc.sink.assemble import BatchBuilder, KeptColumns, RecordShape, parse_ahead
from cdc.sink.backends import open_target
from cdc.sink.backends.base import PartitionProgress, Target
from cdc.sink.consume import PartitionReader, kafka_consumer
from cdc.sink.dead_letters import DeadLetterQueue, KeyId
from cdc.sink.guards import UnreadableRecordError, unreadable
from cdc.sink.positions import Positions
from cdc.sink.transactions import TransactionAssembler
from cdc.sink.verification import Verifier, split_at_controls
from cdc.verify.records import is_control

log = logging.getLogger(__name__)

# How long a transactional sink holds events without releasing any before it says what it waits for.
_HELD_WARNING_S = 30.0
# Allocations between young collections of the cycle collector while a sink consumes (Python's default: 700).
_GC_YOUNG_ALLOCATIONS = 50_000


class Sink:
    def __init__(self, config: PipelineConfig, name: str, stop: asyncio.Event | None = None, *,
                 accept_source_history: bool = False, config_file: str = "FILE",
                 skip_record: tuple[str, int, int] | None = None):
        self.config = config
        self.name = name
        self.config_file = config_file
        self.skip_record = skip_record  # (topic, partition, offset) to skip, asked for with --skip-record
        self.sink_config = config.sinks[name]
        self.stop_event = stop or asyncio.Event()
        self.consumer_name = f"{config.pipeline}.{name}"
        self.accept_source_history = accept_source_history
        self.rerun_hint = f"`cdc sink {config_file} --name {name} --accept-source-history`"
        self.topic_tables: dict[str, str] = {
            config.topic_for(ref): config.target_table(name, ref) for ref in config.source.tables
            if self.sink_config.subscribes(ref)
        }
        self.keep: dict[str, KeptColumns] = {
            config.topic_for(ref): KeptColumns(cols, f"{config.table_location(ref, sink=name)}: sinks.{name}.tables.{ref}.columns")
            for ref in config.source.tables if (cols := self.sink_config.kept_columns(ref)) is not None
        }
        self.positions = Positions()  # the one owner of where this sink is (cdc.sink.positions)
        self.schemas: dict[bytes, TableSchema] = {}  # a header is parsed once per process
        self.schema_resolver = SchemaResolver(config.kafka, config.pipeline)  # schema ids -> schemas
        self.origins: dict[bytes, SourceOrigin] = {}
        self.shapes: dict[tuple, RecordShape] = {}  # what distinct record headers say, read once
        self.target: Target | None = None
        self.applier: Applier | None = None  # per attempt, with its target connection
        self.reader: PartitionReader | None = None  # per attempt, with its consumer
        # `apply: transactional`: the transactions topic is read too, and events wait for their transaction
        self.transactions_topic = transactions_topic(config.pipeline)
        self.assembler = (TransactionAssembler(self.topic_tables, self.sink_config.max_transaction_events)
                          if config.apply_mode(name) == "transactional" else None)
        self._holding_since: float | None = None  # when the assembler last started to hold without releasing
        # `on_error: dlq`: changes the target rejects for their data go to the dead-letter topic
        self.dead_letters = (DeadLetterQueue(config.kafka, config.pipeline, name)
                             if self.sink_config.on_error == "dlq" else None)
        # Transient faults once the sink has started (see run): the state operations can read.
        self.started = False
        # topic -> source table, the `table` label of the sink's metrics (as the connector's)
        self.source_tables = {config.topic_for(t): str(t) for t in config.source.tables}
        # `cdc verify` (docs/verify.md): control records answered in stream order; a replay passes them
        self.verifies, self.verifier = True, None  # the Verifier: per attempt, with its target connection
        # The positions the batch being applied stores: the next batch is assembled against them.
        self._in_flight_progress: dict[tuple[str, int], PartitionProgress] = {}
        self.outage = Outage(f"sink {self.consumer_name}: the target or Kafka", self.sink_config.retry, self.stop_event,
                             component="sink", sink=name)

    @property
    def topics(self) -> list[str]:
        """Every topic this sink reads."""
        return list(self.topic_tables) + ([self.transactions_topic] if self.assembler is not None else [])

    async def run(self) -> None:
        """Apply the topics until stopped. Once the sink has started, a transient fault (the target
        or Kafka unreachable, a restarting target, a deadlock) is healed here: the target connection
        and the consumer are opened again and applying resumes from the positions stored in the
        target, within `sinks.<name>.retry` (README: Faults and retries). Every error that stops the
        sink names it."""
        await run_healing(self._run_reporting, lambda exc: self.outage, started=lambda: self.started,
                          stop=self.stop_event, start_over=self._start_over)
        if self.positions:  # a clean stop: where a restart continues
            log.info("sink %s stopped: applied %s", self.consumer_name, self.positions.describe())

    def _start_over(self) -> None:
        """Forget what was read but not applied: it is read again from the stored positions."""
        self.positions.forget()
        self.target = self.applier = None
        self.skip_record = None  # recorded in the target by the attempt that started
        if self.assembler is not None:
            self.assembler = TransactionAssembler(self.topic_tables, self.sink_config.max_transaction_events)
        self._holding_since = None

    async def _run_reporting(self) -> None:
        try:
            await self._run()
        except UnreadableRecordError as exc:
            if exc.record is None:
                raise
            topic, partition, offset = exc.record
            raise UnreadableRecordError(
                f"sink {self.consumer_name}: {exc}; nothing past it was applied. To skip this one record, run: "
                f"cdc sink {self.config_file} --name {self.name} --skip-record {topic}:{partition}:{offset} --yes "
                "(see README, A record that is not an event)", exc.record) from None
        except SinkError as exc:
            message = str(exc)
            if not message.startswith(f"sink {self.consumer_name}"):
                message = f"sink {self.consumer_name}: {message}"
            raise type(exc)(message) from None
        except Exception as exc:
            if self.target is None or not isinstance(exc, self.target.db_errors):
                raise
            # The target failed for a reason not about the data (connection lost, disk full...).
            raise TargetError(
                f"sink {self.consumer_name}: target {self.target.description}: {scrub(one_line(exc), self.sink_config.url)}"
            ) from None

    async def _run(self) -> None:
        self.target = await asyncio.to_thread(
            open_target, self.sink_config.connect_url, sqlite_path=self.sink_config.sqlite_path,
            on_column_drop=self.sink_config.on_column_drop
        )
        try:
            holder = await asyncio.to_thread(self.target.lock, self.consumer_name)
            if holder is not None:
                raise SinkConflictError(
                    f"sink {self.consumer_name} is already running against {self.target.description} ({holder})"
                )
            for topic, kept in self.keep.items():  # kept columns renamed before this process started
                if topic in self.topic_tables:
                    kept.follow(await asyncio.to_thread(self.target.created_names, self.topic_tables[topic]))
            partition_counts = await ensure_topics(self.config.kafka, self.topics)
            consumer = kafka_consumer(self.config.kafka, self.consumer_name)
            self.reader = PartitionReader(consumer, self.positions, name=self.name, consumer_name=self.consumer_name,
                                          transactions_topic=self.transactions_topic, origins=self.origins,
                                          schemas=self.schema_resolver)
            if self.dead_letters is not None:  # read before any event: it says which keys are held
                await self.dead_letters.start()
            await consumer.start()
            self.applier = Applier(self.target, self.positions, self._new_builder, name=self.name,
                                   consumer_name=self.consumer_name, topic_tables=self.topic_tables,
                                   source_tables=self.source_tables, dead_letters=self.dead_letters,
                                   assembler=self.assembler, consumer=consumer)
            try:
                await self._assign(consumer, partition_counts)
                self.started = True
                self.outage.recovered()
                await self._consume(consumer)
            finally:
                await consumer.stop()
                self.verifier = await Verifier.stop(self.verifier)
                if self.dead_letters is not None:
                    await self.dead_letters.stop()
        finally:
            await asyncio.to_thread(self.target.close)

    async def _assign(self, consumer: AIOKafkaConsumer, partition_counts: dict[str, int]) -> None:
        partitions = [TopicPartition(t, p) for t in self.topics for p in range(partition_counts[t])]
        assert self.target is not None and self.reader is not None
        await self.reader.assign(partitions, self.target, self.skip_record)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        """The loop: fetch, assemble (per partition, or whole transactions), apply; without dead letters,
        a batch is applied while the records after it are fetched and parsed."""
        in_flight: asyncio.Task | None = None
        # What the process holds by now (modules, configuration) lives as long as it does: the cycle
        # collector need not walk it again at every collection while events stream through.
        gc.freeze()
        # Events are trees, freed as soon as their batch is applied; the two batches alive at a time
        # would otherwise be walked by a young collection every 700 allocations, and promoted to be
        # walked again: a collection every _GC_YOUNG_ALLOCATIONS finds the same cycles (there are few).
        if gc.get_threshold()[0] < _GC_YOUNG_ALLOCATIONS:
            gc.set_threshold(_GC_YOUNG_ALLOCATIONS, *gc.get_threshold()[1:])
        try:
            while not self.stop_event.is_set():
                in_flight = await self._consume_once(in_flight)
                await asyncio.sleep(0)  # the batch goes to the target's thread before the next fetch
        finally:
            if in_flight is not None:  # the target's work ends before it closes, and its error is raised
                await in_flight

    async def _consume_once(self, in_flight: asyncio.Task | None) -> asyncio.Task | None:
        """One fetch, assembled and applied: the batch being applied, if any. While `in_flight` (the
        batch before) is applied, the fetch is parsed and, as long as it holds only plain changes,
        assembled and converted (against the positions that batch stores); anything else waits
        until it is committed."""
        applier = self.applier
        assert applier is not None
        fetched = await self.reader.fetch(self.sink_config.batch_size)
        if self.dead_letters is not None:  # releases written before these events were produced
            await self.dead_letters.follow()
        read = parse_ahead(fetched, self.transactions_topic, self._new_builder())  # while the target applies
        if self.assembler is not None:
            return await self._apply_transactions(read, in_flight)
        if in_flight is not None and not fetched:
            await in_flight
            in_flight = None
        if not fetched:
            return None
        # Seen through the positions the batch in flight stores, as they will be once it commits
        # (if it does not, this batch is dropped with the error).
        builder = self._builder(after=self._in_flight_progress if in_flight is not None else None)
        taken: list = []  # the records in `builder`, to find a rejected one among them (on_error: dlq)
        # Partitions are independent (one table each, keys never span partitions): apply in turn.
        for tp, items in read.items():
            skip_offset = self.positions.skipped_offsets.get((tp.topic, tp.partition))
            i = 0
            while i < len(items):
                if self.dead_letters is None:  # plain changes in a run; the others one by one, below
                    i = builder.add_run(items, i, skip_offset)
                    if i == len(items):
                        break
                if in_flight is not None:  # what is not a plain change is taken once the batch before commits
                    await in_flight
                    in_flight = None
                message, parsed = items[i]
                i += 1
                if self.positions.skipped(message):
                    continue
                if self.verifies and is_control(message):  # everything before it is committed first
                    taken = await self._verifier().reached(applier, builder, taken, message, self.topic_tables)
                    continue
                try:
                    if builder.needs_flush_before(message):
                        taken = await applier.apply_taken(builder, taken)
                    if not builder.add(message, parsed):  # it must be applied in a batch of its own
                        taken = await applier.apply_taken(builder, taken)
                        builder.add(message, parsed)
                    taken.append(message)
                except UnreadableRecordError as exc:
                    if self.dead_letters is None or exc.record is None:
                        await applier.apply_taken(builder, taken)  # what came before it; the sink stops at it
                        raise
                    await applier.dead_letter_unreadable(message, exc)
        if self.dead_letters is None:
            return await self._apply_next(builder, in_flight, taken)
        await applier.apply_taken(builder, taken)
        return None

    async def _apply_next(self, builder: BatchBuilder, in_flight: asyncio.Task | None, taken: list) -> asyncio.Task:
        """The batch `builder` holds, applied once `in_flight` is committed; if it is still being
        applied, the batch is taken and converted first (only plain changes are assembled before it
        commits)."""
        assert self.applier is not None
        ahead = None
        if in_flight is not None:
            ahead = self.applier.take_ahead(builder)
            await in_flight
        self._in_flight_progress = dict(builder.progress) if ahead is None else \
            {(p.topic, p.partition): p for p in ahead.progress}
        return asyncio.create_task(self.applier.apply_taken(builder, taken, ahead))

    def _verifier(self) -> Verifier:
        if self.verifier is None:
            assert self.target is not None
            self.verifier = Verifier(self.config.kafka, self.config.pipeline, self.name, self.target)
        return self.verifier

    def _new_builder(self, after: dict[tuple[str, int], PartitionProgress] | None = None) -> BatchBuilder:
        """An empty batch over the sink's positions (read only; `after`: the positions a batch not yet
        committed stores, seen in front of them) and its caches of parsed headers."""
        positions = self.positions.applied if not after else ChainMap(after, self.positions.applied)
        return BatchBuilder(self.topic_tables, positions, self.schemas, origins=self.origins,
                            shapes=self.shapes, keep=self.keep, accept_source_history=self.accept_source_history,
                            rerun_hint=self.rerun_hint)

    def _builder(self, *, hold: bool = True, after: dict[tuple[str, int], PartitionProgress] | None = None
                 ) -> BatchBuilder:
        assert self.applier is not None
        return self.applier.builder(hold=hold, after=after)

    async def _apply(self, builder: BatchBuilder) -> None:
        assert self.applier is not None
        await self.applier.apply(builder)

    async def _apply_transactions(self, read: dict[TopicPartition, list[tuple[Any, Any]]],
                                  in_flight: asyncio.Task | None) -> asyncio.Task | None:
        """Hold the fetched events until their source transaction is complete, then apply every
        complete transaction (in commit order) in one target transaction, returned while applied.
        While `in_flight` is applied, the events are held and released against the positions it
        stores, as in _consume_once; dead letters and control records wait for its commit."""
        assembler = self.assembler
        assert assembler is not None and self.applier is not None
        if in_flight is not None and self.dead_letters is not None:
            await in_flight
            in_flight = None
        after = self._in_flight_progress if in_flight is not None else {}
        for tp, items in read.items():
            stored = after.get((tp.topic, tp.partition)) or self.positions.get((tp.topic, tp.partition))
            stored_position = stored.position if stored is not None else None
            skip_offset = self.positions.skipped_offsets.get((tp.topic, tp.partition))
            table_topic = tp.topic != self.transactions_topic
            i = 0
            while i < len(items):
                if table_topic:  # parsed events in a run; the others one by one, below
                    i = assembler.add_run(items, i, stored_position, skip_offset)
                    if i == len(items):
                        break
                message, parsed = items[i]
                i += 1
                if self.positions.skipped(message):
                    continue
                if tp.topic == self.transactions_topic:
                    try:
                        end = decode_end(message.value)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        raise unreadable(message, "a transaction END record", exc) from None
                    assembler.add_end(message, end, applied=stored is not None and end.position <= stored.position)
                elif message.value is not None:  # (a tombstone, for compaction, carries no event)
                    try:
                        event = parsed or BatchBuilder.parse(message)
                    except UnreadableRecordError as exc:
                        if self.dead_letters is None:
                            raise
                        await self.applier.dead_letter_unreadable(message, exc)
                        continue
                    assembler.add_event(message, event, event[1], applied=stored is not None and event[1] <= stored.position)
        released = assembler.release(self.positions.applied_before, self.sink_config.batch_size)
        for commit_lsn in assembler.pieces:
            log.warning(
                "sink %s: the source transaction committed at %s holds more than %d events "
                "(max_transaction_events): applying it in pieces, in commit order; readers can see part of it",
                self.consumer_name, format_lsn(commit_lsn), assembler.max_held,
            )
        assembler.pieces.clear()
        if not released:
            self._note_holding()
            return in_flight
        self._holding_since = None
        if self.dead_letters is not None:
            await self._apply_or_dead_letter(released)  # control records only move the positions here
            return None
        # A verification's control record ends a run: the run is applied, then its range compared
        # (before anything after it); the last run is returned while it is applied.
        *controlled, (last, _) = split_at_controls(released) if self.verifies else [(released, None)]
        if controlled and in_flight is not None:
            await in_flight
            in_flight = None
        for run, control in controlled:
            builder = self._builder()
            self._add_released(builder, run)
            await self._verifier().reached(self.applier, builder, [], control, self.topic_tables)
        builder = self._builder(after=self._in_flight_progress if in_flight is not None else None)
        self._add_released(builder, last)
        return await self._apply_next(builder, in_flight, [])

    def _add_released(self, builder: BatchBuilder, released: list[tuple[Any, Any]]) -> None:
        i = 0
        while i < len(released):
            if self.dead_letters is None:  # plain changes in a run; the others one by one, below
                i = builder.add_run(released, i)
                if i == len(released):
                    break
            message, parsed = released[i]
            i += 1
            if isinstance(parsed, End):
                builder.add_marker(message, parsed.position)
                continue
            # A new schema or a key move: a run of its own, still inside this one target transaction.
            if builder.needs_flush_before(message):
                builder.cut()
            if not builder.add(message, parsed):
                builder.cut()
                builder.add(message, parsed)

    async def _apply_or_dead_letter(self, released: list[tuple[Any, Any]]) -> None:
        """`apply: transactional` with `on_error: dlq`: a source transaction goes whole to the
        target or whole to the dead-letter queue, so the target never holds part of it. It goes to
        the DLQ when the target rejects one of its events, or when it changes a key that is held
        (and then every key it changes is held too). One target transaction for all of them first;
        if the target rejects it, one per source transaction."""
        transactions: list[list[tuple[Any, Any]]] = []
        last = None
        for message, parsed in released:
            commit_lsn = parsed.commit_lsn if isinstance(parsed, End) else parsed[1].commit_lsn
            if not transactions or commit_lsn != last:
                transactions.append([])
            transactions[-1].append((message, parsed))
            last = commit_lsn
        try:
            await self._apply_transactions_once(transactions)
        except RowRejectedError as exc:
            log.info("sink %s: the target rejected %d source transactions applied together (%s); applying them one "
                     "by one", self.consumer_name, len(transactions), exc)
            for transaction in transactions:
                try:
                    await self._apply_transactions_once([transaction])
                except RowRejectedError as rejected:
                    builder = self._builder(hold=False)
                    self._dead_letter_transaction(builder, transaction, str(rejected))
                    await self._apply(builder)

    async def _apply_transactions_once(self, transactions: list[list[tuple[Any, Any]]]) -> None:
        builder = self._builder(hold=False)
        for transaction in transactions:
            if self._holds_any(transaction):
                self._dead_letter_transaction(
                    builder, transaction, "held back: its source transaction changes a key whose earlier change is "
                    "in the dead-letter queue")
            else:
                self._add_released(builder, transaction)
        await self._apply(builder)

    def _transaction_keys(self, transaction: list[tuple[Any, Any]]) -> set[KeyId]:
        keys: set[KeyId] = set()
        schema_of = self._new_builder().schema_of
        for message, parsed in transaction:
            if not isinstance(parsed, End):
                keys |= keys_of(message, parsed[0], schema_of(message))
        return keys

    def _holds_any(self, transaction: list[tuple[Any, Any]]) -> bool:
        assert self.dead_letters is not None
        if not self.dead_letters.holding:
            return False
        return any(self.dead_letters.holds(k) for k in self._transaction_keys(transaction))

    def _dead_letter_transaction(self, builder: BatchBuilder, transaction: list[tuple[Any, Any]], reason: str) -> None:
        """Every event of a source transaction to the DLQ (its END record only moves the position),
        every key it changes held."""
        assert self.dead_letters is not None
        for key in self._transaction_keys(transaction):
            self.dead_letters.hold(key)
        for message, parsed in transaction:
            if isinstance(parsed, End):
                builder.add_marker(message, parsed.position)
            else:
                builder.add_dead(message, parsed[1], reason)

    def _note_holding(self) -> None:
        """Say once in a while why nothing is applied while events wait: an END record that does not
        come (a connector older than transaction boundaries, or one that is down)."""
        assert self.assembler is not None
        now = asyncio.get_running_loop().time()
        if not self.assembler.held:
            self._holding_since = None
        elif self._holding_since is None:
            self._holding_since = now
        elif now - self._holding_since >= _HELD_WARNING_S:
            log.warning(
                "sink %s: %d events wait for the rest of their source transaction (apply: transactional): %s "
                "(on %s; a connector that is down, or older than transaction boundaries, publishes no END record)",
                self.consumer_name, self.assembler.held, self.assembler.waiting_for(self.positions.applied_before),
                self.transactions_topic,
            )
            self._holding_since = now
