"""Postgres -> Kafka -> PostgreSQL and SQLite sinks through the real `cdc run`, compared row for row."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import set_json_loads

from tests.integration.harness import CdcProcess, json_text, sqlite_rows, wait_for_slot, wait_until, write_pipeline

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE customers (
    id bigint PRIMARY KEY,
    name text,
    email varchar(200),
    balance numeric(40, 20),
    big bigint,
    ratio double precision,
    active boolean,
    tags text[],
    scores integer[],
    profile jsonb,
    avatar bytea,
    created_at timestamptz,
    birthday date,
    feeling mood,
    notes text
);
CREATE TABLE "Order Items" (
    order_id integer,
    "Line No" integer,
    sku text NOT NULL,
    qty integer,
    price numeric(12, 2),
    PRIMARY KEY (order_id, "Line No")
);
CREATE TABLE audit_log (id serial PRIMARY KEY, payload jsonb);
ALTER TABLE customers REPLICA IDENTITY FULL;
ALTER TABLE "Order Items" REPLICA IDENTITY FULL;
ALTER TABLE audit_log REPLICA IDENTITY FULL;
"""

TABLES = ["public.customers", 'public."Order Items"', "public.audit_log"]
# source table -> (sink table, ORDER BY)
COMPARED = {
    "customers": ("customers", "id"),
    '"Order Items"': ('"Order Items"', 'order_id, "Line No"'),
    "audit_log": ("audit_log", "id"),
}

BIG_TEXT = "".join(f"{i:08x}\u00e9\u6f22" for i in range(40_000))  # incompressible enough to be TOASTed out of line


def exact_json(conn: psycopg.Connection) -> psycopg.Connection:
    set_json_loads(lambda s: json.loads(s, parse_float=Decimal), conn)
    return conn


def workload(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():  # a multi-row transaction over three tables
            conn.execute(
                """INSERT INTO customers VALUES
                   (1, 'Zoë Ångström 🚀', 'zoe@example.com', 12345678901234567890.12345678901234567890,
                    9007199254740993, 0.1, true, ARRAY['a', 'b,c', NULL, 'd"e'], ARRAY[1, 2, 3],
                    '{"tier": "gold", "limit": 12345678901234567890.123456789, "nested": {"xs": [1, 2.5, null]}}',
                    '\\x00ff10'::bytea, '2026-11-26 20:19:10.994151+02', '1990-02-28', 'happy', %s),
                   (2, NULL, NULL, NULL, -9223372036854775808, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                    NULL, NULL, NULL),
                   (3, 'plain', 'p@example.com', -0.00000000000000000001, 9223372036854775807, -1.5e300,
                    false, '{}', '{{1,2},{3,4}}', '[]', '\\x'::bytea, '-infinity', 'infinity', 'sad', 'short')""",
                (BIG_TEXT,),
            )
            conn.execute(
                """INSERT INTO "Order Items" VALUES (10, 1, 'sku-1', 2, 9.99), (10, 2, 'sku-2', 1, 100.00),
                   (11, 1, 'sku-ü', 5, 0.01)"""
            )
            conn.execute("""INSERT INTO audit_log (payload) SELECT jsonb_build_object('n', g) FROM generate_series(1, 5) g""")
        # An update that leaves the TOASTed notes unchanged: Postgres does not resend it.
        conn.execute("UPDATE customers SET email = 'zoe@new.example.com', big = big + 1 WHERE id = 1")
        # Primary-key updates, simple and composite.
        conn.execute("UPDATE customers SET id = 1000, name = 'moved' WHERE id = 2")
        conn.execute("""UPDATE "Order Items" SET "Line No" = 3, qty = qty + 1 WHERE order_id = 10 AND "Line No" = 2""")
        conn.execute("""DELETE FROM "Order Items" WHERE order_id = 11""")
        # A truncate followed by inserts, in one transaction and in the next.
        with conn.transaction():
            conn.execute("TRUNCATE audit_log")
            conn.execute("""INSERT INTO audit_log (payload) VALUES ('{"after": "truncate"}')""")
        conn.execute("""INSERT INTO audit_log (payload) VALUES ('{"again": [1, 2]}'), (NULL)""")
        conn.execute("UPDATE customers SET tags = array_append(tags, 'x'), notes = notes || 'tail' WHERE id = 1")
        conn.execute("DELETE FROM customers WHERE id = 3")
        conn.execute(
            """INSERT INTO customers (id, name, created_at, balance) VALUES
               (4, 'late', now(), 'NaN'), (5, E'line\\nbreak \\t tab', '2000-01-01 00:00:00+00', 1.50)"""
        )


def _sqlite_form(value):
    """The documented SQLite mapping of a source value (docs/sinks.md)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, memoryview)):
        return bytes(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            return value.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat() + "Z"
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return ("json", json.loads(json.dumps(value, default=str), parse_float=Decimal))
    return value


def _sqlite_value(stored, expected):
    if isinstance(expected, tuple) and expected[:1] == ("json",):
        parsed = json_text(stored)
        return ("json", json.loads(json.dumps(parsed, default=str), parse_float=Decimal))
    return stored


def text_rows(dsn: str, table: str, order: str) -> tuple[list[str], list[tuple]]:
    """Column names and rows as PostgreSQL prints them: exact for every type, infinity included."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        names = [d.name for d in conn.execute(f"SELECT * FROM {table} LIMIT 0").description]
        columns = ", ".join(f"({psycopg.sql.Identifier(n).as_string(conn)})::text" for n in names)
        return names, conn.execute(f"SELECT {columns} FROM {table} ORDER BY {order}").fetchall()


def postgres_sink_matches(source_dsn: str, sink_dsn: str) -> bool | str:
    for table, (sink_table, order) in COMPARED.items():
        src_names, src = text_rows(source_dsn, table, order)
        try:
            dst_names, dst = text_rows(sink_dsn, sink_table, order)
        except psycopg.errors.UndefinedTable:
            if not src:
                continue  # a sink creates a table from its first event; no event, no table yet
            return f"{sink_table} not created yet"
        if src_names != dst_names:
            return f"{table}: columns {dst_names} != {src_names}"
        if src != dst:
            return f"{table}: {len(dst)} rows in the sink, {len(src)} in the source, or values differ"
    return True


def sqlite_sink_matches(source_dsn: str, sqlite_path: Path) -> bool | str:
    for table, (sink_table, order) in COMPARED.items():
        names, src = source_rows_sqlite_safe(source_dsn, table, order)
        dst = sqlite_rows(sqlite_path, sink_table, order)
        if len(src) != len(dst):
            return f"{table}: {len(dst)} rows in the sink, {len(src)} in the source"
        for s_row, d_row in zip(src, dst):
            for name, s_val, d_val in zip(names, s_row, d_row):
                expected = _sqlite_form(s_val)
                if _sqlite_value(d_val, expected) != expected:
                    return f"{table}.{name}: sink has {d_val!r}, expected {expected!r}"
    return True


def source_rows_sqlite_safe(dsn: str, table: str, order: str):
    """Source rows as Python values; dates/timestamps outside Python's range as PostgreSQL text."""
    with exact_json(psycopg.connect(dsn)) as conn:
        conn.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
        names = [d.name for d in conn.execute(f"SELECT * FROM {table} LIMIT 0").description]
        types = dict(
            conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped", (table,)
            ).fetchall()
        )
        select = []
        for n in names:
            ident = psycopg.sql.Identifier(n).as_string(conn)
            if types[n] in ("date", "timestamp with time zone", "timestamp without time zone"):
                # infinity stays text in events; finite values are compared as Python values
                select.append(f"CASE WHEN isfinite({ident}) THEN NULL ELSE {ident}::text END AS \"inf_{n}\", {ident}")
            else:
                select.append(ident)
        cur = conn.execute(f"SELECT {', '.join(select)} FROM {table} ORDER BY {order}")
        rows = []
        for raw in cur.fetchall():
            vals, i = [], 0
            for n in names:
                if types[n] in ("date", "timestamp with time zone", "timestamp without time zone"):
                    inf, val = raw[i], raw[i + 1]
                    vals.append(inf if inf is not None else val)
                    i += 2
                else:
                    vals.append(raw[i])
                    i += 1
            rows.append(tuple(vals))
        return names, rows


@pytest.fixture
def pipeline(tmp_path, source_db, target_pg, broker, request):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    name = f"e2e_{uuid.uuid4().hex[:8]}"
    sqlite_file = tmp_path / "replica.db"
    path = write_pipeline(
        tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db, tables=TABLES,
        bootstrap=broker.bootstrap_servers,
        sinks={
            "pg": {"url": target_pg, "tables": {'public."Order Items"': "Order Items"}},
            "lite": {"url": f"sqlite:///{sqlite_file.name}"},
        },
    )
    return path, source_db, target_pg, sqlite_file, f"cdc_{name}"


def test_mixed_workload_reaches_both_sinks_row_for_row(pipeline):
    path, source_dsn, sink_dsn, sqlite_file, slot = pipeline
    with CdcProcess(path) as cdc:
        wait_for_slot(source_dsn, slot, cdc)
        workload(source_dsn)
        with psycopg.connect(source_dsn) as conn:
            (before_last,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("UPDATE customers SET active = true WHERE id = 5")
        wait_until(lambda: postgres_sink_matches(source_dsn, sink_dsn), process=cdc,
                   what="PostgreSQL sink to equal the source")
        wait_until(lambda: sqlite_sink_matches(source_dsn, sqlite_file), process=cdc,
                   what="SQLite sink to equal the source")
        assert cdc.stop() == 0, cdc.log()
    # A clean stop confirms everything Kafka acknowledged: the slot holds nothing already published.
    with psycopg.connect(source_dsn) as conn:
        assert conn.execute(
            "SELECT confirmed_flush_lsn > %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (before_last, slot),
        ).fetchone() == (True,)
    # The TOASTed value survived the update that did not resend it, in both sinks.
    notes = sqlite_rows(sqlite_file, "customers", "id")[0][-1]
    assert notes == BIG_TEXT + "tail"
    with psycopg.connect(sink_dsn) as conn:
        assert conn.execute("SELECT notes = %s FROM customers WHERE id = 1", (BIG_TEXT + "tail",)).fetchone() == (True,)
        # Column types follow the source (numeric precision, arrays, jsonb, timestamptz).
        types = dict(conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'customers'::regclass AND attnum > 0").fetchall())
    assert types["balance"] == "numeric(40,20)"
    assert types["scores"] == "integer[]"
    assert types["profile"] == "jsonb"
    assert types["created_at"] == "timestamp with time zone"
    assert types["feeling"] == "text"  # a user-defined enum travels as text


def test_sigkill_mid_workload_loses_and_doubles_nothing(pipeline):
    path, source_dsn, sink_dsn, sqlite_file, slot = pipeline
    stop_writing = threading.Event()
    written = {"txns": 0}

    def writer() -> None:
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            i = 0
            while not stop_writing.is_set() and i < 400:
                i += 1
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO customers (id, name, balance, big) VALUES (%s, %s, %s, %s)",
                        (10_000 + i, f"c{i}", Decimal(i) / 7, 2**60 + i),
                    )
                    conn.execute("""INSERT INTO "Order Items" VALUES (%s, 1, 'k', %s, 1.25)""", (i, i))
                    if i % 3 == 0:
                        conn.execute("UPDATE customers SET balance = balance * 2 WHERE id = %s", (10_000 + i - 1,))
                    if i % 5 == 0:
                        conn.execute("""DELETE FROM "Order Items" WHERE order_id = %s""", (i - 2,))
                    if i % 50 == 0:
                        conn.execute("TRUNCATE audit_log")
                    conn.execute("INSERT INTO audit_log (payload) VALUES (%s)", (json.dumps({"i": i}),))
                written["txns"] = i
                time.sleep(0.005)

    thread = threading.Thread(target=writer)
    cdc = CdcProcess(path).start()
    try:
        wait_for_slot(source_dsn, slot, cdc)
        thread.start()
        # Kill once the sinks have applied part of the workload, mid-stream.
        wait_until(lambda: len(sqlite_rows(sqlite_file, "customers", "id")) >= 25, process=cdc,
                   what="the sink to apply part of the workload")
        cdc.kill()
        killed_at = written["txns"]
        time.sleep(0.5)
        cdc = CdcProcess(path).start()
        thread.join(120)
        assert not thread.is_alive()
        assert written["txns"] > killed_at, "the workload should go on past the kill"
        wait_until(lambda: postgres_sink_matches(source_dsn, sink_dsn), process=cdc, timeout=90,
                   what="PostgreSQL sink to equal the source after the restart")
        wait_until(lambda: sqlite_sink_matches(source_dsn, sqlite_file), process=cdc, timeout=90,
                   what="SQLite sink to equal the source after the restart")
    finally:
        stop_writing.set()
        thread.join(30)
        cdc.stop()
    with psycopg.connect(sink_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM customers WHERE id > 10000").fetchone() == (400,)


def test_separate_connector_and_sink_processes_survive_restarts_and_schema_growth(pipeline):
    """`cdc connector` and `cdc sink` run apart; a sink restart resumes from its stored positions,
    and a column added to the source mid-stream is added to the sinks."""
    path, source_dsn, sink_dsn, sqlite_file, slot = pipeline
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_dsn, slot, connector)
        sink = CdcProcess(path, "sink").start()
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO customers (id, name) SELECT g, 'n' || g FROM generate_series(1, 50) g")
            wait_until(lambda: len(sqlite_rows(sqlite_file, "customers", "id")) == 50, process=sink,
                       what="the first rows in the sink")
            assert sink.stop() == 0, sink.log()
            conn.execute("ALTER TABLE customers ADD COLUMN loyalty_points integer")
            conn.execute("UPDATE customers SET loyalty_points = id * 10 WHERE id <= 5")
            conn.execute("DELETE FROM customers WHERE id > 45")
        sink = CdcProcess(path, "sink").start()
        try:
            wait_until(lambda: postgres_sink_matches(source_dsn, sink_dsn), process=sink,
                       what="PostgreSQL sink to equal the source")
            wait_until(lambda: sqlite_sink_matches(source_dsn, sqlite_file), process=sink,
                       what="SQLite sink to equal the source")
        finally:
            assert sink.stop() == 0, sink.log()
        connector.check_alive()
    rows = sqlite_rows(sqlite_file, "customers", "id")
    assert [r[-1] for r in rows[:6]] == [10, 20, 30, 40, 50, None]
