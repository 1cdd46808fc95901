"""The pipeline's publication: created, extended with the tables it lacks, and its per-table column
lists and row filters reconciled with the privacy policy (the pushdown), over an ordinary connection.
Runs at start-up and from `cdc setup`, never per row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
import sqlglot
from psycopg import sql
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from cdc.errors import SourceError
from cdc.source.postgres.catalog import TableRef

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PublishedTable:
    """A table's entry in a publication: its column list and row filter (None: all columns, no filter)."""

    ref: TableRef
    columns: tuple[str, ...] | None
    where: str | None


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
