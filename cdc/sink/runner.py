"""The sink: Kafka topics -> row state in a target database, each change applied exactly once.

    Target.lock                   one process per sink and target, for the life of the sink
    AIOKafkaConsumer.getmany      manual assignment; offsets come from the target, not from Kafka
      -> BatchBuilder.add         parse, check the source history, skip positions at or below the
                                  stored one, collapse per key
      -> Target.apply             rows + positions per topic partition in ONE transaction, the
                                  positions compared-and-set against the ones this process saw

With `on_error: dlq`, a change the target refuses for its data goes to the sink's dead-letter topic
instead, and later changes of its key wait there (cdc.sink.dead_letters, README "Dead letters").

Repeats (a restarted connector re-publishes everything after its last confirmed LSN, a restarted
sink re-reads after its last stored offset) are absorbed by the position check. A broker that no
longer has what the sink stored (lost data, re-created topic, retention) stops the sink with
KafkaDataMissingError instead of waiting at an offset that will never come.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError

from cdc import failpoints
from cdc.config import PipelineConfig
from cdc.errors import (
    KafkaDataMissingError,
    RowRejectedError,
    SinkConflictError,
    SinkError,
    SourceHistoryError,
    TargetError,
    WouldLoseDataError,
)
from cdc.events.codec import NotAnEvent, decode_event, decode_position
from cdc.events.keys import hashable_key
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.events.schema import TableSchema
from cdc.events.transaction import End, decode_end
from cdc.events.transaction import topic_of as transactions_topic
from cdc.publish.admin import ensure_topics, partition_bounds
from cdc.lsn import Position, format_lsn
from cdc.redact import one_line, scrub
from cdc import metrics
from cdc.retry import Outage, run_healing
from cdc.sink.dead_letters import DeadLetterQueue, KeyId, canonical_key
from cdc.sink.target import HistoryId, PartitionProgress, TableChanges, Target, open_target
from cdc.sink.transactions import TransactionAssembler, applied_before, commit_events_after

log = logging.getLogger(__name__)

# How long to wait for the record at a stored offset when checking it against the stored position.
_RECORD_CHECK_TIMEOUT_MS = 5_000
# While nothing arrives, how often to ask the broker whether the partitions still reach the offsets
# the sink reads from: not every broker answers a fetch past the end with "offset out of range".
_IDLE_CHECK_S = 5.0
# How long a transactional sink holds events without releasing any before it says what it waits for.
_HELD_WARNING_S = 30.0


class SkipRefusedError(SinkError):
    """`--skip-record` names a record that cannot or must not be skipped: nothing was skipped."""

    exit_code = 2


class UnreadableRecordError(WouldLoseDataError, SinkError):
    """A record on a topic the sink reads is no cdc event (invalid JSON, `[]`, an END record that
    is not one): the sink stops before it, exit 4, naming the record and the deliberate way past it
    (`cdc sink --skip-record`); it never skips one by itself."""

    def __init__(self, message: str, record: tuple[str, int, int] | None = None):
        super().__init__(message)
        self.record = record  # (topic, partition, offset)


def unreadable(message, what: str, exc: Exception) -> UnreadableRecordError:
    where = f"{message.topic}[{message.partition}]@{message.offset}"
    detail = one_line(exc) if isinstance(exc, NotAnEvent) else f"{type(exc).__name__}: {one_line(exc)}"  # the codec names the cause
    return UnreadableRecordError(f"{where}: not {what} ({detail})",
                                 (message.topic, message.partition, message.offset))



@dataclass
class _PendingTable:
    table: str
    schema: TableSchema
    truncate: bool = False
    rows: dict[tuple, dict[str, Any] | None] = field(default_factory=dict)  # key -> row, None = delete
    # key -> partial row (some columns + key) to apply to the target's row after `rows`
    updates: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    # (old key, partial row under its new key): a key change whose row only the target holds in full
    moves: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    since: str | None = None  # the first event of this run (topic[partition]@offset, position)

    def put(self, key: tuple, row: dict[str, Any] | None) -> None:
        """A full row (or a delete) replaces whatever this batch had for the key."""
        self.rows[key] = row
        self.updates.pop(key, None)

    def put_partial(self, key: tuple, values: dict[str, Any]) -> None:
        current = self.rows.get(key)
        if current is not None:  # a full row earlier in this batch: it, with the partial's values
            self.rows[key] = {**current, **values}
        elif key in self.updates:  # partial after partial: both sets of columns
            self.updates[key] = {**self.updates[key], **values}
        else:
            # Nothing in this batch, or a delete: update the target's row. After a delete in the
            # same batch there is none, and the partial is reported as missing (see README).
            self.updates[key] = values

    def changes(self) -> TableChanges:
        deletes = [{k: v for k, v in zip(self.schema.key, key)} for key, row in self.rows.items() if row is None]
        upserts = [row for row in self.rows.values() if row is not None]
        return TableChanges(self.table, self.schema, self.truncate, deletes, upserts, list(self.updates.values()),
                            list(self.moves), self.since)


class KeptColumns:
    """The columns a sink keeps of a table (``sinks.<name>.tables.<t>.columns``), following the
    source's renames: a kept column is known by its attnum once seen, whatever its name later."""

    def __init__(self, names: frozenset[str], where: str):
        self.names = names  # as the YAML lists them
        self.where = where
        self.attnums: dict[int, str] = {}  # attnum -> the YAML name it was kept under

    def follow(self, created_names: dict[int, str]) -> None:
        """Learn the attnums of kept columns from the target (Target.created_names)."""
        for attnum, name in created_names.items():
            if name in self.names:
                self.attnums.setdefault(attnum, name)

    def select(self, schema: TableSchema) -> TableSchema:
        """The schema with only the kept columns and the key."""
        found: set[str] = set()
        kept = set(schema.key)
        for c in schema.columns:
            name = self.attnums.get(c.attnum) if c.attnum is not None else None
            if name is None and c.name in self.names and c.name not in found:
                name = c.name
                if c.attnum is not None:
                    self.attnums[c.attnum] = name
            if name is not None:
                found.add(name)
                kept.add(c.name)
        unknown = sorted(self.names - found)
        if unknown:
            raise SinkError(
                f"{self.where}: column(s) {', '.join(unknown)} not in {schema.schema}.{schema.table}"
                " (renamed in the source before this process saw the column? list it under its new name)"
            )
        return TableSchema(schema.schema, schema.table, tuple(c for c in schema.columns if c.name in kept), schema.key)


def _project(event: dict[str, Any], schema: TableSchema) -> dict[str, Any]:
    names = {c.name for c in schema.columns}
    out = dict(event)
    for image in ("before", "after"):
        if isinstance(event.get(image), dict):
            out[image] = {k: v for k, v in event[image].items() if k in names}
    if event.get("unchanged"):
        out["unchanged"] = [c for c in event["unchanged"] if c in names]
    return out


def origin_of(message, cache: dict[bytes, SourceOrigin], where: str) -> SourceOrigin | None:
    """The message's cdc.origin header, parsed once per distinct header; None without one."""
    raw = next((v for k, v in (message.headers or ()) if k == ORIGIN_HEADER), None)
    if raw is None:
        return None  # events of connectors older than the header: accepted as before
    origin = cache.get(raw)
    if origin is None:
        try:
            origin = cache[raw] = SourceOrigin.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise SinkError(f"{where}: unreadable {ORIGIN_HEADER} header ({type(exc).__name__})") from None
    return origin


def history_problem(stored: PartitionProgress, origin: SourceOrigin) -> str | None:
    """Why events of `origin` cannot follow what the sink stored, or None if they can.

    A later timeline of the same cluster is fine when everything applied is part of it: the last
    applied commit record starts before the point where the new timeline branched off. (A commit at
    or after that point was written by the old primary after the fork.)
    """
    assert stored.origin is not None
    system_id, timeline = stored.origin
    applied = f"applied up to {format_lsn(stored.position.commit_lsn)} from system {system_id} timeline {timeline}"
    if origin.system_id != system_id:
        return f"the event comes from another database cluster ({origin}); the sink {applied}"
    if origin.timeline < timeline:
        return f"the event comes from an earlier timeline ({origin}) than the sink {applied}"
    if origin.timeline > timeline and stored.position.commit_lsn >= origin.timeline_start:
        return (
            f"the sink {applied}, past the start of the new {origin}: changes the old primary had "
            f"from {format_lsn(origin.timeline_start)} on are in the target but not in the new history"
        )
    return None


class BatchBuilder:
    """Collects consumed events into per-table changes; the last state of each key wins."""

    def __init__(self, topic_tables: dict[str, str], positions: dict[tuple[str, int], PartitionProgress],
                 schemas: dict[bytes, TableSchema], *, origins: dict[bytes, SourceOrigin] | None = None,
                 accept_source_history: bool = False, rerun_hint: str = "--accept-source-history",
                 keep: dict[str, KeptColumns] | None = None):
        self.topic_tables = topic_tables
        # topic -> (columns the sink keeps, where the YAML says so): a subscription to some columns
        self.keep = keep or {}
        self.positions = positions  # applied so far (shared with the runner, updated after commit)
        self._schemas = schemas  # header bytes -> parsed schema, kept by the runner across batches
        self._origins = {} if origins is None else origins  # header bytes -> parsed origin, likewise
        self.accept_source_history = accept_source_history
        self.rerun_hint = rerun_hint  # the command that accepts a new source history
        self.pending: dict[str, _PendingTable] = {}
        self.progress: dict[tuple[str, int], PartitionProgress] = {}
        self.applied = 0
        self.applied_by_topic: dict[str, int] = {}  # events per topic, for the sink's metrics
        self.skipped = 0
        self.sealed = False  # holds a key move, which is applied alone
        self._cut: list[TableChanges] = []  # changes before a cut, applied first in the same transaction
        # `on_error: dlq`: why an event of a held key is held back (None: it is not), and the
        # events to dead-letter before this batch's positions are stored: (message, reason, table, position)
        self.hold: Callable[[Any, dict[str, Any], TableSchema], str | None] | None = None
        self.dead: list[tuple[Any, str, str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.progress)

    def schema_of(self, message) -> TableSchema:
        raw = next((v for k, v in (message.headers or ()) if k == SCHEMA_HEADER), None)
        if raw is None:
            raise UnreadableRecordError(
                f"{message.topic}[{message.partition}]@{message.offset}: not a cdc change event (no {SCHEMA_HEADER} header)",
                (message.topic, message.partition, message.offset))
        schema = self._schemas.get(raw)
        if schema is None:
            schema = TableSchema.from_json(raw)
            if message.topic in self.keep:
                schema = self.keep[message.topic].select(schema)
            self._schemas[raw] = schema
        return schema

    def origin_of(self, message, where: str) -> SourceOrigin | None:
        return origin_of(message, self._origins, where)

    def _history(self, where: str, done: PartitionProgress | None, origin: SourceOrigin | None) -> tuple[HistoryId | None, bool]:
        """The history to store with this event's position, and whether it starts a new one."""
        if origin is None:
            return (done.origin if done else None), False
        new = (origin.system_id, origin.timeline)
        if done is None or done.origin is None or done.origin == new:
            return new, False
        problem = history_problem(done, origin)
        if problem is None:
            log.info("%s: continuing on %s", where, origin)
        elif self.accept_source_history:
            log.warning("%s: accepting a new source history as asked (--accept-source-history): %s", where, problem)
        else:
            raise SourceHistoryError(
                f"{where}: {problem}; nothing was applied. To keep the target as it is and continue with "
                f"the new history, run {self.rerun_hint} (see README, Source history)"
            )
        return new, True

    def needs_flush_before(self, message) -> bool:
        """A new schema for a table with pending rows: apply those first, under their own schema."""
        if message.value is None:  # a tombstone: no schema, nothing to apply
            return False
        table = self.topic_tables[message.topic]
        pending = self.pending.get(table)
        return pending is not None and pending.schema != self.schema_of(message)

    @staticmethod
    def parse(message) -> tuple[dict[str, Any], Position]:
        """The event and its position; SinkError naming the record if it is not a change event."""
        try:
            return decode_event(message.value, message.headers)  # exact numbers; json values as their text
        except NotAnEvent as exc:
            raise unreadable(message, "a cdc change event", exc) from None

    def add(self, message, parsed: tuple[dict[str, Any], Position] | None = None) -> bool:
        """Take the message into the batch; False (nothing taken) if it must start a batch of its own."""
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        if message.value is None:
            # A tombstone after a delete, for log compaction: nothing to apply. Its offset is not
            # stored (no cdc event lives there); it is read again after a restart and skipped again.
            return True
        event, position = parsed or self.parse(message)
        if message.topic in self.keep:
            event = _project(event, self.schema_of(message))
        op = event["op"]
        if self.sealed:
            return False
        before = event.get("before")
        if op == "u" and event.get("unchanged") and before and self._moves_key(message, before, event.get("after")):
            # The row moves to a new key and only the target has its full state: an UPDATE of the
            # key in the target, applied in a batch of its own so no other change of the batch
            # can be ordered wrongly around it.
            if self.pending:
                return False
            self.sealed = True
        tp = (message.topic, message.partition)
        done = self.progress.get(tp) or self.positions.get(tp)
        history, new_history = self._history(where, done, self.origin_of(message, where))
        # Positions of another history are not comparable with the stored one: no skipping then.
        if done is not None and not new_history and position <= done.position:
            self.skipped += 1
            self.progress[tp] = replace(done, offset=message.offset, origin=history)
            return True
        self.progress[tp] = PartitionProgress(message.topic, message.partition, message.offset, position, history,
                                              commit_events_after(done, position))
        schema = self.schema_of(message)
        table = self.topic_tables[message.topic]
        if self.hold is not None and (reason := self.hold(message, event, schema)) is not None:
            self.dead.append((message, reason, table, str(position)))
            return True
        pending = self.pending.get(table)
        if pending is None:
            pending = self.pending[table] = _PendingTable(table, schema, since=f"{where} (position {position})")
        pending.schema = schema
        self.applied += 1
        self.applied_by_topic[message.topic] = self.applied_by_topic.get(message.topic, 0) + 1
        if op == "t":
            pending.truncate = True
            pending.rows.clear()
            pending.updates.clear()
            return True
        try:
            if op in ("c", "r", "u"):
                after = event["after"]
                before = event.get("before")
                unchanged = event.get("unchanged") or []
                if self.sealed:  # the key move checked above
                    pending.moves.append(({k: before[k] for k in schema.key}, after))
                    return True
                if op == "u" and before:
                    old_key = hashable_key([before.get(k) for k in schema.key])
                    new_key = hashable_key([after[k] for k in schema.key])
                    if old_key != new_key and all(k in before for k in schema.key):
                        pending.put(old_key, None)
                key = hashable_key([after[k] for k in schema.key])
                # A partial row: an UPDATE left these (TOAST) values unchanged and nothing supplied them.
                if not unchanged:
                    pending.put(key, after)
                elif any(k in unchanged for k in schema.key):
                    raise SinkError(f"{where}: {op!r} event for {table} lists a key column as unchanged")
                else:
                    pending.put_partial(key, after)
            elif op == "d":
                before = event["before"]
                pending.put(hashable_key([before[k] for k in schema.key]), None)
            else:
                raise SinkError(f"{where}: unknown op {op!r}")
        except (KeyError, TypeError) as exc:
            raise SinkError(f"{where}: {op!r} event for {table} lacks key column {exc}") from None
        return True

    def add_marker(self, message, position: Position) -> bool:
        """A record without rows (a transaction's END record): only its partition's progress moves.
        False if it is a repeat (at or below the position applied)."""
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        tp = (message.topic, message.partition)
        done = self.progress.get(tp) or self.positions.get(tp)
        history, new_history = self._history(where, done, self.origin_of(message, where))
        if done is not None and not new_history and position <= done.position:
            self.progress[tp] = replace(done, offset=message.offset, origin=history)  # a repeat
            return False
        self.progress[tp] = PartitionProgress(message.topic, message.partition, message.offset, position, history,
                                              commit_events_after(done, position))
        return True

    def add_dead(self, message, position: Position, reason: str) -> None:
        """An event that goes to the dead-letter queue instead of the target (a repeat of one
        applied before goes nowhere): its partition's progress moves past it, stored only after
        the dead letter is acknowledged."""
        if self.add_marker(message, position):
            self.dead.append((message, reason, self.topic_tables[message.topic], str(position)))

    def cut(self) -> None:
        """End a run of changes where add() or needs_flush_before() asked for a batch of its own, but
        keep the batch: the changes so far are applied first, in the same target transaction."""
        self._cut.extend(p.changes() for p in self.pending.values())
        self.pending.clear()
        self.sealed = False

    def take(self) -> tuple[list[TableChanges], list[PartitionProgress]]:
        changes = self._cut + [p.changes() for p in self.pending.values()]
        progress = list(self.progress.values())
        self.pending.clear()
        self._cut = []
        self.progress = {}
        self.sealed = False
        return changes, progress

    def _moves_key(self, message, before: dict, after: Any) -> bool:
        key = self.schema_of(message).key
        return isinstance(after, dict) and all(k in before for k in key) and any(
            before[k] != after.get(k) for k in key)


class Sink:
    def __init__(self, config: PipelineConfig, name: str, stop: asyncio.Event | None = None, *,
                 accept_source_history: bool = False, config_file: str = "FILE",
                 skip_record: tuple[str, int, int] | None = None):
        self.config = config
        self.name = name
        self.config_file = config_file
        self.skip_record = skip_record  # (topic, partition, offset) to skip, asked for with --skip-record
        self.skipped_offsets: dict[tuple[str, int], int] = {}  # partition -> the record skipped on purpose there
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
        self.positions: dict[tuple[str, int], PartitionProgress] = {}
        self.loaded_positions: dict[tuple[str, int], PartitionProgress] = {}  # as stored when this process started
        self.schemas: dict[bytes, TableSchema] = {}  # a header is parsed once per process
        self.origins: dict[bytes, SourceOrigin] = {}
        self.events_applied = 0
        self.target: Target | None = None
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
        self._consumer: AIOKafkaConsumer | None = None
        # topic -> source table, the `table` label of the sink's metrics (as the connector's)
        self.source_tables = {config.topic_for(t): str(t) for t in config.source.tables}
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
            log.info("sink %s stopped: applied %s", self.consumer_name, ", ".join(
                f"{p.topic}[{p.partition}]@{p.offset} (position {p.position})" for p in self.positions.values()))

    def _start_over(self) -> None:
        """Forget what was read but not applied: it is read again from the stored positions."""
        self.positions, self.target = {}, None
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
            consumer = AIOKafkaConsumer(
                **self.config.kafka.client_options(),  # brokers, timeout (also bounds connecting), TLS/SASL
                client_id=f"cdc-{self.consumer_name}",
                group_id=None,  # positions live in the target database, in the same transaction as the rows
                enable_auto_commit=False,
                # Never jump quietly: an offset the broker does not have is checked and reported.
                auto_offset_reset="none",
                fetch_max_wait_ms=100,
            )
            if self.dead_letters is not None:  # read before any event: it says which keys are held
                await self.dead_letters.start()
            await consumer.start()
            self._consumer = consumer  # for the lag metric: the partitions' ends as of each fetch
            try:
                await self._assign(consumer, partition_counts)
                self.started = True
                self.outage.recovered()
                await self._consume(consumer)
            finally:
                await consumer.stop()
                if self.dead_letters is not None:
                    await self.dead_letters.stop()
        finally:
            await asyncio.to_thread(self.target.close)

    async def _assign(self, consumer: AIOKafkaConsumer, partition_counts: dict[str, int]) -> None:
        self.positions = await asyncio.to_thread(self.target.load_positions, self.consumer_name)
        partitions = [TopicPartition(t, p) for t in self.topics for p in range(partition_counts[t])]
        consumer.assign(partitions)
        if self.skip_record is not None:
            await self._record_skip(consumer, partitions)
        self.loaded_positions = dict(self.positions)
        self.skipped_offsets = {tp: p.skipped_offset for tp, p in self.positions.items() if p.skipped_offset is not None}
        for tp in partitions:
            if (tp.topic, tp.partition) not in self.positions:
                await consumer.seek_to_beginning(tp)
        await self._check_stored_offsets(consumer, partitions)  # and seeks to the next offset
        log.info("sink %s consuming %d partitions", self.name, len(partitions))

    async def _record_skip(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Store that the record asked for with --skip-record is skipped, after checking that it is
        one this sink has not read past and that it is no cdc event."""
        assert self.skip_record is not None and self.target is not None
        topic, partition, offset = self.skip_record
        where = f"{topic}[{partition}]@{offset}"
        tp = TopicPartition(topic, partition)
        if tp not in partitions:
            raise SkipRefusedError(f"--skip-record {where}: sink {self.name} reads no such partition "
                                   f"(it reads {', '.join(sorted({p.topic for p in partitions}))}); nothing was skipped")
        done = self.positions.get((topic, partition))
        if done is not None and offset <= done.offset:
            raise SkipRefusedError(f"--skip-record {where}: the sink applied up to offset {done.offset} there "
                                   "already; nothing was skipped")
        first, end = (await partition_bounds(consumer, [tp]))[tp]
        message = await self._message_at(consumer, tp, offset) if offset >= first else None
        if message is None or message.value is None:
            raise SkipRefusedError(f"--skip-record {where}: the broker holds no record there (partition {first} to "
                                   f"{end - 1}) or only a tombstone; nothing was skipped")
        try:
            if topic == self.transactions_topic:
                decode_end(message.value)
            else:
                BatchBuilder.parse(message)
                if not any(k == SCHEMA_HEADER for k, _ in message.headers or ()):
                    raise UnreadableRecordError(f"{where}: not a cdc change event (no {SCHEMA_HEADER} header)")
        except UnreadableRecordError as exc:
            reason = str(exc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = f"{where}: not a transaction END record ({type(exc).__name__})"
        else:
            raise SkipRefusedError(f"--skip-record {where}: that record is a cdc event and is applied as such; "
                                   "--skip-record only skips records that are not; nothing was skipped")
        # No position stored yet: one before the partition's first record, which reads it from there as before.
        progress = replace(done, skipped_offset=offset) if done is not None else PartitionProgress(
            topic, partition, first - 1, Position(0, 0, 0), None, None, offset)
        await asyncio.to_thread(self.target.record_skip, self.consumer_name, progress)
        self.positions[(topic, partition)] = progress
        log.warning("sink %s: skipping one record as asked (--skip-record), its content never reaches the target: %s; "
                    "recorded in %s.skipped_offset", self.consumer_name, reason, "cdc_sink_positions")

    async def _message_at(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> Any:
        """The record at `offset`, or None if the broker returns none there."""
        consumer.seek(tp, offset)
        try:
            fetched = await consumer.getmany(tp, timeout_ms=_RECORD_CHECK_TIMEOUT_MS, max_records=1)
        except OffsetOutOfRangeError:
            return None
        found = [m for m in fetched.get(tp, ()) if m.offset == offset]
        return found[0] if found else None

    def _skipped(self, message) -> bool:
        """A record skipped on purpose (--skip-record): read again after every restart, and passed
        over again, like a tombstone."""
        return self.skipped_offsets.get((message.topic, message.partition)) == message.offset

    async def _check_stored_offsets(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Check that the broker still has what the sink stored, then seek past it.

        The stored offset must be inside the partition, not below its first retained offset, and
        the record there must carry the stored position (or an earlier one: a repeat that was
        skipped). Otherwise the broker lost events, or the topic was re-created: stop and say so.
        """
        stored = [(tp, self.positions[(tp.topic, tp.partition)]) for tp in partitions
                  if (tp.topic, tp.partition) in self.positions]
        bounds = await partition_bounds(consumer, [tp for tp, _ in stored])
        for tp, progress in stored:
            first, end = bounds[tp]
            record = None
            if progress.offset >= first:
                # Read it even when the end offset says it is not there: some brokers (tansu) report
                # end offsets too low, and the record itself is the evidence that counts.
                record = await self._record_at(consumer, tp, progress.offset)
            problem = stored_offset_problem(progress, first, end, record)
            if problem is not None:
                raise KafkaDataMissingError(
                    f"{problem}. Nothing was applied past it. Restore the topic if you can; otherwise "
                    "see README, When Kafka lost events"
                )
            consumer.seek(tp, progress.offset + 1)

    async def _record_at(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> Any:
        """(position, origin) of the record at `offset`, "none" if it is no cdc event, or None if
        the broker returns no record there (compacted away)."""
        consumer.seek(tp, offset)
        deadline = asyncio.get_running_loop().time() + _RECORD_CHECK_TIMEOUT_MS / 1000
        while asyncio.get_running_loop().time() < deadline:
            try:
                fetched = await consumer.getmany(tp, timeout_ms=500, max_records=1)
            except OffsetOutOfRangeError:
                return None
            for message in fetched.get(tp, ()):
                if message.offset != offset:
                    return None
                try:
                    position = decode_position(message.value)
                except NotAnEvent:
                    return "none"
                origin = origin_of(message, self.origins, f"{tp.topic}[{tp.partition}]@{offset}")
                return position, (origin.system_id, origin.timeline) if origin else None
        return None

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        batch_size = self.sink_config.batch_size
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while not self.stop_event.is_set():
            if loop.time() - idle_since >= _IDLE_CHECK_S:
                await self._check_partition_ends(consumer)
                idle_since = loop.time()
            try:
                fetched = await consumer.getmany(timeout_ms=200, max_records=batch_size)
            except OffsetOutOfRangeError as exc:
                # The broker has no record at the offset we asked for: find out what it lacks.
                out = [tp for tp in (exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {})]
                await self._check_stored_offsets(consumer, out or list(consumer.assignment()))
                raise KafkaDataMissingError(
                    f"the broker reports offsets out of range for {', '.join(f'{tp.topic}[{tp.partition}]' for tp in out)} "
                    "although it has the stored ones: see README, When Kafka lost events"
                ) from None
            if self.dead_letters is not None:  # releases written before these events were produced
                await self.dead_letters.follow()
            if self.assembler is not None:
                if fetched:
                    idle_since = loop.time()
                await self._apply_transactions(fetched)
                continue
            if not fetched:
                continue
            idle_since = loop.time()
            builder = self._builder()
            taken: list = []  # the records in `builder`, to find a rejected one among them (on_error: dlq)
            # Partitions are independent (one table each, keys never span partitions): apply in turn.
            for messages in fetched.values():
                for message in messages:
                    if self._skipped(message):
                        continue
                    try:
                        if builder.needs_flush_before(message):
                            taken = await self._apply_taken(builder, taken)
                        if not builder.add(message):  # it must be applied in a batch of its own
                            taken = await self._apply_taken(builder, taken)
                            builder.add(message)
                        taken.append(message)
                    except UnreadableRecordError as exc:
                        if self.dead_letters is None or exc.record is None:
                            await self._apply_taken(builder, taken)  # what came before it; the sink stops at it
                            raise
                        await self._dead_letter_unreadable(message, exc)
            await self._apply_taken(builder, taken)

    def _builder(self, *, hold: bool = True) -> BatchBuilder:
        builder = BatchBuilder(self.topic_tables, self.positions, self.schemas, origins=self.origins, keep=self.keep,
                               accept_source_history=self.accept_source_history, rerun_hint=self.rerun_hint)
        if hold and self.dead_letters is not None:
            builder.hold = self._held_back
        return builder

    def _keys_of(self, message, event: dict[str, Any] | None = None, schema: TableSchema | None = None) -> set[KeyId]:
        """The keys a record changes: its Kafka key, and the old key of a row that moves to a new one."""
        keys = {(message.topic, canonical_key(message.key) if message.key is not None else "")}
        before = event.get("before") if event is not None else None
        if isinstance(before, dict) and schema is not None and all(k in before for k in schema.key):
            keys.add((message.topic, canonical_key({k: before[k] for k in schema.key})))
        return keys

    def _held_back(self, message, event: dict[str, Any], schema: TableSchema) -> str | None:
        """Why an event waits in the dead-letter queue behind an earlier change of its key, or None."""
        assert self.dead_letters is not None
        if not self.dead_letters.holding:
            return None
        keys = self._keys_of(message, event, schema)
        if not any(self.dead_letters.holds(k) for k in keys):
            return None
        for key in keys:  # a row that moves: its new key waits as well
            self.dead_letters.hold(key)
        return "held back: an earlier change of this key is in the dead-letter queue"

    def _old_keys(self, message) -> list[str]:
        """The old key of a row that moves to a new one (its Kafka key): held by its dead letter too."""
        event, _ = BatchBuilder.parse(message)
        schema = BatchBuilder(self.topic_tables, {}, self.schemas, keep=self.keep).schema_of(message)
        own = (message.topic, canonical_key(message.key) if message.key is not None else "")
        return [key for topic, key in self._keys_of(message, event, schema) if (topic, key) != own]

    async def _dead_letter_unreadable(self, message, exc: UnreadableRecordError) -> None:
        """A record that is no cdc event goes to the DLQ at once, before any position passes it."""
        assert self.dead_letters is not None
        self.dead_letters.hold(next(iter(self._keys_of(message))))
        await self.dead_letters.write(message, str(exc), self.topic_tables.get(message.topic, ""), "")
        metrics.DEAD_LETTERS.labels(sink=self.name, table=self.source_tables.get(message.topic, message.topic)).inc()

    async def _apply_taken(self, builder: BatchBuilder, taken: list) -> list:
        """Apply the batch; if the target rejects it for a reason in its data and the sink
        dead-letters (on_error: dlq), find the rejected records by bisection. Returns a new empty
        list of taken records."""
        try:
            await self._apply(builder)
        except RowRejectedError as exc:
            if self.dead_letters is None:
                raise
            log.info("sink %s: the target rejected a batch of %d records (%s); looking for the rejected ones",
                     self.consumer_name, len(taken), exc)
            await self._isolate(taken, str(exc))
        return []

    async def _isolate(self, records: list, rejected: str | None = None) -> None:
        """Apply `records` (in order, each part in a target transaction of its own), halving any part
        the target rejects until the rejected records are alone; those go to the DLQ and hold their
        keys, so later records of the same key in the parts after them are held back too.
        `rejected`: the target's reason when this part is known to be rejected."""
        assert self.dead_letters is not None
        if rejected is None:
            builder = self._builder()
            for message in records:
                if builder.needs_flush_before(message):
                    builder.cut()
                if not builder.add(message):
                    builder.cut()
                    builder.add(message)
            try:
                await self._apply(builder)
                return
            except RowRejectedError as exc:
                rejected = str(exc)
        if len(records) > 1:
            half = len(records) // 2
            await self._isolate(records[:half])
            await self._isolate(records[half:])
            return
        (message,) = records
        event, position = BatchBuilder.parse(message)
        dead = self._builder()
        for key in self._keys_of(message, event, dead.schema_of(message)):
            self.dead_letters.hold(key)
        dead.add_dead(message, position, rejected)
        await self._apply(dead)

    async def _apply_transactions(self, fetched: dict[TopicPartition, list]) -> None:
        """Hold the fetched events until their source transaction is complete, then apply every
        complete transaction (in commit order) in one target transaction."""
        assembler = self.assembler
        assert assembler is not None
        for tp, messages in fetched.items():
            stored = self.positions.get((tp.topic, tp.partition))
            for message in messages:
                if self._skipped(message):
                    continue
                if tp.topic == self.transactions_topic:
                    try:
                        end = decode_end(message.value)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        raise unreadable(message, "a transaction END record", exc) from None
                    assembler.add_end(message, end, applied=stored is not None and end.position <= stored.position)
                elif message.value is not None:  # (a tombstone, for compaction, carries no event)
                    try:
                        event = BatchBuilder.parse(message)
                    except UnreadableRecordError as exc:
                        if self.dead_letters is None:
                            raise
                        await self._dead_letter_unreadable(message, exc)
                        continue
                    assembler.add_event(message, event, event[1], applied=stored is not None and event[1] <= stored.position)
        released = assembler.release(self._applied_before, self.sink_config.batch_size)
        for commit_lsn in assembler.pieces:
            log.warning(
                "sink %s: the source transaction committed at %s holds more than %d events "
                "(max_transaction_events): applying it in pieces, in commit order; readers can see part of it",
                self.consumer_name, format_lsn(commit_lsn), assembler.max_held,
            )
        assembler.pieces.clear()
        if not released:
            self._note_holding()
            return
        self._holding_since = None
        if self.dead_letters is not None:
            await self._apply_or_dead_letter(released)
            return
        builder = self._builder()
        self._add_released(builder, released)
        await self._apply(builder)

    def _add_released(self, builder: BatchBuilder, released: list[tuple[Any, Any]]) -> None:
        for message, parsed in released:
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
        schema_of = BatchBuilder(self.topic_tables, {}, self.schemas, keep=self.keep).schema_of
        for message, parsed in transaction:
            if not isinstance(parsed, End):
                keys |= self._keys_of(message, parsed[0], schema_of(message))
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
                self.consumer_name, self.assembler.held, self.assembler.waiting_for(self._applied_before),
                self.transactions_topic,
            )
            self._holding_since = now

    def _applied_before(self, topic: str, commit_lsn: int) -> float:
        """How many events of a commit the topic's partitions had applied when this process loaded
        their positions (what it applies itself, the assembler counts as read)."""
        return applied_before((p for (t, _), p in self.loaded_positions.items() if t == topic), commit_lsn)

    async def _check_partition_ends(self, consumer: AIOKafkaConsumer) -> None:
        """A partition that now ends before the offset we read from lost records: check it."""
        partitions = sorted(consumer.assignment())
        try:
            ends = await consumer.end_offsets(partitions)
        except KafkaError as exc:  # the broker is away: the consumer reconnects, ask again later
            log.debug("sink %s: cannot ask for end offsets now: %s", self.name, exc)
            return
        behind = [tp for tp in partitions if tp in ends and ends[tp] < await consumer.position(tp)]
        if behind:
            await self._check_stored_offsets(consumer, behind)

    async def _apply(self, builder: BatchBuilder) -> None:
        if builder.dead:
            # Acknowledged by Kafka before the positions that pass them are stored.
            assert self.dead_letters is not None
            dead, builder.dead = builder.dead, []
            for message, reason, table, position in dead:
                await self.dead_letters.write(message, reason, table, position, also=self._old_keys(message))
                metrics.DEAD_LETTERS.labels(sink=self.name, table=self.source_tables.get(message.topic, table)).inc()
            failpoints.reached("dlq.written")
        if not builder:
            return
        changes, progress = builder.take()
        failpoints.reached("sink.consumed")
        if self.assembler is not None:
            # Never store an offset at or past an event still held: a restart seeks past stored offsets.
            first = self.assembler.first_held_offsets()
            progress = [replace(p, offset=min(p.offset, first[(p.topic, p.partition)] - 1))
                        if (p.topic, p.partition) in first else p for p in progress]
        assert self.target is not None
        # apply() creates or extends the tables inside its transaction as needed
        started = time.monotonic()
        missing = await asyncio.to_thread(self.target.apply, self.consumer_name, changes, progress)
        failpoints.reached("sink.committed")
        for p in progress:
            self.positions[(p.topic, p.partition)] = p
        self._record_metrics(builder, progress, time.monotonic() - started)
        for change in changes:
            if missing.get(change.table):
                # Named by table and key columns only: key values may be private data.
                log.warning(
                    "sink %s: %d partial rows for table %s (key %s) found no row to update; the target "
                    "lacks these rows and they stay missing until their next full change (see README, Partial rows)",
                    self.consumer_name, missing[change.table], change.table, ", ".join(change.schema.key),
                )
                missing[change.table] = 0
        self.events_applied += builder.applied
        builder.applied = 0
        builder.applied_by_topic = {}

    def _record_metrics(self, builder: BatchBuilder, progress: list[PartitionProgress], took_s: float) -> None:
        metrics.SINK_APPLY_LATENCY.labels(sink=self.name).observe(took_s)
        metrics.SINK_BATCH.labels(sink=self.name).observe(builder.applied)
        for topic, count in builder.applied_by_topic.items():
            metrics.SINK_APPLIED.labels(sink=self.name, table=self.source_tables.get(topic, topic)).inc(count)
        for p in progress:
            labels = {"sink": self.name, "topic": p.topic, "partition": str(p.partition)}
            metrics.SINK_OFFSET.labels(**labels).set(p.offset)
            end = self._consumer.highwater(TopicPartition(p.topic, p.partition)) if self._consumer else None
            if end is not None:  # the partition's end as of the last fetch
                metrics.SINK_LAG.labels(**labels).set(max(end - p.offset - 1, 0))


def stored_offset_problem(stored: PartitionProgress, first: int, end: int, record: Any) -> str | None:
    """What the broker lacks of what the sink stored for a partition, or None if it has it all.

    `first`/`end`: the partition's first retained offset and the offset its next record gets.
    `record`: (position, origin) of the record at the stored offset, "none" if that is no cdc
    event, None if the broker has no record there. A record found there outweighs `end`.
    """
    where = f"{stored.topic}[{stored.partition}]"
    had = f"the sink applied up to offset {stored.offset} (position {stored.position})"
    if record is None:  # no record at the stored offset
        if end <= stored.offset:
            return (f"{where}: {had}, but the broker's partition ends at offset {end - 1 if end else 'none (empty)'}: "
                    "the broker lost events or the topic was re-created, and events after the stored position that "
                    "are no longer on the topic are missing from the target")
        if stored.offset + 1 < first:
            return (f"{where}: {had}, but the broker's first retained offset is {first}: events at offsets "
                    f"{stored.offset + 1} to {first - 1} were deleted (retention) before the sink applied them")
        return None  # gone by retention or compaction, nothing after it: no unread event is lost
    if record == "none":
        return f"{where}: {had}, but offset {stored.offset} holds no cdc event: the topic was re-created"
    position, origin = record
    if position > stored.position or (origin and stored.origin and origin != stored.origin):
        return (f"{where}: {had}, but offset {stored.offset} holds position {position}: the topic was re-created "
                "or the broker lost its data, and events that were after the stored offset may be missing")
    return None
