"""Every type through the real `cdc run` into both sinks; added columns' defaults; non-UTF-8 sources."""

from __future__ import annotations

import base64
import json
import math
import re
import sqlite3
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc.source.postgres.replication import SESSION_OPTIONS
from tests.conftest import _drop_database
from tests.integration.harness import CdcProcess, wait_for_slot, wait_until, write_pipeline
from tests.integration.types_cases import CASES, SETUP, has_libxml

pytestmark = pytest.mark.integration


def sqlite_form(expected: Any, kind: str, array: bool) -> Any:
    """The documented SQLite storage (docs/sinks.md, "SQLite targets") of an event value."""
    if expected is None:
        return None
    if array:
        def element(v):
            if isinstance(v, list):
                return [None if x is None else element(x) for x in v]
            return int(v) if kind == "bigint" else v
        return ("json", element(expected))
    if kind == "boolean":
        return int(expected)
    if kind in ("smallint", "integer", "bigint"):
        return int(expected)
    if kind in ("real", "double"):
        if expected == "NaN":
            return None
        return {"Infinity": math.inf, "-Infinity": -math.inf}.get(expected) if isinstance(expected, str) else float(expected)
    if kind == "bytea":
        return base64.b64decode(expected)
    if kind in ("json", "jsonb"):
        return ("json", expected)
    return expected


def stored_form(stored: Any, expected: Any) -> Any:
    if isinstance(expected, tuple) and isinstance(stored, str):
        return ("json", json.loads(stored, parse_float=Decimal))
    return stored


def printed(dsn: str, table: str, columns: list[str]) -> list[tuple]:
    """Rows as PostgreSQL's output functions print them, with the connector's session settings."""
    with psycopg.connect(dsn, options=SESSION_OPTIONS) as conn:
        select = sql.SQL(", ").join(sql.SQL("format('%s', {})").format(sql.Identifier(c)) for c in columns)
        return conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY 1").format(select, sql.Identifier(table))).fetchall()


def postgres_matches(source: str, target: str, table: str, columns: list[str]) -> bool | str:
    try:
        dst = printed(target, table, columns)
    except psycopg.errors.UndefinedTable:
        return "table not created yet"
    except psycopg.errors.UndefinedColumn:
        return "column not added yet"
    src = printed(source, table, columns)
    if len(src) != len(dst):
        return f"{len(dst)} rows in the sink, {len(src)} in the source"
    for s_row, d_row in zip(src, dst):
        for name, s, d in zip(columns, s_row, d_row):
            if s != d:
                return f"row {s_row[0]} column {name}: sink {d!r} != source {s!r}"
    return True


def sqlite_matches(path: Path, table: str, expected: dict[int, dict[str, Any]]) -> bool | str:
    if not path.exists():
        return "no database yet"
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        rows = {r["id"]: r for r in conn.execute(f'SELECT * FROM "{table}"')}
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        conn.close()
    if sorted(rows) != sorted(expected):
        return f"ids {sorted(rows)} != {sorted(expected)}"
    for key, want in expected.items():
        for name, value in want.items():
            if name not in rows[key].keys():
                return f"no column {name} yet"
            got = stored_form(rows[key][name], value)
            if got != value:
                return f"row {key} column {name}: sink {rows[key][name]!r}, expected {value!r}"
    return True


def pipeline_file(tmp_path: Path, source: str, tables: list[str], bootstrap: str, target_pg: str | None):
    name = f"types_{uuid.uuid4().hex[:8]}"
    sinks = {"lite": {"url": "sqlite:///replica.db"}}
    if target_pg is not None:
        sinks["pg"] = {"url": target_pg}
    path = write_pipeline(tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source, tables=tables,
                          bootstrap=bootstrap, sinks=sinks)
    return path, f"cdc_{name}", tmp_path / "replica.db"


def test_every_type_lands_equal_in_both_sinks(tmp_path, source_db, target_pg, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SETUP)
        cases = [c for c in CASES if not c[0].startswith("xml") or has_libxml(conn)]
        columns = [f"c{i}" for i in range(len(cases))]
        defs = ", ".join(f"{col} {case[0]}" for col, case in zip(columns, cases))
        conn.execute(f"CREATE TABLE every_type (id int PRIMARY KEY, {defs}); ALTER TABLE every_type REPLICA IDENTITY FULL")
    path, slot, sqlite_file = pipeline_file(tmp_path, source_db, ["public.every_type"], broker.bootstrap_servers, target_pg)
    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, slot, cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            literals = ", ".join(case[1] for case in cases)
            conn.execute(f"INSERT INTO every_type VALUES (1, {literals}), (2{', NULL' * len(cases)})")
        expected = {
            1: {col: sqlite_form(case[2], case[3], case[0].endswith("[]") or case[0] == "int_list")
                for col, case in zip(columns, cases)},
            2: {col: None for col in columns},
        }
        wait_until(lambda: sqlite_matches(sqlite_file, "every_type", expected), process=cdc,
                   what="SQLite sink to hold every value in its documented form")
        wait_until(lambda: postgres_matches(source_db, target_pg, "every_type", ["id", *columns]), process=cdc,
                   what="PostgreSQL sink to print every value as the source does")


def test_added_column_default_reaches_rows_already_in_the_sinks(tmp_path, source_db, target_pg, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text); ALTER TABLE items REPLICA IDENTITY FULL")
    path, slot, sqlite_file = pipeline_file(tmp_path, source_db, ["public.items"], broker.bootstrap_servers, target_pg)
    columns = ["id", "name", "price", "tags", "since"]
    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, slot, cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
        wait_until(lambda: sqlite_matches(sqlite_file, "items", {1: {"name": "a"}, 2: {"name": "b"}}), process=cdc,
                   what="first rows in SQLite")
        wait_until(lambda: postgres_matches(source_db, target_pg, "items", ["id", "name"]), process=cdc,
                   what="first rows in PostgreSQL")
        with psycopg.connect(source_db, autocommit=True) as conn:
            # No WAL carries these values for rows 1 and 2: PostgreSQL reads them from the catalog.
            conn.execute("ALTER TABLE items ADD COLUMN price numeric(20,8) NOT NULL DEFAULT 0.00000001,"
                         " ADD COLUMN tags text[] DEFAULT '{x,\"y z\"}'")
            conn.execute("ALTER TABLE items ADD COLUMN since timestamptz DEFAULT '2026-01-01 00:00+01'")
            conn.execute("INSERT INTO items (id, name, price) VALUES (3, 'c', 2)")
        old = {"price": "0.00000001", "tags": ("json", ["x", "y z"]), "since": "2025-12-31T23:00:00Z"}
        expected = {1: {"name": "a", **old}, 2: {"name": "b", **old},
                    3: {"name": "c", "price": "2.00000000", "tags": ("json", ["x", "y z"]), "since": "2025-12-31T23:00:00Z"}}
        wait_until(lambda: sqlite_matches(sqlite_file, "items", expected), process=cdc,
                   what="SQLite rows from before ADD COLUMN to hold its default")
        wait_until(lambda: postgres_matches(source_db, target_pg, "items", columns), process=cdc,
                   what="PostgreSQL rows from before ADD COLUMN to hold its default")


@pytest.fixture(params=["LATIN1", "SQL_ASCII"])
def encoded_db(request, source_cluster):
    admin = source_cluster.dsn()
    name = f"enc_{request.param.lower()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING '{request.param}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
    yield request.param, dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)).fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    _drop_database(admin, name)


def test_non_utf8_source_database_streams_text_as_utf8(tmp_path, encoded_db, broker):
    encoding, dsn = encoded_db
    # Characters LATIN1 has; an SQL_ASCII database stores whatever bytes the client sends (UTF-8 here).
    words = {1: "Zoë Ångström", 2: "naïve café ½ ÿ", 3: "plain"}
    with psycopg.connect(dsn, autocommit=True, options="-c client_encoding=UTF8") as conn:
        conn.execute('CREATE TABLE "Bücher" (id int PRIMARY KEY, "Titel é" text, tags varchar(20)[]);'
                     ' ALTER TABLE "Bücher" REPLICA IDENTITY FULL')
    path, slot, sqlite_file = pipeline_file(tmp_path, dsn, ['public."Bücher"'], broker.bootstrap_servers, None)
    with CdcProcess(path) as cdc:
        wait_for_slot(dsn, slot, cdc)
        with psycopg.connect(dsn, autocommit=True, options="-c client_encoding=UTF8") as conn:
            for key, word in words.items():
                conn.execute('INSERT INTO "Bücher" VALUES (%s, %s, ARRAY[%s, %s])', (key, word, word, "ü"))
        expected = {k: {"Titel é": w, "tags": ("json", [w, "ü"])} for k, w in words.items()}
        wait_until(lambda: sqlite_matches(sqlite_file, "Bücher", expected), process=cdc,
                   what=f"rows of the {encoding} database in SQLite, as UTF-8 text")


def test_sql_ascii_bytes_that_are_not_utf8_stop_the_connector_at_their_lsn(tmp_path, source_cluster, broker):
    """An SQL_ASCII database can hold any bytes; asked for UTF-8, the server refuses to send a value that
    is not, and the connector stops with one line naming the slot and the LSN (docs/source.md)."""
    admin = source_cluster.dsn()
    name = f"enc_raw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True, options="-c client_encoding=UTF8") as conn:
            conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text); ALTER TABLE notes REPLICA IDENTITY FULL")
        path, slot, _ = pipeline_file(tmp_path, dsn, ["public.notes"], broker.bootstrap_servers, None)
        cdc = CdcProcess(path).start()
        try:
            wait_for_slot(dsn, slot, cdc)
            with psycopg.connect(dsn, autocommit=True, options="-c client_encoding=UTF8") as conn:
                # "secr" + LATIN1 "é" + "t": one byte 0xE9, invalid in UTF-8
                conn.execute("INSERT INTO notes VALUES (1, convert_from('\\x73656372e974'::bytea, 'SQL_ASCII'))")
            assert cdc.proc.wait(60) == 2
        finally:
            cdc.stop()
        log = cdc.log()
        assert "Traceback" not in log and "secr" not in log, log
        assert 'invalid byte sequence for encoding "UTF8"' in log, log
        assert re.search(r"LSN [0-9A-F]+/[0-9A-F]+", log), log
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for (s,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)).fetchall():
                conn.execute("SELECT pg_drop_replication_slot(%s)", (s,))
        _drop_database(admin, name)
