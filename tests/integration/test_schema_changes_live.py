"""Schema changes through real `cdc run` processes (the real broker, PostgreSQL and SQLite targets):
changes while an initial snapshot runs, a kill right after a change, a type change that rewrites values."""

from __future__ import annotations

import datetime as dt
import sqlite3
import uuid
from contextlib import closing

import psycopg

from tests.integration.harness import (CdcProcess, wait_for_confirmed, wait_for_slot, wait_for_snapshot_progress,
                                       wait_until, write_pipeline)
from tests.integration.test_schema_change_events import column_ids, event_position, schema_change_records

ROWS = 40_000


def _pipeline(tmp_path, source_db, target_pg, broker, *, snapshot: str, **source):
    name = f"sc_{uuid.uuid4().hex[:8]}"
    sqlite_file = tmp_path / "replica.db"
    path = write_pipeline(
        tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
        bootstrap=broker.bootstrap_servers, snapshot=snapshot,
        sinks={"pg": {"url": target_pg}, "lite": {"url": f"sqlite:///{sqlite_file}"}},
    )
    if source:
        text = path.read_text()
        extra = "".join(f"  {k}: {v}\n" for k, v in source.items())
        path.write_text(text.replace("  status_interval_s: 1.0\n", "  status_interval_s: 1.0\n" + extra))
    return name, path, sqlite_file


def _rows(target_pg: str, sqlite_file, columns: str):
    """(PostgreSQL sink rows, SQLite sink rows) of `columns`, None while a sink lacks the table or a column."""
    query = f"SELECT {columns} FROM items ORDER BY id"
    try:
        with psycopg.connect(target_pg) as conn:
            pg = conn.execute(query).fetchall()
    except psycopg.Error:
        pg = None
    try:
        with closing(sqlite3.connect(sqlite_file)) as conn:
            lite = conn.execute(query).fetchall()
    except sqlite3.Error:
        lite = None
    return pg, lite


def _missing_from(expected: list[tuple], rows: list[tuple]) -> list[tuple]:
    """The rows that `expected` lacks, for a poll's "not yet" answer. Through a set: a list scan per
    row costs 40,000 x 40,000 comparisons, minutes on a busy machine, so one poll could outlast the
    wait and fail it with what the sinks held when that poll began."""
    wanted = set(expected)
    return [r for r in rows if r not in wanted]


def _snapshotted_table(tmp_path, source_db, target_pg, broker, columns: str, values: str):
    """Table items (id, `columns`) of ROWS rows (`values` of i), and a pipeline that snapshots it in
    small chunks."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE items (id integer PRIMARY KEY, {columns})")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
        conn.execute(f"INSERT INTO items SELECT i, {values} FROM generate_series(1, %s) i", (ROWS,))
    return _pipeline(tmp_path, source_db, target_pg, broker, snapshot="initial", snapshot_chunk_size=500)


def _alter_while_a_chunk_waits(source_db: str, cdc: CdcProcess, *statements: str) -> None:
    """Once the snapshot has published rows, run `statements` in one transaction that first locks
    the table and waits for a snapshot chunk to wait for it: that chunk's SELECT then meets the
    table as the statements left it."""
    wait_for_snapshot_progress(cdc)  # not the first rows in a sink: a fast snapshot has published all by then
    with psycopg.connect(source_db) as ddl, psycopg.connect(source_db, autocommit=True) as watch:
        ddl.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        wait_until(lambda: watch.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'items'::regclass AND NOT granted").fetchone()[0] > 0,
            process=cdc, what="a snapshot chunk waiting for the table (the snapshot must still be running)")
        for statement in statements:
            ddl.execute(statement)
        ddl.commit()


def test_rename_and_drop_while_the_initial_snapshot_runs_end_with_the_source_in_both_sinks(
        tmp_path, source_db, target_pg, broker):
    """The issue's reproduction (smaller): RENAME and DROP on a table whose initial snapshot is half
    way. Snapshot chunks are made to wait for the DDL (the test holds the table's lock while it
    alters it), so the next chunk's SELECT races the change: the process keeps running and both
    sinks end with the source's columns and values, none NULL in the renamed column."""
    name, path, sqlite_file = _snapshotted_table(tmp_path, source_db, target_pg, broker, "a text, b text, c text",
                                                 "'a' || i, 'b' || i, 'c' || i")
    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        _alter_while_a_chunk_waits(source_db, cdc, "ALTER TABLE items RENAME COLUMN b TO b2",
                                   "ALTER TABLE items DROP COLUMN c")
        with psycopg.connect(source_db, autocommit=True) as conn:  # rows written after the changes
            conn.execute("UPDATE items SET b2 = 'changed' WHERE id IN (1, 39999)")
            conn.execute("INSERT INTO items VALUES (%s, 'new', 'new b')", (ROWS + 1,))
            expected = conn.execute("SELECT id, a, b2 FROM items ORDER BY id").fetchall()

        def both_equal():
            pg, lite = _rows(target_pg, sqlite_file, "id, a, b2")
            return (pg == expected and lite == expected) or (
                f"pg {len(pg) if pg else pg} rows, lite {len(lite) if lite else lite} rows, "
                f"pg NULL b2: {sum(1 for r in pg or () if r[2] is None)}")

        wait_until(both_equal, timeout=180, process=cdc, what="both sinks to hold the source's rows, b renamed")
        cdc.check_alive()
        assert cdc.stop() == 0, cdc.log()
    # For consumers of their own: the first shape (with the first snapshot rows), then the change, at
    # the position from which every event of the table has the new shape.
    records, events = schema_change_records(broker.bootstrap_servers, name)
    assert [[(c["change"], c.get("column"), c.get("from"), c.get("to")) for c in record["changes"]]
            for _, record, _ in records] == [[], [("dropped", "c", None, None), ("renamed", None, "b", "b2")]]
    assert records[0][1]["source"]["snapshot"] is True
    change = records[1][1]
    at = event_position(change["source"])
    assert {tuple(header) for p, (header, _) in events.items() if p >= at} == {tuple(column_ids(change["new"]["columns"]))}
    assert {tuple(header) for p, (header, _) in events.items() if p < at} == {tuple(column_ids(change["old"]["columns"]))}


def test_a_type_change_while_the_initial_snapshot_runs_ends_with_the_source_in_both_sinks(
        tmp_path, source_db, target_pg, broker):
    """integer -> date while the snapshot runs: a chunk read after the change holds values the
    stream's (older) shape cannot decode; the process keeps running and both sinks end with the
    source's dates."""
    name, path, sqlite_file = _snapshotted_table(tmp_path, source_db, target_pg, broker, "a text, n integer",
                                                 "'a' || i, i %% 1000")
    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        _alter_while_a_chunk_waits(source_db, cdc,
                                   "ALTER TABLE items ALTER COLUMN n TYPE date USING date '2020-01-01' + n")
        # The stream learns of the change with the table's next row change: the snapshot's later
        # chunks are read before that, and published with the stream's older shape.
        wait_until(lambda: "snapshot of public.items (initial) finished" in cdc.log(), process=cdc,
                   what="the snapshot to finish")
        with psycopg.connect(source_db, autocommit=True) as conn:  # a row written after the change
            conn.execute("UPDATE items SET a = 'changed' WHERE id = 7")
            expected = conn.execute("SELECT id, a, n FROM items ORDER BY id").fetchall()

        def both_equal():
            pg, lite = _rows(target_pg, sqlite_file, "id, a, n")
            lite = lite and [(i, a, _date_or_as_is(n)) for i, a, n in lite]
            return (pg == expected and lite == expected) or (
                f"pg {pg and _missing_from(expected, pg)[:3]}, lite {lite and _missing_from(expected, lite)[:3]}")

        wait_until(both_equal, timeout=180, process=cdc, what="both sinks to hold the source's dates")
        assert cdc.stop() == 0, cdc.log()


def test_a_kill_between_a_rename_and_the_next_rows_loses_nothing(tmp_path, source_db, target_pg, broker):
    """SIGKILL right after a RENAME (before any row shows the new shape), and again right after the
    first rows of a second RENAME: after each restart the rows arrive in the renamed column in both
    sinks, the old values kept."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, n text)")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    name, path, sqlite_file = _pipeline(tmp_path, source_db, target_pg, broker, snapshot="never")
    expected = [(i, f"before {i}") for i in range(1, 51)]

    def synced(columns: str):
        def check():
            pg, lite = _rows(target_pg, sqlite_file, columns)
            return (pg == expected and lite == expected) or f"pg {pg and pg[-3:]}, lite {lite and lite[-3:]}"
        return check

    cdc = CdcProcess(path).start()
    try:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT i, 'before ' || i FROM generate_series(1, 50) i")
        wait_until(synced("id, n"), process=cdc, what="both sinks to hold the first rows")
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("ALTER TABLE items RENAME COLUMN n TO n2")
        cdc.kill()  # the rename is in the WAL; no row of the new shape yet
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items VALUES (51, 'after')")
            conn.execute("UPDATE items SET n2 = 'changed' WHERE id = 2")
        expected.append((51, "after"))
        expected[1] = (2, "changed")
        cdc = CdcProcess(path).start()
        wait_until(synced("id, n2"), process=cdc, what="both sinks renamed after a restart, values kept")

        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("ALTER TABLE items RENAME COLUMN n2 TO n3")
            conn.execute("INSERT INTO items VALUES (52, 'after the second')")
        cdc.kill()  # somewhere between publishing and applying the second rename's first rows
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("UPDATE items SET n3 = 'changed again' WHERE id = 3")
        expected.append((52, "after the second"))
        expected[2] = (3, "changed again")
        cdc = CdcProcess(path).start()
        wait_until(synced("id, n3"), process=cdc, what="both sinks renamed again after a restart, values kept")
        assert cdc.stop() == 0, cdc.log()
    finally:
        cdc.stop()


def test_a_type_change_that_rewrites_values_rewrites_the_column_in_both_sinks(tmp_path, source_db, target_pg, broker):
    """The issue's reproduction: ALTER COLUMN d TYPE int USING length(d) rewrote every row in the
    source, but the WAL holds no row change for it: the sinks kept the old text values. The
    connector re-reads the table; the sinks rewrite the column from those values."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, d text, other text)")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    name, path, sqlite_file = _pipeline(tmp_path, source_db, target_pg, broker, snapshot="never")
    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        _text_values_in_both_sinks(source_db, target_pg, sqlite_file, cdc, 300)
        expected = _rewrite_as_length(source_db, 301)
        assert expected[6] == (7, 0, "o7")  # the source converted the text: length('')

        def both_equal():
            pg, lite = _rows(target_pg, sqlite_file, "id, d, other")
            return (pg == expected and lite == expected) or f"pg {pg and pg[:8]}, lite {lite and lite[:8]}"

        wait_until(both_equal, timeout=120, process=cdc, what="both sinks to hold the source's converted values")
        assert cdc.stop() == 0, cdc.log()
    with psycopg.connect(target_pg) as conn:
        (target_type,) = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                                      " WHERE attrelid = 'items'::regclass AND attname = 'd'").fetchone()
    assert target_type == "integer"


def _text_values_in_both_sinks(source_db: str, target_pg: str, sqlite_file, cdc: CdcProcess, rows: int) -> None:
    """Rows 1..`rows` of items (id, d text, other text), and wait for both sinks to hold them."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT i, repeat('x', i %% 7), 'o' || i FROM generate_series(1, %s) i", (rows,))
        expected = conn.execute("SELECT id, d, other FROM items ORDER BY id").fetchall()
    wait_until(lambda: _rows(target_pg, sqlite_file, "id, d, other") == (expected, expected), process=cdc,
               what="both sinks to hold the text values")


def _rewrite_as_length(source_db: str, new_id: int) -> list[tuple]:
    """`ALTER COLUMN d TYPE integer USING length(d)` (the source rewrites every row), then rows written
    after it; returns the source's rows."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE items ALTER COLUMN d TYPE integer USING length(d)")
        conn.execute("UPDATE items SET other = 'changed' WHERE id = 5")  # rows written after the change
        conn.execute("INSERT INTO items VALUES (%s, 42, 'new')", (new_id,))
        return conn.execute("SELECT id, d, other FROM items ORDER BY id").fetchall()


def _date_or_as_is(value):
    """SQLite's ISO text of a date as a date; anything else (a value not converted yet) as it is, so
    the poll says "not yet" instead of failing."""
    try:
        return dt.date.fromisoformat(value) if isinstance(value, str) else value
    except ValueError:
        return value


def test_a_kill_between_a_type_change_that_rewrites_values_and_the_next_row_loses_nothing(
        tmp_path, source_db, target_pg, broker):
    """SIGKILL after the sinks hold the rows, then `ALTER COLUMN d TYPE integer USING length(d)` and
    rows of the new shape while no connector runs: the restarted connector sees the change with the
    table's first Relation message, when it has no earlier one to compare with. It compares with the
    shape it last published (the `{pipeline}.schema_changes` topic) and re-reads the table, so both
    sinks end with the values the source computed, none NULL."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, d text, other text)")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    name, path, sqlite_file = _pipeline(tmp_path, source_db, target_pg, broker, snapshot="never")
    cdc = CdcProcess(path).start()
    try:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        _text_values_in_both_sinks(source_db, target_pg, sqlite_file, cdc, 200)
        # Confirmed: after the restart the table's first Relation message is the one of the new shape.
        wait_for_confirmed(source_db, f"cdc_{name}", cdc)
        cdc.kill()
        expected = _rewrite_as_length(source_db, 201)
        cdc = CdcProcess(path).start()

        def both_equal():
            pg, lite = _rows(target_pg, sqlite_file, "id, d, other")
            return (pg == expected and lite == expected) or (
                f"pg {pg and _missing_from(expected, pg)[:4]}, lite {lite and _missing_from(expected, lite)[:4]}")

        wait_until(both_equal, timeout=120, process=cdc, what="both sinks to hold the source's converted values")
        assert "re-reading the table" in cdc.log()
        assert cdc.stop() == 0, cdc.log()
    finally:
        cdc.stop()
