"""Names a user may give their columns and tables: SQL built with them must stay SQL.

A `%` in an identifier is the case that bit: a statement sent with parameters is scanned for
placeholders, so `"50% off"` read as one made the initial snapshot fail for good. Through the real
`cdc run` on PostgreSQL 15 and 18, snapshot and stream, into both sink dialects.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.integration.harness import CdcProcess, pg_rows, sqlite_rows, wait_for_slot, wait_until, write_pipeline

pytestmark = pytest.mark.integration

SCHEMA = '''
CREATE TABLE "Deals %s" (
    "50% off" integer,
    "Line %% No" integer,
    "it's ""quoted""" text,
    "%s" text,
    PRIMARY KEY ("50% off", "Line %% No")
);
ALTER TABLE "Deals %s" REPLICA IDENTITY FULL;
INSERT INTO "Deals %s" SELECT i, i % 3, 'q' || i, 'p' || i FROM generate_series(1, 120) i;
'''
TABLE = '"Deals %s"'
ORDER = '"50% off", "Line %% No"'


def test_columns_and_tables_named_with_percent_signs_and_quotes_reach_both_sinks(tmp_path, source_db, broker,
                                                                                  target_pg):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)  # no parameters: `%` is literal here
    name = f"ids_{uuid.uuid4().hex[:8]}"
    replica = tmp_path / "replica.db"
    path = write_pipeline(
        tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=[f"public.{TABLE}"],
        bootstrap=broker.bootstrap_servers, snapshot="initial",
        sinks={"lite": {"url": f"sqlite:///{replica}"}, "pg": {"url": target_pg}},
    )
    source = lambda: pg_rows(source_db, TABLE, ORDER)  # noqa: E731
    with CdcProcess(path, "run") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        wait_until(lambda: len(pg_rows(target_pg, TABLE, ORDER)) == 120 if _exists(target_pg) else False,
                   process=proc, timeout=120, what="the snapshot in the PostgreSQL target")
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f'''UPDATE {TABLE} SET "it's ""quoted""" = 'changed' WHERE "50% off" <= 10''')
            conn.execute(f"""DELETE FROM {TABLE} WHERE "50% off" > 100""")
            conn.execute(f"""INSERT INTO {TABLE} VALUES (500, 1, 'new', 'x')""")
        expected = source()
        wait_until(lambda: pg_rows(target_pg, TABLE, ORDER) == expected, process=proc, timeout=120,
                   what="the PostgreSQL target equal to the source")
        wait_until(lambda: [tuple(r) for r in sqlite_rows(replica, TABLE, ORDER)] == expected, process=proc,
                   timeout=120, what="the SQLite target equal to the source")


def _exists(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{TABLE}",)).fetchone()[0]
