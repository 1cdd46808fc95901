"""What the source database says about the pipeline's tables, asked over an ordinary connection.

Up-front checks (wal_level, tables, primary keys, replica identity), publication management, and
type descriptions (``format_type`` and our portable kind) for the type OIDs that Relation messages
carry. Everything here runs at start-up or once per relation version, never per row.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import psycopg
import sqlglot
from psycopg import sql
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from collections.abc import Mapping, Sequence
from typing import Protocol

from cdc.errors import SourceError
from cdc.source.postgres.pgoutput import Relation, RelationColumn
from cdc.sqlnames import quote_ident

log = logging.getLogger(__name__)

# Types below this OID come with every PostgreSQL (FirstNormalObjectId): a PostgreSQL sink can
# create columns of exactly that type. Anything above is user-defined (enums, domains, extensions).
FIRST_NORMAL_OID = 16384

# Built-in type OID -> portable kind (cdc.events.schema.KINDS). Unlisted types travel as text.
KIND_BY_OID = {
    16: "boolean", 21: "smallint", 23: "integer", 20: "bigint", 26: "bigint", 1700: "numeric",
    700: "real", 701: "double", 25: "text", 1043: "text", 1042: "text", 19: "text", 18: "text",
    17: "bytea", 1082: "date", 1083: "time", 1266: "timetz", 1114: "timestamp", 1184: "timestamptz",
    1186: "interval", 2950: "uuid", 114: "json", 3802: "jsonb",
}


class TableRef(Protocol):
    """A table as the pipeline names it (cdc.config.TableRef): catalog names, and str() for messages."""

    schema: str
    name: str


@dataclass(frozen=True, slots=True)
class TypeDescription:
    type: str  # format_type() of the (domain-resolved) type, e.g. "numeric(30,10)", "integer[]"
    kind: str
    array: bool
    builtin: bool
    loader_oid: int  # OID whose psycopg loader reads the text value (domains resolved to their base)
    delimiter: str = ","  # between array elements in the text form (typdelim: ";" for box)


@dataclass(frozen=True, slots=True)
class TableInfo:
    ref: TableRef
    oid: int
    replica_identity: str  # 'd' default, 'f' full, 'i' index, 'n' nothing
    partitioned: bool
    primary_key: tuple[str, ...]
    not_null: frozenset[str]


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    type: str
    kind: str
    array: bool
    builtin: bool
    toastable: bool  # may be stored out of line (see toastable_columns)
    attnum: int | None = None  # pg_attribute.attnum: the column's identity across renames


@dataclass(frozen=True, slots=True)
class LiveColumn:
    """A column of the table as the catalog holds it now (see Catalog.live_columns)."""

    attnum: int
    name: str
    type_oid: int


class ColumnIdentityError(SourceError):
    """The connector cannot tell which column a Relation message's column is (several schema changes
    at once, or the catalog already moved past the change). It stops before publishing the change."""


def resolve_attnums(
    names: Sequence[str], type_oids: Sequence[int], live: Sequence[LiveColumn], dropped: Sequence[int],
    previous: Mapping[str, int] | None, exact_prefix: bool = True,
) -> list[int]:
    """The attnum of each column of a Relation message (`names`, `type_oids`, in attnum order).

    pgoutput's Relation message carries names and types, no identity, so the columns are matched
    with the catalog as it is now (`live`: its published, non-generated columns in attnum order) and
    with the relation's previous version in this run (`previous`: name -> attnum) and the table's
    dropped columns (`dropped`: their attnums), and accepted only when that is conclusive. Raises
    ColumnIdentityError (saying what is unclear) otherwise:

    - Without dropped columns, the message's columns are the first live ones, in order: attnums are
      never reused, so the table had columns 1..n then, and later ones were added after it. Renames
      made after the change are followed (a restart after a rename reads older changes this way).
      Not where the publication's column list changed since (`exact_prefix` False).
    - Else by name, where every name still exists; where the others are fixed by their place
      between the columns matched by name (see _fit_gaps), they are those; or by position, where
      the types line up. Each must list columns in attnum order and agree with the previous
      version: a name it knew keeps its attnum, none of its columns that still lives vanishes, and
      a column new by name is new in the catalog under that very name.
    """
    def unclear(what: str) -> ColumnIdentityError:
        return ColumnIdentityError(what)

    if not dropped and len(live) >= len(names) and exact_prefix:
        return [c.attnum for c in live[:len(names)]]
    by_name = {c.name: c.attnum for c in live}
    live_attnums = {c.attnum: c.name for c in live}
    for name in names:  # a column known before and dropped since is that column: attnums are never reused
        dropped_since = previous is not None and name in previous and previous[name] not in live_attnums
        if dropped_since and name in by_name:
            raise unclear(f"column {name} was dropped and added again: the change may hold either")
        if dropped_since:
            by_name[name] = previous[name]
    fitted = _fit_gaps(names, by_name, live_attnums, dropped)
    if all(n in by_name for n in names):
        attnums = [by_name[n] for n in names]
        how = "by name"
    elif fitted is not None:
        attnums, how = fitted, "by name and place"
    elif len(live) == len(names) and all(c.type_oid == t for c, t in zip(live, type_oids)):
        attnums = [c.attnum for c in live]
        how = "by position"
    else:
        missing = [n for n in names if n not in by_name]
        raise unclear(f"column(s) {', '.join(missing)} of the change no longer exist under that name, and the "
                      f"table's columns do not line up with the change's ({len(names)} then, {len(live)} now)")
    if any(a >= b for a, b in zip(attnums, attnums[1:])):  # a Relation message lists columns in attnum order
        raise unclear(f"the change's columns ({', '.join(names)}) match the catalog's {how} out of their order: "
                      "columns were renamed since")
    if previous is not None:
        known = set(previous.values())
        for name, attnum in zip(names, attnums):
            before = previous.get(name)
            if before is not None and before != attnum and before in live_attnums:
                raise unclear(f"column {name} was column #{before} before and matches column #{attnum} {how} now")
            if attnum not in known and attnum in live_attnums and live_attnums[attnum] != name:
                raise unclear(f"column {name} is new since the previous change, but the catalog's column matched "
                              f"{how} (#{attnum}) is named {live_attnums[attnum]}: the table changed again since")
        vanished = [n for n, a in previous.items() if a not in attnums and a in live_attnums]
        if vanished:
            raise unclear(f"column(s) {', '.join(vanished)} still exist but are not matched to the change's columns")
    elif how == "by position" and dropped:
        renamed = [n for n, a in zip(names, attnums) if live_attnums.get(a) != n]
        raise unclear(f"column(s) {', '.join(renamed)} of the change no longer exist under that name and the table "
                      "has dropped columns: a rename cannot be told from a drop and an add")
    return attnums


def _fit_gaps(names: Sequence[str], by_name: Mapping[str, int], live: Mapping[int, str],
              dropped: Sequence[int]) -> list[int] | None:
    """Attnums for `names` where those missing from `by_name` (renamed or dropped since) are fixed by
    their place: a Relation message lists columns in attnum order, so each run of missing names lies
    between its matched neighbours' attnums, and it is determined when exactly as many columns (live
    but not matched by name, or dropped) lie there. A gap without missing names may hold dropped
    columns (dropped before the change) but no unmatched live one, except after the last matched
    column (added since). None where that does not fit."""
    matched = {by_name[n] for n in names if n in by_name}
    unplaced = sorted(a for a in [*live, *dropped] if a not in matched)
    attnums: list[int] = []
    gap: list[str] = []
    low = 0
    for name in [*names, None]:
        high = by_name.get(name) if name is not None else 1 << 16
        if name is not None and high is None:
            gap.append(name)
            continue
        between = [a for a in unplaced if low < a < high]
        if gap and len(between) != len(gap):
            return None
        if not gap and name is not None and any(a in live for a in between):
            return None  # a live column the change does not list, before one it does
        attnums += between if gap else []
        gap = []
        if name is not None:
            attnums.append(high)
            low = high
    return attnums


@dataclass(frozen=True, slots=True)
class PublishedTable:
    """A table's entry in a publication: its column list and row filter (None: all columns, no filter)."""

    ref: TableRef
    columns: tuple[str, ...] | None
    where: str | None


class Catalog:
    """Catalog look-ups on a plain autocommit connection, cached by OID."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self._types: dict[tuple[int, int], TypeDescription] = {}

    def describe_type(self, oid: int, typmod: int) -> TypeDescription:
        cached = self._types.get((oid, typmod))
        if cached is None:
            cached = self._types[(oid, typmod)] = self._describe_type(oid, typmod)
        return cached

    def _pg_type(self, oid: int) -> tuple:
        row = self.conn.execute(
            "SELECT typtype, typcategory, typelem, typbasetype, typtypmod, typarray, typdelim FROM pg_type WHERE oid = %s",
            (oid,),
        ).fetchone()
        if row is None:
            raise SourceError(f"type OID {oid} does not exist in the source database")
        return row

    def _resolve_domain(self, oid: int, typmod: int) -> tuple[int, int, tuple]:
        row = self._pg_type(oid)
        while row[0] == "d":  # a domain travels as its base type
            oid, typmod = row[3], typmod if typmod != -1 else row[4]
            row = self._pg_type(oid)
        return oid, typmod, row

    def _describe_type(self, oid: int, typmod: int) -> TypeDescription:
        oid, typmod, row = self._resolve_domain(oid, typmod)
        typcategory, typelem = row[1], row[2]
        # A true array is its element's typarray. int2vector and oidvector also have category 'A' and
        # an element type, but print as "1 2 3", not as an array literal: they travel as text.
        array = typcategory == "A" and typelem != 0 and self._pg_type(typelem)[5] == oid
        delimiter = ","
        if array:
            elem_row = self._pg_type(typelem)
            delimiter = elem_row[6]  # the array's own element type decides (a domain over box keeps ";")
            elem_oid, _, elem_row = self._resolve_domain(typelem, -1)
            loader_oid = elem_row[5] or oid
            kind_oid, builtin = elem_oid, elem_oid < FIRST_NORMAL_OID
        else:
            loader_oid, kind_oid, builtin = oid, oid, oid < FIRST_NORMAL_OID
        if array:  # an array of a domain is an array of the domain's base type
            (type_name,) = self.conn.execute("SELECT format_type(%s, %s) || '[]'", (kind_oid, typmod)).fetchone()
        else:
            (type_name,) = self.conn.execute("SELECT format_type(%s, %s)", (oid, typmod)).fetchone()
        kind = KIND_BY_OID.get(kind_oid, "text") if builtin else "text"
        return TypeDescription(
            type=type_name, kind=kind, array=array, builtin=builtin, loader_oid=loader_oid, delimiter=delimiter
        )

    def missing_values(self, table_oid: int) -> dict[str, str]:
        """Column -> the value, as PostgreSQL prints it, that rows older than the column hold.

        ``ALTER TABLE ... ADD COLUMN c ... DEFAULT x`` with a non-volatile default writes no WAL: old rows
        read ``x`` from ``pg_attribute.attmissingval`` (a one-element array of the column's type). A
        volatile default (``random()``, ``clock_timestamp()``) rewrites the table instead, also without
        WAL that logical decoding sees, and leaves no missing value: see the README.
        """
        # attmissingval holds one element; array_to_string prints it with the type's output function.
        rows = self.conn.execute(
            """SELECT attname, array_to_string(attmissingval, '') FROM pg_attribute
               WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND atthasmissing""",
            (table_oid,),
        ).fetchall()
        return {name: text for name, text in rows if text is not None}

    def table_info(self, ref: TableRef) -> TableInfo | None:
        row = self.conn.execute(
            """SELECT c.oid, c.relreplident, c.relkind FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %s AND c.relname = %s""",
            (ref.schema, ref.name),
        ).fetchone()
        if row is None or row[2] not in ("r", "p"):
            return None  # views, sequences and the like have no changes to stream
        oid, identity = row[0], row[1]
        pkey = [
            r[0]
            for r in self.conn.execute(
                """SELECT a.attname FROM pg_index i
                   CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                   WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord""",
                (oid,),
            )
        ]
        not_null = {
            r[0]
            for r in self.conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND attnotnull",
                (oid,),
            )
        }
        return TableInfo(
            ref=ref, oid=oid, replica_identity=identity, partitioned=row[2] == "p", primary_key=tuple(pkey),
            not_null=frozenset(not_null),
        )

    def relation(self, oid: int, publication: str) -> Relation:
        """The table as a pgoutput Relation message for `publication` would describe it now: the
        publication's columns (all, unless it has a column list), the key columns flagged. For
        reading its rows before the stream has described it; columns the publication leaves out are
        never read."""
        namespace, name, identity = self.conn.execute(
            "SELECT n.nspname, c.relname, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = %s", (oid,)
        ).fetchone()
        row = self.conn.execute(
            "SELECT attnames FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s AND tablename = %s",
            (publication, namespace, name),
        ).fetchone()
        published = set(row[0]) if row is not None and row[0] is not None else None
        key = {
            r[0] for r in self.conn.execute(
                "SELECT unnest(indkey) FROM pg_index WHERE indrelid = %s AND indisprimary", (oid,))
        }
        columns = tuple(
            RelationColumn(attnum in key, attname, atttypid, atttypmod)
            for attnum, attname, atttypid, atttypmod in self.conn.execute(
                "SELECT attnum, attname, atttypid, atttypmod FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
                " AND NOT attisdropped AND attgenerated = '' ORDER BY attnum", (oid,))
            if published is None or attname in published
        )
        return Relation(oid, namespace, name, identity, columns)

    def columns(self, oid: int) -> list[ColumnInfo]:
        """The table's columns in order, with their types as events describe them."""
        rows = self.conn.execute(
            """SELECT attname, atttypid, atttypmod, attlen = -1 AND attstorage <> 'p', attnum FROM pg_attribute
               WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
            (oid,),
        ).fetchall()
        out = []
        for name, type_oid, typmod, toastable, attnum in rows:
            desc = self.describe_type(type_oid, typmod)
            out.append(ColumnInfo(name, desc.type, desc.kind, desc.array, desc.builtin, toastable, attnum))
        return out

    def live_columns(self, oid: int, publication: str) -> tuple[list[LiveColumn], list[int], dict[int, str]]:
        """The columns a Relation message of `publication` would list now (non-generated, within the
        publication's column list, by attnum: a list survives renames), the attnums of the table's
        dropped columns (for resolve_attnums), and every live column's name by attnum."""
        listed = None
        if self.conn.info.server_version >= 150000:
            row = self.conn.execute(
                """SELECT pr.prattrs::int2[] FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                   WHERE p.pubname = %s AND pr.prrelid = %s""", (publication, oid)).fetchone()
            listed = set(row[0]) if row is not None and row[0] is not None else None
        rows = self.conn.execute(
            """SELECT attnum, attname, atttypid, attisdropped, attgenerated <> '' FROM pg_attribute
               WHERE attrelid = %s AND attnum > 0 ORDER BY attnum""", (oid,)).fetchall()
        live = [LiveColumn(attnum, name, type_oid) for attnum, name, type_oid, dropped, generated in rows
                if not dropped and not generated and (listed is None or attnum in listed)]
        return live, [r[0] for r in rows if r[3]], {r[0]: r[1] for r in rows if not r[3]}

    def toastable_columns(self, oid: int) -> list[str]:
        """Columns PostgreSQL may store out of line: an UPDATE that leaves them unchanged does not resend them."""
        return [
            r[0]
            for r in self.conn.execute(
                """SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped
                   AND attlen = -1 AND attstorage <> 'p' ORDER BY attnum""",
                (oid,),
            )
        ]


def check_source(
    catalog: Catalog, tables_at: Mapping[TableRef, str], source_at: str, publication: str,
    dropped: Mapping[TableRef, frozenset[str]] | None = None, *, snapshot_reads: bool = False,
) -> dict[TableRef, TableInfo]:
    """Everything that would make the stream wrong or impossible, reported together before anything
    is created. `tables_at` maps each table to where the pipeline file names it (FILE:LINE), and
    `source_at` is where the connection is configured. `dropped` lists per table the columns the
    privacy policy never publishes: their values never reach events, so they need no full row image.
    `snapshot_reads`: the initial snapshot will read the tables, which needs SELECT on them."""
    conn = catalog.conn
    problems: list[str] = []
    (wal_level,) = conn.execute("SHOW wal_level").fetchone()
    if wal_level != "logical":
        problems.append(
            f"{source_at}: wal_level is {wal_level!r}, logical replication needs "
            "'logical' (ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL)"
        )
    tables: dict[TableRef, TableInfo] = {}
    existing: dict[TableRef, str] = {}
    for ref, where in tables_at.items():
        info = catalog.table_info(ref)
        if info is None:
            problems.append(f"{where}: table {ref} does not exist in the source database")
            continue
        existing[ref] = where
        if snapshot_reads and not conn.execute("SELECT has_table_privilege(%s, 'SELECT')", (info.oid,)).fetchone()[0]:
            (role,) = conn.execute("SELECT current_user").fetchone()
            problems.append(
                f"{where}: role {role} may not read table {ref}, which the initial snapshot reads: "
                f"GRANT SELECT ON {ref} TO {role} (or set source.snapshot: never)"
            )
        if info.partitioned:
            # pgoutput would report changes under each partition's name; not supported yet.
            problems.append(f"{where}: table {ref} is a partitioned table; list its partitions instead")
            continue
        if not info.primary_key:
            problems.append(f"{where}: table {ref} has no primary key; events are keyed by it")
            continue
        if info.replica_identity == "n":
            problems.append(f"{where}: table {ref} has REPLICA IDENTITY NOTHING; updates and deletes cannot be captured")
        elif info.replica_identity == "i":
            problems.append(
                f"{where}: table {ref} has REPLICA IDENTITY USING INDEX; use DEFAULT (primary key) or FULL"
            )
        elif info.replica_identity == "d":
            never = (dropped or {}).get(ref, frozenset())
            toastable = [c for c in catalog.toastable_columns(info.oid) if c not in never]
            if toastable:
                # Without a full before-image, an UPDATE that leaves a TOASTed value unchanged does not
                # resend it, and the event's `after` could not carry the row's full state.
                problems.append(
                    f"{where}: table {ref} has columns PostgreSQL may store out of line ({', '.join(toastable)}); "
                    f"an UPDATE leaving them unchanged does not resend them. Run: ALTER TABLE {ref} REPLICA IDENTITY FULL"
                )
        tables[ref] = info
    # After the tables' own problems: a table that does not exist needs creating, not publishing.
    problems += _privilege_problems(conn, existing, source_at, publication)
    if problems:
        raise SourceError("\n".join(problems))
    return tables


def _privilege_problems(conn: psycopg.Connection, tables_at: Mapping[TableRef, str], source_at: str,
                        publication: str) -> list[str]:
    """What the role lacks to stream (REPLICATION) and to create or extend the publication."""
    problems = []
    role, can_replicate, superuser = conn.execute(
        "SELECT current_user, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not (can_replicate or superuser):
        problems.append(f"{source_at}: role {role} lacks the REPLICATION attribute (ALTER ROLE {role} REPLICATION)")
    row = conn.execute(
        "SELECT pg_has_role(p.pubowner, 'USAGE') FROM pg_publication p WHERE p.pubname = %s", (publication,)
    ).fetchone()
    published = {
        (r[0], r[1]) for r in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (publication,))
    }
    missing = [ref for ref in tables_at if (ref.schema, ref.name) not in published]
    if not missing:
        return problems  # the publication exists and covers every table: nothing to create
    listed = ", ".join(map(str, missing))
    if row is None and not superuser:
        db, can_create = conn.execute(
            "SELECT current_database(), has_database_privilege(current_database(), 'CREATE')").fetchone()
        if not can_create:
            problems.append(
                f"{source_at}: role {role} may not create publication {publication}: GRANT CREATE ON DATABASE "
                f"{_ident(db)} TO {_ident(role)}, or have the tables' owner run: "
                f"CREATE PUBLICATION {_ident(publication)} FOR TABLE {listed}"
            )
    elif row is not None and not row[0]:
        problems.append(
            f"{source_at}: publication {publication} lacks {listed} and role {role} does not own it: have its "
            f"owner run ALTER PUBLICATION {_ident(publication)} ADD TABLE {listed}"
        )
    if superuser:
        return problems
    # Adding a table to a publication needs ownership of the table: one statement for all of them.
    not_owned = []
    for ref in missing:
        owned = conn.execute(
            "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s",
            (ref.schema, ref.name),
        ).fetchone()
        if owned is not None and not owned[0]:
            not_owned.append(ref)
    if not_owned:
        names = ", ".join(map(str, not_owned))
        fix = (f"ALTER PUBLICATION {_ident(publication)} ADD TABLE" if row
               else f"CREATE PUBLICATION {_ident(publication)} FOR TABLE")
        what = f"table {names}, so it cannot add it" if len(not_owned) == 1 else f"tables {names}, so it cannot add them"
        problems.append(
            f"{tables_at[not_owned[0]]}: role {role} does not own {what} to publication {publication}: have the "
            f"owner run {fix} {names}"
        )
    return problems


def _ident(name: str) -> str:
    """A name as a person would type it in a hint: bare when PostgreSQL reads it back unchanged."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else quote_ident(name)


def publication_blocker(conn: psycopg.Connection, name: str) -> str | None:
    """Why the publication cannot carry per-table column lists and row filters, or None."""
    row = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    if row is not None and row[0]:
        return f"publication {name} is FOR ALL TABLES, which takes no column lists or row filters"
    if conn.info.server_version >= 150000 and row is not None:
        schemas = conn.execute(
            "SELECT 1 FROM pg_publication_namespace pn JOIN pg_publication p ON p.oid = pn.pnpubid WHERE p.pubname = %s",
            (name,),
        ).fetchone()
        if schemas:
            return f"publication {name} publishes whole schemas (TABLES IN SCHEMA); cdc does not alter it"
    return None


def published_tables(conn: psycopg.Connection, name: str) -> dict[tuple[str, str], PublishedTable]:
    """The publication's tables with their column lists and row filters as PostgreSQL stores them."""
    if conn.info.server_version < 150000:
        rows = conn.execute(
            "SELECT schemaname, tablename, NULL, NULL FROM pg_publication_tables WHERE pubname = %s", (name,)
        ).fetchall()
    else:
        # prattrs is NULL without a column list (pg_publication_tables.attnames then lists every column).
        rows = conn.execute(
            """SELECT n.nspname, c.relname,
                      (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attnum = ANY (pr.prattrs)),
                      pg_get_expr(pr.prqual, pr.prrelid)
               FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
               JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE p.pubname = %s""",
            (name,),
        ).fetchall()
    return {
        (schema, table): PublishedTable(_Ref(schema, table), tuple(cols) if cols is not None else None, where)
        for schema, table, cols, where in rows
    }


@dataclass(frozen=True, slots=True)
class _Ref:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


def _table_sql(entry: PublishedTable) -> sql.Composable:
    parts: list[sql.Composable] = [sql.Identifier(entry.ref.schema, entry.ref.name)]
    if entry.columns is not None:
        parts.append(sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in entry.columns)))
    if entry.where is not None:
        # The filter was parsed and printed by cdc (or read back from the catalog): SQL, not a value.
        parts.append(sql.SQL("WHERE ({})").format(sql.SQL(entry.where)))
    return sql.SQL(" ").join(parts)


def create_publication_statement(name: str, entries: list[PublishedTable]) -> sql.Composed:
    return sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
        sql.Identifier(name), sql.SQL(", ").join(_table_sql(e) for e in entries))


def set_table_statement(name: str, entries: list[PublishedTable],
                        current: dict[tuple[str, str], PublishedTable]) -> sql.Composed:
    """ALTER PUBLICATION ... SET TABLE with `entries` as wanted and every other table as it is now."""
    ours = {(e.ref.schema, e.ref.name) for e in entries}
    others = [entry for key, entry in current.items() if key not in ours]
    return sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
        sql.Identifier(name), sql.SQL(", ").join(_table_sql(e) for e in [*others, *entries]))


def ensure_publication(
    conn: psycopg.Connection, name: str, wanted: list[TableRef],
    pushdown: Mapping[TableRef, tuple[tuple[str, ...] | None, str | None]] | None = None,
) -> set[tuple[str, str]]:
    """Create the pipeline's publication, or add the tables it lacks (never drops tables the user
    added). `pushdown` gives a table's column list and row filter (None: every column, no filter);
    an existing publication whose lists or filters for our tables differ is reconciled with
    ALTER PUBLICATION ... SET TABLE, which keeps every other table as it is. Returns the (schema,
    table) whose column list or row filter it changed: older WAL still lists their columns as before."""
    pushdown = pushdown or {}
    entries = [PublishedTable(t, *pushdown.get(t, (None, None))) for t in wanted]
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    if not exists:
        log.info("creating publication %s", name)
        try:
            conn.execute(create_publication_statement(name, entries))
            return set()
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            # Another connector of this pipeline created it at the same moment: use it as it is now.
            # (That connector then holds the slot, and this one stops with exit 5.)
            pass
    current = published_tables(conn, name)
    shaped = any(e.columns is not None or e.where is not None for e in entries) or any(
        current[(t.schema, t.name)].columns is not None or current[(t.schema, t.name)].where is not None
        for t in wanted if (t.schema, t.name) in current
    )
    if shaped and publication_blocker(conn, name) is None:
        return _reconcile(conn, name, entries, current)
    # pg_publication_tables also lists what FOR ALL TABLES and TABLES IN SCHEMA publish.
    present = {
        (r[0], r[1])
        for r in conn.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,))
    }
    missing = [t for t in wanted if (t.schema, t.name) not in present]
    if missing:
        log.info("adding %s to publication %s", ", ".join(map(str, missing)), name)
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(name), sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in missing)
            )
        )
    return set()


class _Unchanged(Exception):
    pass


def _same_filter(stored: str | None, wanted: str | None) -> bool:
    """Whether a stored filter (pg_get_expr adds parentheses and casts) reads as the wanted one."""
    if stored is None or wanted is None:
        return stored is wanted

    def plain(text: str) -> exp.Expression:
        # The tree, not its text: without parentheses, "(a OR b) AND c" would print as "a OR b AND c".
        tree = sqlglot.parse_one(text, read="postgres")
        while isinstance(tree, (exp.Paren, exp.Cast)):
            tree = tree.this
        for node in list(tree.find_all(exp.Paren, exp.Cast)):
            node.replace(node.this)
        for ident in tree.find_all(exp.Identifier):
            if not ident.quoted:
                ident.set("this", ident.this.lower())
                ident.set("quoted", True)
        return tree

    try:
        return plain(stored) == plain(wanted)
    except (ParseError, TokenError):
        return False


def _reconcile(conn: psycopg.Connection, name: str, entries: list[PublishedTable],
               current: dict[tuple[str, str], PublishedTable]) -> set[tuple[str, str]]:
    """SET TABLE with our tables as wanted and every other table as it is. A publication that
    already matches is not touched (its owner may have created it). When the comparison cannot tell
    (PostgreSQL prints a stored filter its own way), alter, compare what it stores with what it
    stored before, and roll back when nothing changed: a restart then alters nothing."""
    def matches(e: PublishedTable) -> bool:
        now = current.get((e.ref.schema, e.ref.name))
        return now is not None and now.columns == e.columns and _same_filter(now.where, e.where)

    if all(matches(e) for e in entries):
        return set()
    statement = set_table_statement(name, entries, current)
    try:
        with conn.transaction():
            conn.execute(statement)
            after = published_tables(conn, name)
            if after == current:
                raise _Unchanged
    except _Unchanged:
        return set()
    except psycopg.errors.InsufficientPrivilege:
        raise SourceError(
            f"publication {name} does not match the privacy policy and role {conn.info.user} may not alter it: "
            f"have its owner run: {statement.as_string(conn)}"
        ) from None
    changed = [str(e.ref) for e in entries if current.get((e.ref.schema, e.ref.name)) != after.get((e.ref.schema, e.ref.name))]
    log.info("publication %s: column lists and row filters of %s set from the privacy policy", name, ", ".join(changed))
    return {(e.ref.schema, e.ref.name) for e in entries
            if current.get((e.ref.schema, e.ref.name)) != after.get((e.ref.schema, e.ref.name))}
