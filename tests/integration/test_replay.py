"""`cdc replay` from an LSN: repair a damaged target, rebuild another database, a point in time.

Real `cdc connector`, `cdc sink` and `cdc replay` processes on PostgreSQL 15 and 18, the broker and
PostgreSQL targets.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from tests.conftest import TARGET_DSN, _drop_database, _fresh_database
from tests.integration.harness import CdcProcess, pg_rows, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import cdc
from tests.integration.test_transactions import Hold

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
ALTER TABLE items REPLICA IDENTITY FULL;
"""


def rows(dsn: str) -> list[tuple]:
    try:
        return pg_rows(dsn, "items", "id")
    except psycopg.errors.UndefinedTable:
        return []


def current_lsn(dsn: str) -> str:
    """Past every record written so far (the insert position: with synchronous_commit off, the
    write position can lag behind commits already made)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]


@pytest.fixture
def history(tmp_path, source_db, broker, target_pg):
    """A pipeline whose topic holds three phases of changes, applied by its sink; the LSNs between."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    name = f"rp_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
                          bootstrap=broker.bootstrap_servers, sinks={"main": {"url": target_pg, "batch_size": 100}},
                          status_interval_s=0.5, snapshot="initial")
    marks = {}
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            for i in range(1, 201):
                conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (i, f"item {i}", i))
            marks["after_inserts"] = current_lsn(source_db)
            for i in range(1, 51):
                conn.execute("UPDATE items SET qty = qty + 1000, name = name || ' v2' WHERE id = %s", (i,))
            conn.execute("DELETE FROM items WHERE id BETWEEN 51 AND 60")
            marks["after_updates"] = current_lsn(source_db)
            marks["state_after_updates"] = rows(source_db)
            for i in range(100, 120):
                conn.execute("UPDATE items SET qty = -qty WHERE id = %s", (i,))
            conn.execute("INSERT INTO items SELECT i, 'late ' || i, i FROM generate_series(300, 399) i")
        with CdcProcess(path, "sink") as sink:
            wait_until(lambda: rows(target_pg) == rows(source_db), process=sink, what="the sink caught up")
            connector.check_alive()
    return path, marks


def test_replay_from_a_mid_stream_lsn_repairs_a_damaged_target(history, source_db, target_pg):
    path, marks = history
    with psycopg.connect(target_pg, autocommit=True) as conn:  # rows that changed since the LSN, damaged
        conn.execute("UPDATE items SET name = 'damaged', qty = 0 WHERE id <= 50 OR id BETWEEN 100 AND 119 OR id >= 300")
    assert rows(target_pg) != rows(source_db)
    result = cdc("replay", str(path), "--sink", "main", "--from-lsn", marks["after_inserts"], "--yes")
    assert result.returncode == 0, result.stderr
    assert "replayed" in result.stderr and "into table items" in result.stderr
    assert rows(target_pg) == rows(source_db)
    # The positions moved to the end again: a normal sink has nothing left to do, and keeps it equal.
    with CdcProcess(path, "sink") as sink:
        time.sleep(2)
        sink.check_alive()
    assert rows(target_pg) == rows(source_db)


def test_replay_rebuilds_another_database_and_a_point_in_time(history, source_db, target_pg):
    path, marks = history
    full, full_dsn = _fresh_database(TARGET_DSN, "cdc_rebuild")
    past, past_dsn = _fresh_database(TARGET_DSN, "cdc_pit")
    try:
        result = cdc("replay", str(path), "--sink", "main", "--from-lsn", "0/0", "--target", full_dsn)
        assert result.returncode == 0, result.stderr
        assert rows(full_dsn) == rows(source_db), result.stderr[-3000:]
        result = cdc("replay", str(path), "--sink", "main", "--from-lsn", "0/0", "--until-lsn", marks["after_updates"],
                     "--target", past_dsn)
        assert result.returncode == 0, result.stderr
        assert rows(past_dsn) == marks["state_after_updates"]
        assert rows(target_pg) == rows(source_db)  # the sink's own target was not touched
    finally:
        _drop_database(TARGET_DSN, full)
        _drop_database(TARGET_DSN, past)


def test_replay_is_refused_while_the_sink_runs_and_bad_lsns_are_exit_2(history, source_db, target_pg):
    path, marks = history
    sink = CdcProcess(path, "sink")
    sink.log_path = path.with_suffix(".second-sink.log")
    with sink:
        wait_until(lambda: "consuming" in sink.log(), process=sink, what="the sink holding its lock")
        result = cdc("replay", str(path), "--sink", "main", "--from-lsn", "0/0", "--yes")
        sink.check_alive()
    assert result.returncode == 5, result.stderr
    assert "is already running against" in result.stderr
    assert cdc("replay", str(path), "--sink", "main", "--from-lsn", "nonsense", "--yes").returncode == 2
    backwards = cdc("replay", str(path), "--sink", "main", "--from-lsn", "1/0", "--until-lsn", "0/10", "--yes")
    assert backwards.returncode == 2 and "--until-lsn" in backwards.stderr
    assert cdc("replay", str(path), "--sink", "nope", "--from-lsn", "0/0", "--yes").returncode == 2
    refused = cdc("replay", str(path), "--sink", "main", "--from-lsn", "0/0")  # no terminal, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr


def test_a_replay_killed_half_way_then_a_normal_sink_ends_equal(history, source_db, target_pg):
    path, _ = history
    path.write_text(path.read_text().replace("batch_size: 100", "batch_size: 1"))  # a slow replay, to kill
    with psycopg.connect(target_pg, autocommit=True) as conn:
        conn.execute("UPDATE items SET name = 'damaged'")
    replay = subprocess.Popen([sys.executable, "-m", "cdc.cli", "replay", str(path), "--sink", "main",
                               "--from-lsn", "0/0", "--yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: any(r[1] != "damaged" for r in rows(target_pg)), timeout=60, what="the replay under way")
    finally:
        replay.kill()
        replay.wait()
    assert replay.returncode != 0
    with CdcProcess(path, "sink") as sink:
        wait_until(lambda: rows(target_pg) == rows(source_db), process=sink, what="the sink finishing the repair")


def test_bad_target_url_is_exit_2_without_the_password(history):
    path, _ = history
    result = cdc("replay", str(path), "--sink", "main", "--from-lsn", "0/0", "--target", "mysql://u:s3cret@h/db")
    assert result.returncode == 2 and "s3cret" not in result.stderr + result.stdout, result.stderr


def test_status_reports_the_slot_topics_and_sink_lag_as_json(history, source_db, target_pg, tmp_path):
    import json

    path, _ = history

    def status() -> dict:
        result = cdc("status", str(path), "--json")
        assert result.returncode in (0, 3), result.stderr  # 3: no connector running (docs/operations.md: Status)
        return json.loads(result.stdout)

    first = status()
    name = first["pipeline"]
    with psycopg.connect(source_db) as conn:
        confirmed, restart = conn.execute(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (f"cdc_{name}",)).fetchone()
    slot = first["source"]["slot"]
    assert (slot["confirmed_flush_lsn"], slot["restart_lsn"], slot["active"]) == (confirmed, restart, False)
    (lag,) = first["sinks"]["main"]["partitions"]
    assert lag["lag_events"] == 0 and lag["target_table"] == "items"
    with psycopg.connect(target_pg) as conn:
        (offset,) = conn.execute("SELECT kafka_offset FROM cdc_sink_positions").fetchone()
    assert lag["applied_offset"] == offset
    assert first["kafka"]["snapshots"]["public.items"]["state"] == "done"

    # Lag grows while the sink is stopped, and returns to 0 once it caught up.
    with CdcProcess(path, "connector") as connector:
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT i, 'more', i FROM generate_series(1000, 1024) i")
        wait_until(lambda: status()["sinks"]["main"]["partitions"][0]["lag_events"] == 25, process=connector,
                   what="a lag of 25 events")
        assert status()["sinks"]["main"]["partitions"][0]["lag_wal_bytes"] > 0
        with CdcProcess(path, "sink") as sink:
            wait_until(lambda: status()["sinks"]["main"]["partitions"][0]["lag_events"] == 0, process=sink,
                       what="no lag once the sink caught up")

    # Something unreachable: exit 1, saying what.
    broken = tmp_path / "broken.yaml"
    server = target_pg.rsplit("/", 1)[0]  # scheme://user:password@host:port: the same role, a closed port
    broken.write_text(path.read_text().replace(server, server.rpartition("@")[0] + "@127.0.0.1:1"))
    result = cdc("status", str(broken))
    assert result.returncode == 1 and "sink main: UNREACHABLE" in result.stdout, result.stdout + result.stderr
    assert server.rpartition("@")[0].partition("://")[2] not in result.stdout + result.stderr  # no user:password


def test_replay_from_an_lsn_after_every_event_stores_real_positions(history, source_db, target_pg):
    """No event of the table at or after --from-lsn: nothing to apply, and the positions it stores
    are real ones that PostgreSQL and a normal sink accept."""
    path, _ = history
    result = cdc("replay", str(path), "--sink", "main", "--from-lsn", current_lsn(source_db), "--yes")
    assert result.returncode == 0, result.stderr
    assert rows(target_pg) == rows(source_db)


@pytest.fixture
def two_tables(tmp_path, source_db, broker, target_pg):
    return make_two_tables(tmp_path, source_db, broker, target_pg)


@pytest.fixture
def two_tables_on_tansu(tmp_path, source_db, tansu_broker, target_pg):
    """The same on tansu, a broker that reports end offsets below the records it holds."""
    return make_two_tables(tmp_path, source_db, tansu_broker, target_pg, idempotence=False)


def make_two_tables(tmp_path, source_db, broker, target_pg, **kafka) -> tuple:
    """A transactional sink (three tables) that applied 5 rows of `only_early`, then 20 transactions
    of one row in each of `pairs_a` and `pairs_b`; the LSN after the first and the LSN half-way."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE pairs_a (id int PRIMARY KEY, v int); CREATE TABLE pairs_b (id int PRIMARY KEY, v int);"
                     "CREATE TABLE only_early (id int PRIMARY KEY)")
    name = f"rp2_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db,
                          tables=["public.pairs_a", "public.pairs_b", "public.only_early"],
                          bootstrap=broker.bootstrap_servers, sinks={"main": {"url": target_pg, "batch_size": 4}},
                          status_interval_s=0.5, **kafka)
    marks = {}
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO only_early SELECT generate_series(1, 5)")
            marks["after_early"] = current_lsn(source_db)
            for i in range(1, 21):
                with conn.transaction():
                    conn.execute("INSERT INTO pairs_a VALUES (%s, %s)", (i, i))
                    conn.execute("INSERT INTO pairs_b VALUES (%s, %s)", (i, -i))
                if i == 10:
                    marks["half_way"] = current_lsn(source_db)
        with CdcProcess(path, "sink") as sink:
            wait_until(lambda: pair_rows(target_pg) == pair_rows(source_db), process=sink, what="the sink caught up")
            connector.check_alive()
    return path, marks


def pair_rows(dsn: str) -> tuple[list[tuple], ...]:
    try:
        return tuple(pg_rows(dsn, table, "id") for table in ("pairs_a", "pairs_b", "only_early"))
    except psycopg.errors.UndefinedTable:
        return ()


def stored_positions(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT topic, kafka_offset, commit_lsn, lsn, seq FROM cdc_sink_positions ORDER BY 1").fetchall()


@pytest.mark.parametrize("broker_name", ["kafka", "tansu"])
def test_replay_from_an_lsn_after_a_tables_last_event(request, broker_name, source_db, target_pg):
    """`only_early` has no event at or after --from-lsn: the replay still ends well, and every
    position it stored is a real one (it stored one past any LSN, `bigint out of range`, when the
    broker's end offset let it read that table's earlier events)."""
    path, marks = request.getfixturevalue("two_tables" if broker_name == "kafka" else "two_tables_on_tansu")
    result = cdc("replay", str(path), "--sink", "main", "--from-lsn", marks["after_early"], "--yes")
    assert result.returncode == 0, result.stderr
    assert pair_rows(target_pg) == pair_rows(source_db)
    assert all(0 <= seq < 2**31 for *_, seq in stored_positions(target_pg)), stored_positions(target_pg)


@pytest.mark.parametrize("replay_args", [["--until-lsn"], []], ids=["until-lsn", "killed"])
def test_a_transactional_sink_continues_after_a_replay_that_stopped_half_way(two_tables, source_db, target_pg,
                                                                            replay_args):
    """A replay into the sink's own target that ends half-way (--until-lsn, or killed while it
    applies): a normal `cdc sink` then applies the rest (it stalled: END records at or below the
    stored transactions position were taken as applied, and events waited for them)."""
    path, marks = two_tables
    with psycopg.connect(target_pg, autocommit=True) as conn:  # damage every row, to see the replay at work
        conn.execute("UPDATE pairs_a SET v = 0; UPDATE pairs_b SET v = 0")
    if replay_args:
        result = cdc("replay", str(path), "--sink", "main", "--from-lsn", "0/0", "--until-lsn", marks["half_way"], "--yes")
        assert result.returncode == 0, result.stderr
    else:
        hold = Hold(target_pg, "pairs_a", "NEW.id > 10")
        replay = subprocess.Popen([sys.executable, "-m", "cdc.cli", "replay", str(path), "--sink", "main",
                                   "--from-lsn", "0/0", "--yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            hold.wait_for_writer()
        finally:
            replay.kill()
            replay.wait()
            hold.release()
    assert pair_rows(target_pg) != pair_rows(source_db)
    with CdcProcess(path, "sink") as sink:
        wait_until(lambda: pair_rows(target_pg) == pair_rows(source_db), process=sink, what="the sink finishing the rest")
