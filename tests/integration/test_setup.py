"""`cdc setup --print-sql` as an administrator uses it: the printed script, run once by a superuser,
leaves everything a connector with a least-privilege role (LOGIN, REPLICATION, SELECT; owning
nothing) needs, and that connector then snapshots and streams under the privacy policy."""

from __future__ import annotations

import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.integration.harness import CdcProcess, sqlite_rows, wait_for_slot, wait_until, write_pipeline


@pytest.fixture
def least_privilege(source_db):
    """A role name for this test; the role and what was granted to it go afterwards."""
    role = f"cdc_lp_{uuid.uuid4().hex[:8]}"
    yield role
    with psycopg.connect(source_db, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(f'DROP PUBLICATION IF EXISTS "cdc_{role}"')
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def test_printed_setup_lets_a_least_privilege_role_capture(tmp_path, source_db, broker, least_privilege):
    role = least_privilege
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text, ssn text, country text)")
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, qty int NOT NULL)")  # fixed width: DEFAULT is enough
        conn.execute("INSERT INTO customers SELECT i, 'c' || i, 'ssn' || i, CASE WHEN i % 2 = 0 THEN 'DE' ELSE 'FR' END"
                     " FROM generate_series(1, 40) i")
        conn.execute("INSERT INTO orders SELECT i, i FROM generate_series(1, 20) i")
    as_role = urlsplit(source_db)._replace(netloc=f"{role}@{urlsplit(source_db).netloc.split('@')[-1]}").geturl()
    path = write_pipeline(tmp_path / "p.yaml", pipeline=role, source_dsn=as_role,
                          tables=["public.customers", "public.orders"], bootstrap=broker.bootstrap_servers,
                          snapshot="initial", sinks={"replica": {"url": "sqlite:///replica.db"}})
    with path.open("a") as f:
        f.write("privacy:\n  tables:\n    public.customers:\n      exclude: [ssn]\n      rows: \"country = 'DE'\"\n")

    printed = subprocess.run([sys.executable, "-m", "cdc.cli", "setup", str(path), "--print-sql",
                              "--admin-dsn", source_db], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    script = printed.stdout
    assert f"CREATE ROLE {role} WITH LOGIN REPLICATION" in script.replace('"', "")
    assert 'ALTER TABLE "public"."customers" REPLICA IDENTITY FULL' in script
    assert '"orders" REPLICA IDENTITY' not in script
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(script)
        superuser, owns = conn.execute(
            "SELECT rolsuper, EXISTS (SELECT 1 FROM pg_class WHERE relowner = r.oid) FROM pg_roles r WHERE rolname = %s",
            (role,)).fetchone()
    assert (superuser, owns) == (False, False)

    replica = tmp_path / "replica.db"
    with CdcProcess(path) as proc:
        wait_for_slot(source_db, f"cdc_{role}", proc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO customers VALUES (100, 'new', 'ssn100', 'DE'), (101, 'new', 'ssn101', 'FR')")
            conn.execute("UPDATE orders SET qty = qty + 1000 WHERE id = 1")
        wait_until(lambda: replica.exists() and len(sqlite_rows(replica, "customers", "id")) == 21
                   and sqlite_rows(replica, "orders", "id")[:1] == [(1, 1001)],
                   process=proc, what="the replica to hold the DE customers and the updated order")
        assert proc.stop() == 0, proc.log()
    customers = sqlite_rows(replica, "customers", "id")
    assert [row[0] for row in customers] == [*range(2, 41, 2), 100]
    assert all("ssn" not in str(value) for row in customers for value in row)
    assert len(sqlite_rows(replica, "orders", "id")) == 20


def test_setup_refuses_without_print_sql_and_names_missing_tables(tmp_path, source_db):
    path = write_pipeline(tmp_path / "p.yaml", pipeline="nosuch", source_dsn=source_db,
                          tables=["public.nosuch"], bootstrap="127.0.0.1:9", sinks={})
    result = subprocess.run([sys.executable, "-m", "cdc.cli", "setup", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "--print-sql" in result.stderr
    result = subprocess.run([sys.executable, "-m", "cdc.cli", "setup", str(path), "--print-sql"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "public.nosuch" in result.stderr and "p.yaml:" in result.stderr
