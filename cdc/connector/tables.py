"""Relations as the stream describes them: each pgoutput Relation message (or, for a snapshot of a
table not streamed yet, the catalog) becomes a TableStream: its columns' identities (attnum), their
value converters, the privacy policy bound to this version of the table, key, topic and headers.

Fed by the stream's Relation messages and by snapshot chunks; read by the build and publish stages.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from cdc import native
from cdc.config import PipelineConfig, TableRef
from cdc.connector.positions import Positions
from cdc.connector.shapes import PublishedShapes
from cdc.errors import DecodeError, SourceError
from cdc.events.build import UNCHANGED
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events import schema_ids
from cdc.events.schema import Column, TableSchema, keeps_values
from cdc.lsn import format_lsn
from cdc.source.postgres import pgoutput
from cdc.source.postgres.catalog import Catalog, TableInfo
from cdc.source.postgres.column_identity import ColumnIdentityError, resolve_attnums
from cdc.source.postgres.snapshot import request_snapshot
from cdc.source.postgres.values import Converter, ValueDecoder
from cdc.transform import column_bindings
from cdc.transform.plan import PrivacyPlan
from cdc.transform.privacy import TablePolicy
from cdc.transform.rowfilter import FilterError

log = logging.getLogger(__name__)

_UNCHANGED = pgoutput.UNCHANGED_TOAST
# Prefix of the messages sql/column_identity.sql's event trigger writes after every ALTER TABLE.
COLUMNS_MESSAGE_PREFIX = "cdc.columns"


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
    published: TableSchema | None = None  # the shape as published (schema_json): `schema` after the policy
    shape_recorded: bool = False  # its shape is on the schema changes topic (see PublishedShapes.record)
    # The published schema's JSON, which the event headers name by id (cdc.events.schema_ids), and
    # whether it is on the schemas topic (see PublishedShapes.publish_schema)
    schema_json: bytes = b""
    schema_sent: bool = False
    # Per column, the compiled core's conversion (cdc.source.postgres.values.native_conversion); with
    # the core in use (cdc.native), `row` runs the plan compiled from them. Empty: the Python path.
    conversions: tuple[int, ...] = ()
    native_plan: Any = field(default=None, init=False, repr=False)
    # The compiled core's encoder of this relation's INSERTs straight to Kafka key and value
    # (cdc.connector.stream): None where it cannot encode every column, or a privacy policy applies.
    insert_encoder: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.native_plan = row_plan(self.names, self.converters, self.conversions)
        if self.native_plan is not None and self.policy is None:
            self.insert_encoder = insert_encoder(self.names, self.converters, self.conversions, self.key_names)

    def row(self, values: tuple, lsn: int) -> dict[str, Any]:
        plan = self.native_plan
        if plan is not None:
            try:
                return plan.row(values)
            except Exception:  # a converter refused a value: the Python path names the column
                pass
        return self.python_row(values, lsn)

    def python_row(self, values: tuple, lsn: int) -> dict[str, Any]:
        """The row of a tuple's values: the pure-Python path (and the reference of the compiled core's)."""
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


def row_plan(names: tuple[str, ...], converters: tuple[Converter | None, ...], conversions: tuple[int, ...]) -> Any:
    """The compiled core's plan of a relation's rows, or None: the core is not in use, or no
    conversions were given (then the Python path runs)."""
    if native.core is None or len(conversions) != len(names):
        return None
    return native.core.RowPlan(list(zip(names, conversions, converters)), _UNCHANGED, UNCHANGED, orjson.Fragment)


def insert_encoder(names: tuple[str, ...], converters: tuple[Converter | None, ...], conversions: tuple[int, ...],
                   key_names: tuple[str, ...], core: Any = None) -> Any:
    """The compiled core's InsertEncoder of a relation, or None: a column it does not encode (a
    float, a type with a Python converter), or a key column not in the row."""
    core = core or native.core
    published = [convert is not None for convert in converters]
    encoded = set(core.INSERT_CONVERSIONS)
    if any(p and c not in encoded for p, c in zip(published, conversions)):
        return None
    index = {name: i for i, name in enumerate(names)}
    if not all(name in index and published[index[name]] for name in key_names):
        return None
    columns = [(orjson.dumps(name) + b":", c, p) for name, c, p in zip(names, conversions, published)]
    return core.InsertEncoder(columns, [index[name] for name in key_names])


@dataclass
class TopicLayout:
    """What Kafka said of the pipeline's topics at start."""

    partitions: dict[str, int]
    compacted: set[str]


class Tables:
    """relation id -> TableStream (None: published, but not a table of the pipeline)."""

    def __init__(self, config: PipelineConfig, catalog: Catalog, values: ValueDecoder, tables: dict[int, TableInfo],
                 privacy: PrivacyPlan, origin: SourceOrigin, topics: TopicLayout, shapes: PublishedShapes,
                 positions: Positions, column_lists_changed: set[tuple[str, str]]):
        self.config = config
        self.catalog = catalog
        self.values = values
        self.tables = tables  # by table OID = pgoutput relation id
        self.privacy = privacy
        self.origin = origin
        self.topics = topics
        self.shapes = shapes
        self.positions = positions  # the transaction being read: named in errors, compared with recorded shapes
        self.column_lists_changed = column_lists_changed  # tables whose publication column list this start changed
        self.streams: dict[int, TableStream | None] = {}
        # Column identity (see _column_identities): each relation's last version as name -> attnum,
        # and per table the names the catalog had at start by attnum (the policy is bound to those).
        self._identities: dict[int, dict[str, int]] = {}
        self._start_names = {ref: {c.attnum: c.name for c in plan.columns} for ref, plan in privacy.tables.items()}
        self._renames_logged: set[tuple[TableRef, str, str]] = set()
        self._catalog_names: dict[int, str] = {}  # attnum -> name now, of the relation being described
        self._columns_after_ddl: dict[int, dict[str, int]] = {}  # relation id -> name -> attnum, from the event trigger

    async def on_relation(self, rel: pgoutput.Relation) -> None:
        self.streams[rel.relation_id] = await asyncio.to_thread(self._table_stream, rel)

    def stream_for(self, relation_id: int, lsn: int) -> TableStream | None:
        try:
            return self.streams[relation_id]
        except KeyError:
            raise DecodeError(f"change for relation {relation_id} at LSN {format_lsn(lsn)} before its Relation message") from None

    def relation_of(self, table: TableRef) -> int:
        return next(oid for oid, info in self.tables.items() if info.ref == table)

    def snapshot_stream(self, table: TableRef) -> TableStream | None:
        """The relation as the stream knows it, or as the catalog describes it now when no change of
        it has been streamed yet (pgoutput sends a Relation message before a relation's first change)."""
        oid = self.relation_of(table)
        stream = self.streams.get(oid)
        if stream is None:
            rel = self.catalog.relation(oid, self.config.source.publication)
            stream = self.streams[oid] = self._table_stream(rel, from_catalog=True)
        return stream

    def note_columns(self, content: bytes) -> None:
        """A table's columns after an ALTER TABLE, from the event trigger of sql/column_identity.sql."""
        try:
            payload = orjson.loads(content)
            self._columns_after_ddl[int(payload["oid"])] = {str(n): int(a) for a, n in payload["columns"] or ()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring an unreadable %s message", COLUMNS_MESSAGE_PREFIX)

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
        columns, converters, conversions = [], [], []
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
            conversions.append(self.values.native_conversion(desc))
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
        schema_json = published.to_json()
        return TableStream(
            ref=ref, topic=topic, schema=schema, names=names,
            converters=tuple(converters), key_names=info.primary_key,
            headers=[(schema_ids.HEADER, schema_ids.schema_id(schema_json)), (ORIGIN_HEADER, self.origin.to_json())],
            partitions=self.topics.partitions[topic], compacted=topic in self.topics.compacted, policy=policy,
            published=published, schema_json=schema_json, conversions=tuple(conversions),
        )

    def _reread_if_rewritten(self, relation_id: int, table: TableRef, schema: TableSchema, published: TableSchema,
                             from_catalog: bool) -> None:
        """A column that changed type in a way that may have changed its values (anything but a
        widening, see keeps_values: e.g. ALTER ... TYPE integer USING length(d)) was rewritten by
        the source without a row change in the WAL. Request an on-demand snapshot of the table, as
        `cdc snapshot` does: its r events, after this change, carry the values the source computed,
        and the sinks rewrite the column from them. The request is in the WAL before this
        transaction can be confirmed, and before the new shape is recorded on the schema changes
        topic (see PublishedShapes.record), so a crash cannot lose it.

        The first description of a table in a run has no earlier one to compare with: it is compared
        with the shape last published (the sinks' view, so by published type), when it is newer than
        that: a change made while the connector was down, or before a kill."""
        previous = self.streams.get(relation_id)
        if previous is not None:
            old, new = previous.schema, schema
        else:
            last = self.shapes.last.get(table)
            if last is None:
                return  # nothing published of the table yet
            txn_info = self.positions.info
            if not from_catalog and (txn_info is None or txn_info.commit_lsn <= last.position.commit_lsn):
                return  # a change up to the last recorded one, read again after a restart: compared then
            old, new = last.schema, published
        old_types = {c.attnum: c.type for c in old.columns if c.attnum is not None}
        rewritten = [c.name for c in new.columns
                     if c.attnum in old_types and not keeps_values(old_types[c.attnum], c.type)]
        if rewritten:
            request, _ = request_snapshot(self.config.source.conninfo, self.config.source.slot, [table], None)
            log.warning("%s: the type of %s changed (the source rewrote the values); re-reading the table "
                        "(snapshot request %s) so that the sinks get the new values", table,
                        ", ".join(rewritten), request)

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
                                      exact_prefix=(ref.schema, ref.name) not in self.column_lists_changed)
        except ColumnIdentityError as exc:
            txn_info = self.positions.info
            at = f" at commit {txn_info.commit_lsn_text}" if txn_info is not None else ""
            skip = (f"; or, to publish nothing of that transaction, stop and run: cdc connector FILE --skip-to-lsn "
                    f"{format_lsn(txn_info.commit_lsn + 1)}") if txn_info is not None else ""
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
