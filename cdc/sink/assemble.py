"""Assembling consumed events into batches for the target: the last state of each key wins.

A :class:`BatchBuilder` takes records of one or more topic partitions in order, parses them (the
event codec, cdc.events.codec), passes each through the source-history guard (cdc.sink.guards),
skips positions at or below the partition's stored one (repeats of a restarted connector or sink),
and collapses the rest per target table and key into :class:`~cdc.sink.backends.base.TableChanges`
plus the :class:`~cdc.sink.backends.base.PartitionProgress` to store with them. The runner hands
``take()`` to the backend's ``apply``. Whole source transactions (``apply: transactional``) are
assembled first by :class:`cdc.sink.transactions.TransactionAssembler` (the one judge of
completeness) and the released runs go through a BatchBuilder the same way.

Over 400 lines: add() and its fast run for plain changes (add_run) must agree case by case, so they
stay side by side.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cdc.errors import SinkError
from cdc.events.codec import JsonColumns, NotAnEvent, decode_change_as, decode_event, json_columns_of
from cdc.events.keys import hashable_key
from cdc.events.origin import SourceOrigin
from cdc.events.schema import TableSchema
from cdc.events.schema_ids import UnknownSchemaId, schema_json_of
from cdc.lsn import Position
from cdc.sink.backends.base import HistoryId, PartitionProgress, TableChanges
from cdc.sink.guards import SourceHistoryGuard, UnreadableRecordError, unreadable
from cdc.sink.transactions import commit_events_after
from cdc.verify.records import CONTROL_KEY_PREFIX, CONTROL_OP


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


@dataclass(slots=True)
class RecordShape:
    """What a record's headers say, resolved once per distinct headers of a topic (BatchBuilder.shape)."""

    schema: TableSchema  # as BatchBuilder.schema_of gives it (kept columns only, if the sink keeps some)
    json_columns: JsonColumns | None  # for cdc.events.codec.decode_change_as
    history: HistoryId | None  # (system_id, timeline) of the cdc.origin header; None without one


# Types of a one-column key's value that hashable_key puts in a tuple as they are.
_SCALAR_KEYS = frozenset({int, str})

# Distinct header sets remembered per process (one per table shape and source history, normally).
_MAX_SHAPES = 4096


class BatchBuilder:
    """Collects consumed events into per-table changes; the last state of each key wins."""

    def __init__(self, topic_tables: dict[str, str], positions: Mapping[tuple[str, int], PartitionProgress],
                 schemas: dict[bytes, TableSchema], *, origins: dict[bytes, SourceOrigin] | None = None,
                 accept_source_history: bool = False, rerun_hint: str = "--accept-source-history",
                 keep: dict[str, KeptColumns] | None = None, shapes: dict[tuple, RecordShape] | None = None):
        self.topic_tables = topic_tables
        # topic -> (columns the sink keeps, where the YAML says so): a subscription to some columns
        self.keep = keep or {}
        self.positions = positions  # applied so far: read only here (cdc.sink.positions owns them)
        self._schemas = schemas  # header bytes -> parsed schema, kept by the runner across batches
        self._shapes = {} if shapes is None else shapes  # (topic, headers) -> RecordShape, kept likewise
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

    def shape(self, message) -> RecordShape | None:
        """The record's shape (schema, json columns, source history) from the headers, remembered
        per distinct headers; None where reading them fails (add() then says why, in its order)."""
        headers = message.headers
        key = (message.topic, headers if type(headers) is tuple else tuple(headers or ()))
        shape = self._shapes.get(key)
        if shape is None:
            try:
                schema = self.schema_of(message)
                origin = self.history_guard.origin_of(message, f"{message.topic}[{message.partition}]@{message.offset}")
                shape = RecordShape(schema, json_columns_of(schema_json_of_record(message)),
                                    None if origin is None else (origin.system_id, origin.timeline))
            except SinkError:  # (UnreadableRecordError is one)
                return None
            if len(self._shapes) >= _MAX_SHAPES:
                self._shapes.clear()
            self._shapes[key] = shape
        return shape

    def parse_record(self, message) -> tuple[dict[str, Any], Position]:
        """:meth:`parse`, the record's headers read once per distinct headers."""
        shape = self.shape(message)
        if shape is None:
            return self.parse(message)
        try:
            return decode_change_as(message.value, shape.json_columns)
        except NotAnEvent as exc:
            raise unreadable(message, "a cdc change event", exc) from None

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

    def add_run(self, items: list[tuple[Any, Any]], start: int, skip_offset: int | None = None) -> int:
        """Take items[start:] ((record, (event, position) or None), of one topic partition from
        items[start] on) while each is a plain change that add() would take the same way: returns
        the index of the first item not taken (len(items): all), for add() and the caller's checks.

        Plain: a full row (c, r, u without unchanged columns) or a delete, readable, of the shape the
        table's pending rows have, of the history applied before, past the applied position, not a
        control record, not `skip_offset` (--skip-record); no dead-letter holds. The per-record work
        of add() without its general cases, and the partition's progress stored once per run.
        """
        if self.hold is not None or self.sealed or start >= len(items):
            return start
        first = items[start][0]
        topic, partition = first.topic, first.partition
        table = self.topic_tables.get(topic)
        if table is None:  # a transaction's END record
            return start
        tp = (topic, partition)
        kept = self.keep.get(topic)
        pending = self.pending.get(table)
        done = self.progress.get(tp) or self.positions.get(tp)
        if done is None:
            done_position = done_history = done_count = None
        else:
            done_position, done_history, done_count = done.position, done.origin, done.commit_events
        taken = 0
        # The shape of the last record taken: records of one table and history share their headers'
        # content, so the next is compared with it, not looked up (nor checked again) each time.
        last_headers = last_shape = None
        rows = updates = None  # the pending table's, once there is one
        i, n = start, len(items)
        while i < n:
            message, parsed = items[i]
            if parsed is not None and type(parsed) is not tuple:  # a transaction's END record: add_marker
                break
            if message.value is None:  # a tombstone: nothing to apply, no offset to store (see add)
                if message.topic != topic or message.partition != partition or message.offset == skip_offset:
                    break
                i += 1
                continue
            if message.topic != topic or message.partition != partition or message.offset == skip_offset:
                break
            if (record_key := message.key) is not None and record_key.startswith(CONTROL_KEY_PREFIX):
                break
            headers = message.headers
            if last_shape is not None and (headers is last_headers or headers == last_headers):
                shape = last_shape  # its schema is the pending one, its history the one applied
            else:
                shape = self.shape(message)
                if shape is None:
                    break
                schema = shape.schema
                if pending is not None and pending.schema is not schema and pending.schema != schema:
                    break  # a new shape: the caller applies the rows before it first
                history = shape.history
                if history is not None and done_history is not None and done_history != history:
                    break  # another source history: the guard's judgement
                key_names = schema.key
                key_name = key_names[0] if len(key_names) == 1 else None
            if parsed is None:
                try:
                    parsed = decode_change_as(message.value, shape.json_columns)
                except NotAnEvent:
                    break
            event, position = parsed
            if kept is not None:
                event = _project(event, schema)
            history = shape.history
            if history is None:
                history = done_history
            if done_position is not None and position <= done_position:
                break  # a repeat: skipped the general way
            # Everything that can fail is read before anything changes.
            op = event["op"]
            try:
                if (op == "c" or op == "r" or op == "u") and not event.get("unchanged"):
                    row = event["after"]
                    if key_name is not None and type(value := row[key_name]) in _SCALAR_KEYS:
                        key = (value,)  # as hashable_key gives it, without the walk
                    else:
                        key = hashable_key([row[k] for k in key_names])
                    old_key = None
                    if op == "u":
                        before = event.get("before")
                        if before:
                            old_key = hashable_key([before.get(k) for k in key_names])
                            if old_key == key or not all(k in before for k in key_names):
                                old_key = None
                elif op == "d":
                    row, old_key = None, None
                    key = hashable_key([event["before"][k] for k in key_names])
                else:
                    break
            except (KeyError, TypeError, AttributeError):
                break  # add() says what is wrong
            if pending is None:
                where = f"{topic}[{partition}]@{message.offset}"
                pending = self.pending[table] = _PendingTable(table, schema, since=f"{where} (position {position})")
            if shape is not last_shape:
                pending.schema = schema
                rows, updates = pending.rows, pending.updates
                last_headers, last_shape = headers, shape
            # pending.put(), written out
            if old_key is not None:
                rows[old_key] = None
                if updates:
                    updates.pop(old_key, None)
            rows[key] = row
            if updates:
                updates.pop(key, None)
            if done_position is None or done_position.commit_lsn != position.commit_lsn:
                done_count = 1
            elif done_count is not None:
                done_count += 1
            done_position, done_history, last = position, history, message.offset
            taken += 1
            i += 1
        if taken:
            self.progress[tp] = PartitionProgress(topic, partition, last, done_position, done_history, done_count)
            self.applied += taken
            self.applied_by_topic[topic] = self.applied_by_topic.get(topic, 0) + taken
        return i

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


def parse_ahead(fetched: dict[Any, list], end_records_topic: str | None,
                builder: BatchBuilder) -> dict[Any, list[tuple[Any, tuple[dict[str, Any], Any] | None]]]:
    """The fetched records with their change events parsed ((record, (event, position)) per
    partition), while a batch is still being applied. A record that does not parse is left
    unparsed (None): it is parsed again in its turn, and stops the sink or goes to the dead letters
    there, after the records before it."""
    out = {}
    # Events are trees of dicts and lists, never cycles: the cycle collector has nothing to find in
    # them, yet it walks every one of them again and again while a batch's worth stays alive.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for tp, messages in fetched.items():
            items = out[tp] = []
            # The headers of the last record read and their json columns: the records after it
            # mostly have the same (one table and history per partition), so compared, not looked up.
            last_headers = json_columns = last = None
            for message in messages:
                parsed = None
                if message.value is not None and message.topic != end_records_topic:
                    headers = message.headers
                    if last is not None and (headers is last_headers or headers == last_headers):
                        try:
                            parsed = decode_change_as(message.value, json_columns)
                        except NotAnEvent:
                            pass
                    else:
                        try:
                            parsed = builder.parse_record(message)
                        except UnreadableRecordError:
                            pass
                        last = builder.shape(message)  # (remembered by parse_record)
                        if last is not None:
                            last_headers, json_columns = headers, last.json_columns
                items.append((message, parsed))
    finally:
        if collecting:
            gc.enable()
    return out
