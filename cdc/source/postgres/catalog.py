"""What the source database says about the pipeline's tables, asked over an ordinary connection.

Up-front checks (wal_level, tables, primary keys, replica identity, privileges), and type
descriptions (``format_type`` and our portable kind) for the type OIDs that Relation messages
carry. Everything here runs at start-up or once per relation version, never per row. The
publication is managed by cdc.source.postgres.publication, column identity by
cdc.source.postgres.column_identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import psycopg

from cdc.errors import SourceError
from cdc.source.postgres.column_identity import LiveColumn
from cdc.source.postgres.pgoutput import Relation, RelationColumn
from cdc.sqlnames import quote_ident

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

