"""Privacy policy of one table: which columns are published, masked or dropped, and which rows.

Pure functions over rows in their JSON value forms (column name -> value), so the connector's
stream path and the snapshot path publish exactly the same thing:

- :meth:`TablePolicy.publish_row` maps a row to the row as published, or None when the row filter
  drops it; :meth:`TablePolicy.map_row` maps without filtering (keys, key-only before-images).
- :meth:`TablePolicy.published_schema` is the ``cdc.schema`` header as published: excluded columns
  absent, masked ones ``text``, so a sink never creates a column for a dropped field.
- :meth:`TablePolicy.apply` turns the events of one row change into the events as published, with
  PostgreSQL's row-filter semantics for updates (:func:`update_transition`).
- :func:`plan_pushdown` decides what a publication can enforce without breaking the application's
  own UPDATE and DELETE statements (PostgreSQL 15+ column lists and row filters).

Rules name columns as the catalog names them at start; the connector then binds them to the
columns' identities (attnum) and follows renames (cdc.connector.tables). A column added to an ``include``
table later is dropped, one added to an ``exclude`` table is published unless its name is excluded.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from cdc.events.schema import Column, TableSchema
from cdc.transform.filter_values import MissingColumn
from cdc.transform.rowfilter import FilterError, RowFilter

Row = dict[str, Any]

FATES = ("pass", "exclude", "hash", "keep_first", "keep_last", "redact", "null")
REDACTED = "[redacted]"  # what `redact` publishes for every non-null value
PUSHDOWN_MIN_VERSION = 150000  # column lists and row filters in publications: PostgreSQL 15


class Hasher:
    """Keyed HMAC-SHA256 of a value's text, as ``<key id>:<64 hex digits>``: deterministic for one
    key, so joins on hashed columns still work, and the key id says which key made it."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: str, key_id: str):
        self._key = key.encode("utf-8")
        self.key_id = key_id

    def __repr__(self) -> str:  # never the key
        return f"Hasher(key_id={self.key_id!r})"

    def __call__(self, value: Any) -> str:
        digest = hmac.new(self._key, value_text(value).encode("utf-8"), hashlib.sha256).hexdigest()
        return f"{self.key_id}:{digest}"


def value_text(value: Any) -> str:
    """A value's text: a string as it is, anything else as its JSON form (42, true, [1,2], {...})."""
    return value if isinstance(value, str) else orjson.dumps(value).decode("utf-8")


@dataclass(frozen=True, slots=True)
class Mask:
    kind: str  # hash, keep_first, keep_last, redact, null
    keep: int = 0  # characters kept by keep_first / keep_last

    def apply(self, value: Any, hasher: Hasher | None) -> Any:
        # NULL stays NULL for every mask: there is no value to hide, and a sink can still tell "unknown".
        if value is None or self.kind == "null":
            return None
        if self.kind == "hash":
            assert hasher is not None, "hash mask without a hash key (checked when the pipeline loads)"
            return hasher(value)
        if self.kind == "redact":
            return REDACTED
        text = value_text(value)
        hidden = max(len(text) - self.keep, 0)
        if self.kind == "keep_first":
            return text[: self.keep] + "*" * hidden
        return "*" * hidden + text[len(text) - min(self.keep, len(text)):]


class ColumnFacts(Protocol):
    """What the catalog says about a column (cdc.source.postgres.catalog.ColumnInfo)."""

    name: str
    type: str
    kind: str
    array: bool
    builtin: bool
    toastable: bool


@dataclass(frozen=True)
class TablePolicy:
    table: str  # for messages: public.customers
    include: frozenset[str] | None = None  # allowlist; None: every column not excluded
    exclude: frozenset[str] = frozenset()
    masks: Mapping[str, Mask] = field(default_factory=dict)
    row_filter: RowFilter | None = None
    hasher: Hasher | None = None
    _match: Callable[[Mapping[str, Any]], bool] | None = None  # the filter bound to column types

    # -- columns ----------------------------------------------------------------------------------

    def passes(self, name: str) -> bool:
        return name in self.include if self.include is not None else name not in self.exclude

    def fate(self, name: str) -> str:
        if not self.passes(name):
            return "exclude"
        mask = self.masks.get(name)
        return mask.kind if mask is not None else "pass"

    def map_row(self, row: Mapping[str, Any]) -> Row:
        """The row as published (no filtering): excluded columns dropped, masked ones masked."""
        out: Row = {}
        for name, value in row.items():
            if not self.passes(name):
                continue
            mask = self.masks.get(name)
            out[name] = value if mask is None else mask.apply(value, self.hasher)
        return out

    def published_schema(self, schema: TableSchema) -> TableSchema:
        columns = []
        for col in schema.columns:
            if not self.passes(col.name):
                continue
            mask = self.masks.get(col.name)
            if mask is not None:  # masked values travel as text, and so does their default
                col = Column(col.name, "text", "text", False, col.nullable or mask.kind == "null", True,
                             mask.apply(col.default, self.hasher), col.attnum)
            columns.append(col)
        return TableSchema(schema.schema, schema.table, tuple(columns), schema.key)

    # -- rows -------------------------------------------------------------------------------------

    def bind(self, schema: TableSchema) -> TablePolicy:
        """This policy with its row filter bound to the column types of `schema` (FilterError if it
        names a column the schema lacks, or compares in a way cdc does not evaluate as PostgreSQL)."""
        if self.row_filter is None:
            return self
        types = {c.name: (c.type, c.array) for c in schema.columns}
        return replace(self, _match=self.row_filter.bind(types))

    def matches(self, row: Mapping[str, Any]) -> bool:
        """Whether the row filter publishes this row (always, without a filter)."""
        if self.row_filter is None:
            return True
        assert self._match is not None, "TablePolicy.bind() first"
        try:
            return self._match(row)
        except MissingColumn as exc:  # names the column, never a value
            raise FilterError(f"row filter of {self.table} needs column {exc.args[0]}, which the change does not carry") from None

    def publish_row(self, row: Mapping[str, Any]) -> Row | None:
        """The row as published, or None when the row filter drops it. The snapshot path's entry."""
        return self.map_row(row) if self.matches(row) else None

    def apply(self, events: Sequence[Any]) -> list[Any | None]:
        """Events of one row change (objects with op, before, after, key, unchanged) as published.

        Returns one entry per input, None where the filter drops the event, so a caller can keep
        positions independent of the policy. `before` is a full row or only the key; `after` may
        lack `unchanged` columns."""
        out: list[Any | None] = []
        for event in events:
            op = event.op
            if self.row_filter is not None:
                if op == "c":
                    op = "c" if self.matches(event.after) else None
                elif op == "d":
                    op = "d" if self.matches(event.before) else None
                elif op == "u":
                    # Without a before-image the key did not change, and a filter of such a table
                    # names key columns only (checked at start): the old row matched as the new one does.
                    new_in = self.matches(event.after)
                    old_in = self.matches(event.before) if event.before is not None else new_in
                    op = update_transition(old_in, new_in)
            if op is None:
                out.append(None)
                continue
            before, after = event.before, event.after
            if op == "c" and event.op == "u":
                before = None  # moved into the filter: an insert of the full new row
            if op == "d" and event.op == "u":
                after = None  # moved out of the filter: a delete of the old row
            key = event.key if op != "d" or event.op == "d" else {k: before[k] for k in event.key}
            out.append(replace(
                event, op=op,
                before=None if before is None else self.map_row(before),
                after=None if after is None else self.map_row(after),
                key=None if key is None else self.map_row(key),
                unchanged=tuple(n for n in event.unchanged if self.passes(n)),
            ))
        return out


def update_transition(old_in: bool, new_in: bool) -> str | None:
    """PostgreSQL's publication semantics for an UPDATE under a row filter: the op to publish."""
    if old_in and new_in:
        return "u"
    if new_in:
        return "c"  # moved into the filter: an insert with the full row
    if old_in:
        return "d"  # moved out of the filter: a delete
    return None


# ---- compiling a table's rules against the catalog ------------------------------------------------


@dataclass(frozen=True)
class TableRules:
    """A table's rules as the pipeline file writes them (cdc.config.privacy.TablePrivacy)."""

    include: tuple[str, ...] | None
    exclude: tuple[str, ...]
    masks: Mapping[str, Mask]
    rows: str | None


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def compile_policy(
    table: str, rules: TableRules, columns: Sequence[ColumnFacts], key: Sequence[str], identity: str,
    hasher: Hasher | None, where: Callable[..., str],
) -> tuple[TablePolicy | None, list[str]]:
    """Check `rules` against the table's columns; the policy, or the problems (FILE:LINE: ...).

    `where(*path)` locates a path under the table's entry (("mask", "email"), ("rows",) ...)."""
    problems: list[str] = []
    by_name = {c.name: c for c in columns}

    def unknown(name: str, *path: Any) -> None:
        problems.append(f"{where(*path)}: column {name} does not exist in {table}{_did_you_mean(name, by_name)} "
                        "(column names are written exactly as in the catalog). If it was renamed, write its new name "
                        "here: the policy follows the column, and changes from before the rename still in the slot "
                        "are matched to it; if it was dropped, remove it")

    for name in rules.include or ():
        if name not in by_name:
            unknown(name, "include")
    for name in rules.exclude:
        if name not in by_name:
            unknown(name, "exclude")
    for name in rules.masks:
        if name not in by_name:
            unknown(name, "mask", name)
    for name in key:
        if (rules.include is not None and name not in rules.include) or name in rules.exclude:
            at = "include" if rules.include is not None else "exclude"
            problems.append(f"{where(at)}: {table}: key column {name} cannot be excluded: events are keyed by it "
                            "(mask it with hash instead)")
    for name, mask in rules.masks.items():
        col = by_name.get(name)
        if col is None:
            continue
        if name in key and mask.kind != "hash":
            problems.append(f"{where('mask', name)}: {table}: key column {name} can only be masked with hash "
                            f"(which keeps keys unique and stable), not {mask.kind}")
        if mask.kind in ("keep_first", "keep_last") and (col.kind != "text" or col.array):
            problems.append(f"{where('mask', name)}: {table}: {mask.kind} applies to text columns; {name} is "
                            f"{col.type} (use hash, redact or null)")
    row_filter = None
    if rules.rows is not None:
        try:
            row_filter = RowFilter.parse(rules.rows)
            row_filter.bind({c.name: (c.type, c.array) for c in columns})
            outside = [c for c in row_filter.columns if c not in key]
            if identity != "f" and outside:
                problems.append(
                    f"{where('rows')}: {table}: the row filter names column(s) {', '.join(outside)} outside the primary "
                    "key, but with REPLICA IDENTITY DEFAULT an UPDATE does not carry their old values, so a row leaving "
                    f"the filter could not be told apart. Run: ALTER TABLE {table} REPLICA IDENTITY FULL"
                )
        except FilterError as exc:
            problems.append(f"{where('rows')}: {table}: row filter {exc}")
    if problems:
        return None, problems
    include = frozenset(rules.include) if rules.include is not None else None
    policy = TablePolicy(table, include, frozenset(rules.exclude), dict(rules.masks), row_filter, hasher)
    return policy, []


# ---- pushdown into the publication ----------------------------------------------------------------


@dataclass(frozen=True)
class Pushdown:
    """What the publication enforces for one table, and why the rest stays with the connector."""

    columns: tuple[str, ...] | None = None  # publication column list; None: every column
    where: str | None = None  # publication row filter (PostgreSQL SQL)
    columns_reason: str | None = None  # why excluded columns are not in a column list
    rows_reason: str | None = None  # why the row filter is not in the publication

    @property
    def columns_at(self) -> str:
        return "publication" if self.columns is not None else "connector"

    @property
    def rows_at(self) -> str:
        return "publication" if self.where is not None else "connector"


def plan_pushdown(
    policy: TablePolicy, columns: Sequence[ColumnFacts], key: Sequence[str], identity: str,
    server_version: int, blocker: str | None = None,
) -> Pushdown:
    """Push down what cannot break the application's writes. PostgreSQL refuses UPDATE and DELETE on
    a published table whose column list does not cover the replica identity, or whose row filter
    names a column outside it; such a publication is never created. `blocker` says why the
    publication cannot carry per-table lists at all (FOR ALL TABLES, say)."""
    dropped = [c.name for c in columns if not policy.passes(c.name)]
    general = blocker
    if general is None and server_version < PUSHDOWN_MIN_VERSION:
        general = f"PostgreSQL {server_version // 10000} has no publication column lists or row filters (15+)"
    col_list, columns_reason = None, None
    if dropped:
        if general:
            columns_reason = general
        elif identity == "f":
            columns_reason = ("REPLICA IDENTITY FULL: a column list must cover every column, or PostgreSQL refuses "
                              "UPDATE and DELETE on the table")
        elif not set(key) <= {c.name for c in columns if policy.passes(c.name)}:
            columns_reason = "the column list would not cover the primary key (the replica identity)"
        else:
            col_list = tuple(c.name for c in columns if policy.passes(c.name))
    where, rows_reason = None, None
    if policy.row_filter is not None:
        by_name = {c.name: c for c in columns}
        user_typed = [n for n in policy.row_filter.columns if not by_name[n].builtin]
        if general:
            rows_reason = general
        elif user_typed:
            rows_reason = (f"the filter names column(s) {', '.join(user_typed)} of user-defined type(s), which a "
                           "publication WHERE may not use")
        elif identity != "f" and not set(policy.row_filter.columns) <= set(key):
            rows_reason = "the filter names columns outside the replica identity (PostgreSQL would refuse UPDATE and DELETE)"
        else:
            where = policy.row_filter.sql()
    return Pushdown(col_list, where, columns_reason, rows_reason)

