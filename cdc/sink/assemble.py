"""Assembling consumed events into batches for the target: the last state of each key wins.

A :class:`BatchBuilder` takes records of one or more topic partitions in order, parses them (the
event codec, cdc.events.codec), passes each through the source-history guard (cdc.sink.guards),
skips positions at or below the partition's stored one (repeats of a restarted connector or sink),
and collapses the rest per target table and key into :class:`~cdc.sink.backends.base.TableChanges`
plus the :class:`~cdc.sink.backends.base.PartitionProgress` to store with them. The runner hands
``take()`` to the backend's ``apply``. Whole source transactions (``apply: transactional``) are
assembled first by :class:`cdc.sink.transactions.TransactionAssembler` (the one judge of
completeness) and the released runs go through a BatchBuilder the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cdc.errors import SinkError
from cdc.events.codec import NotAnEvent, decode_event
from cdc.events.keys import hashable_key
from cdc.events.origin import SourceOrigin
from cdc.events.schema import TableSchema
from cdc.events.schema_ids import UnknownSchemaId, schema_json_of
from cdc.lsn import Position
from cdc.sink.backends.base import PartitionProgress, TableChanges
from cdc.sink.guards import SourceHistoryGuard, UnreadableRecordError, unreadable
from cdc.sink.transactions import commit_events_after
from cdc.verify.records import CONTROL_OP


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


def schema_json_of_record(message) -> bytes:
    """The schema JSON a record names; UnreadableRecordError naming the record if none or unknown."""
    try:
        raw = schema_json_of(message.headers)
    except UnknownSchemaId as exc:
        raise unknown_schema(message, exc) from None
    if raw is None:
        raise UnreadableRecordError(
            f"{message.topic}[{message.partition}]@{message.offset}: not a cdc change event (no cdc.schema_id header)",
            (message.topic, message.partition, message.offset))
    return raw


def unknown_schema(message, exc: UnknownSchemaId) -> UnreadableRecordError:
    """A record whose schema id is on no record of the schemas topic: the connector writes the schema
    before any event naming it, so the topic lost it (deleted, re-created) or the record is not cdc's."""
    return UnreadableRecordError(
        f"{message.topic}[{message.partition}]@{message.offset}: its schema id "
        f"{exc.schema_id.decode('ascii', 'backslashreplace')} is on no record of the pipeline's schemas topic "
        "({pipeline}.schemas, which the connector writes before any event naming it): the topic lost it, or the "
        "record was not written by cdc", (message.topic, message.partition, message.offset))


class BatchBuilder:
    """Collects consumed events into per-table changes; the last state of each key wins."""

    def __init__(self, topic_tables: dict[str, str], positions: dict[tuple[str, int], PartitionProgress],
                 schemas: dict[bytes, TableSchema], *, origins: dict[bytes, SourceOrigin] | None = None,
                 accept_source_history: bool = False, rerun_hint: str = "--accept-source-history",
                 keep: dict[str, KeptColumns] | None = None):
        self.topic_tables = topic_tables
        # topic -> (columns the sink keeps, where the YAML says so): a subscription to some columns
        self.keep = keep or {}
        self.positions = positions  # applied so far: read only here (cdc.sink.positions owns them)
        self._schemas = schemas  # header bytes -> parsed schema, kept by the runner across batches
        self.history_guard = SourceHistoryGuard(origins, accept=accept_source_history, rerun_hint=rerun_hint)
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
        """The record's schema, as its headers name it (the reader learnt its id before: see
        cdc.publish.schemas); UnreadableRecordError naming the record if it has none or an unknown one."""
        raw = schema_json_of_record(message)
        schema = self._schemas.get(raw)
        if schema is None:
            schema = TableSchema.from_json(raw)
            if message.topic in self.keep:
                schema = self.keep[message.topic].select(schema)
            self._schemas[raw] = schema
        return schema

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
        except UnknownSchemaId as exc:
            raise unknown_schema(message, exc) from None

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
        if op == CONTROL_OP:  # a verification's control record (cdc.verify.records): no rows, only progress
            self.add_marker(message, position)
            return True
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
        history, new_history = self.history_guard.history(message, where, done)
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
        history, new_history = self.history_guard.history(message, where, done)
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


def parse_ahead(fetched: dict[Any, list], end_records_topic: str | None) -> dict[int, tuple[dict[str, Any], Any]]:
    """The change events of fetched records parsed (by id of their record) while a batch is still
    being applied. A record that does not parse is left out: it is parsed again in its turn, and
    stops the sink or goes to the dead letters there, after the records before it."""
    parsed = {}
    for messages in fetched.values():
        for message in messages:
            if message.value is not None and message.topic != end_records_topic:
                try:
                    parsed[id(message)] = BatchBuilder.parse(message)
                except UnreadableRecordError:
                    pass
    return parsed
