"""A sink keeps only what its service uses: some tables, some columns of a table."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.integration.harness import CdcProcess, pg_columns, pg_rows, wait_for_slot, wait_until, write_pipeline

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE customers (id int PRIMARY KEY, email text, country text, phone text, notes text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric(10, 2));
CREATE TABLE audit (id int PRIMARY KEY, what text);
ALTER TABLE customers REPLICA IDENTITY FULL;
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE audit REPLICA IDENTITY FULL;
"""


def exists(dsn: str, table: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def test_a_sink_keeps_two_tables_and_three_columns_of_one(tmp_path, source_db, broker, target_pg):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    name = f"sub_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(
        tmp_path / "p.yaml", pipeline=name, source_dsn=source_db,
        tables=["public.customers", "public.orders", "public.audit"], bootstrap=broker.bootstrap_servers,
        sinks={"slim": {"url": target_pg, "only": ["public.customers", "public.orders"],
                        "tables": {"public.customers": {"name": "people", "columns": ["email", "country"]}}}},
        status_interval_s=0.5, snapshot="initial",
    )
    with CdcProcess(path, "run") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO customers VALUES (1, 'a@x', 'NL', '+31', 'n1'), (2, 'b@x', 'DE', '+49', 'n2')")
            conn.execute("INSERT INTO orders VALUES (10, 1, 9.50), (11, 2, 20.00)")
            conn.execute("INSERT INTO audit VALUES (100, 'login')")
            conn.execute("UPDATE customers SET country = 'BE', phone = '+32' WHERE id = 1")
            conn.execute("UPDATE customers SET phone = '+1' WHERE id = 2")  # no kept column changes
            conn.execute("DELETE FROM orders WHERE id = 11")
            conn.execute("INSERT INTO orders VALUES (12, 1, 1.25)")
        wait_until(lambda: exists(target_pg, "orders") and [r[0] for r in pg_rows(target_pg, "orders", "id")] == [10, 12],
                   process=proc, what="orders applied")
        wait_until(lambda: exists(target_pg, "people") and pg_rows(target_pg, "people", "id") == [(1, "a@x", "BE"), (2, "b@x", "DE")],
                   process=proc, what="people applied")
    assert pg_columns(target_pg, "people") == ["id", "email", "country"]
    assert not exists(target_pg, "customers") and not exists(target_pg, "audit")
