"""`cdc setup --print-sql`: what an administrator runs once so that the connector needs only a
least-privilege role (LOGIN, REPLICATION, SELECT on the captured tables) and owns nothing.

The SQL is made from the pipeline file and the source catalog as it is now: the publication carries
the privacy policy's column lists and row filters where they can be pushed down (as the connector
would create it), and tables get REPLICA IDENTITY FULL where the connector's up-front check asks
for it. Nothing is executed: the output is for a person to read and run.
"""

from __future__ import annotations

import dataclasses

import psycopg
from psycopg import sql

from cdc.config import PipelineConfig, TableRef
from cdc.transform.plan import prepare
from cdc.source.postgres.catalog import Catalog, TableInfo
from cdc.source.postgres.publication import (
    PublishedTable, create_publication_statement, published_tables, set_table_statement,
)


class _AfterSetup(Catalog):
    """The catalog as it will be once the printed ALTER TABLEs ran: the pushdown is planned for it."""

    def __init__(self, conn: psycopg.Connection, full: set[TableRef]):
        super().__init__(conn)
        self._full = full

    def table_info(self, ref: TableRef) -> TableInfo | None:
        info = super().table_info(ref)
        return dataclasses.replace(info, replica_identity="f") if info is not None and ref in self._full else info


def _needs_full(catalog: Catalog, config: PipelineConfig) -> set[TableRef]:
    """Tables the connector would refuse without REPLICA IDENTITY FULL (README: Source requirements)."""
    plan, _ = prepare(config, catalog)
    out = set()
    for ref in config.source.tables:
        info = catalog.table_info(ref)
        if info is None or info.replica_identity == "f":
            continue
        policy = plan.policy(ref)
        published = [c for c in catalog.toastable_columns(info.oid) if policy is None or policy.passes(c)]
        if info.replica_identity in ("n", "i") or published:
            out.add(ref)
    return out


def setup_sql(config: PipelineConfig, conn: psycopg.Connection, role: str) -> str:
    """The script, commented, for the database the pipeline's source DSN names."""
    catalog = Catalog(conn)
    missing = [str(ref) for ref in config.source.tables if catalog.table_info(ref) is None]
    if missing:
        raise ValueError(f"table(s) {', '.join(missing)} do not exist in the source database")
    full = _needs_full(catalog, config)
    plan, problems = prepare(config, _AfterSetup(conn, full))
    if problems:
        raise ValueError("\n".join(problems))
    database = conn.info.dbname
    tables = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in config.source.tables)
    schemas = sorted({t.schema for t in config.source.tables})
    who, name = sql.Identifier(role), config.source.publication
    lines = [
        f"-- cdc setup for pipeline {config.pipeline} ({config.display_name}).",
        f"-- Run as a superuser, or as the owner of the tables, in database {database}:",
        f"--   psql -d {database} -f setup.sql",
        "",
        "-- 1. The connector's role: it logs in, streams (REPLICATION) and reads the captured tables",
        "--    (snapshots and the start-up checks); it owns nothing and may change nothing.",
        *((sql.SQL("ALTER ROLE {} WITH LOGIN REPLICATION;").format(who), f"--    (role {role} exists already)")
          if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() else
          (sql.SQL("CREATE ROLE {} WITH LOGIN REPLICATION;").format(who),
           f"--    then give it a password, e.g. in psql: \\password {role}")),
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {};").format(sql.Identifier(database), who),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {};").format(sql.SQL(", ").join(map(sql.Identifier, schemas)), who),
        sql.SQL("GRANT SELECT ON TABLE {} TO {};").format(tables, who),
        "",
    ]
    if full:
        lines += ["-- 2. Full before-images, so that every UPDATE and DELETE event carries the whole row."]
        lines += [sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL;").format(sql.Identifier(t.schema, t.name))
                  for t in config.source.tables if t in full]
        lines.append("")
    entries = [PublishedTable(ref, *plan.publication().get(ref, (None, None))) for ref in config.source.tables]
    lines.append("-- 3. The publication, with the column lists and row filters of the privacy policy that PostgreSQL")
    lines.append("--    enforces itself (`cdc explain` shows which rules stay with the connector).")
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone() is None:
        lines.append(sql.Composed([create_publication_statement(name, entries), sql.SQL(";")]))
    else:
        lines.append("--    It exists: its other tables are kept as they are.")
        lines.append(sql.Composed([set_table_statement(name, entries, published_tables(conn, name)), sql.SQL(";")]))
    lines += [
        "",
        "-- 4. The replication slot: the connector creates it at its first start (REPLICATION allows it).",
        f"--    To create it now instead: SELECT pg_create_logical_replication_slot('{config.source.slot}', 'pgoutput');",
        "",
        "-- 5. Optional, superuser only: column identity across renames (README: Renamed columns),",
        f"--    psql -d {database} -f sql/column_identity.sql",
    ]
    return "\n".join(line if isinstance(line, str) else line.as_string(conn) for line in lines) + "\n"
