"""The connector never goes on quietly when it cannot guarantee that nothing is lost.

Each case as an operator meets it: real `cdc connector` processes, a real source, the broker.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from cdc.dev.broker import LocalBroker
from cdc.dev.postgres import free_port
from tests.integration.harness import CdcProcess, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import cdc, read_topic

pytestmark = pytest.mark.integration

DDL = "CREATE TABLE items (id int PRIMARY KEY, n int)"


def make_pipeline(tmp_path, source_db, bootstrap: str, *, dsn: str | None = None, idempotence: bool = True,
                  snapshot: str = "never"):
    name = f"f_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(DDL)
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=dsn or source_db, tables=["public.items"],
                          bootstrap=bootstrap, sinks={}, status_interval_s=0.5, idempotence=idempotence,
                          snapshot=snapshot)
    return name, path


def insert(source_db: str, ids: range) -> None:
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT i, i FROM generate_series(%s::int, %s::int) i", (ids.start, ids.stop - 1))


def slot_holds_unconfirmed_wal(source_db: str, slot: str) -> bool:
    """The slot has not confirmed everything written: what Kafka did not take is still there."""
    with psycopg.connect(source_db) as conn:
        return conn.execute(
            "SELECT pg_current_wal_insert_lsn() > confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()[0]


def slot_exists(source_db: str, slot: str) -> bool:
    with psycopg.connect(source_db) as conn:
        return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() is not None


def test_a_dropped_slot_stops_the_connector_instead_of_being_recreated_quietly(tmp_path, source_db, broker):
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    topic = f"{name}.public.items"
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        insert(source_db, range(1, 101))
        wait_until(lambda: read_topic(broker.bootstrap_servers, topic, 100), process=proc, what="100 events")
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (f"cdc_{name}",))
    insert(source_db, range(101, 201))  # made while no slot kept them

    result = cdc("connector", str(path))
    assert result.returncode == 4, result.stderr
    assert f"replication slot cdc_{name} does not exist" in result.stderr and "--create-slot" in result.stderr
    assert not slot_exists(source_db, f"cdc_{name}")  # nothing was created behind the operator's back

    # The deliberate way forward: a new slot, knowing that 101-200 are not published.
    with subprocess.Popen([sys.executable, "-m", "cdc.cli", "connector", str(path), "--create-slot"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as created:
        try:
            wait_until(lambda: slot_exists(source_db, f"cdc_{name}"), timeout=30, what="the new slot")
            insert(source_db, range(201, 211))
            events = wait_until(lambda: read_topic(broker.bootstrap_servers, topic, 110), what="events of the new slot")
        finally:
            created.terminate()
    assert [e["after"]["id"] for e in events][100:] == list(range(201, 211))


def test_a_second_connector_of_a_running_pipeline_is_refused_with_the_holder(tmp_path, source_db, broker):
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        result = cdc("connector", str(path))
        proc.check_alive()
    assert result.returncode == 5, result.stderr
    assert f"pipeline {name} is already running: slot cdc_{name} is held by PID" in result.stderr


def test_an_unreachable_broker_is_reported_before_anything_is_created(tmp_path, source_db):
    name, path = make_pipeline(tmp_path, source_db, f"127.0.0.1:{free_port()}")
    path.write_text(path.read_text().replace("kafka:\n", "kafka:\n  retry: {give_up_after_s: 0}\n"))  # no waiting
    started = time.monotonic()
    result = cdc("connector", str(path))
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 60
    assert "not reachable" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not slot_exists(source_db, f"cdc_{name}")
    with psycopg.connect(source_db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (f"cdc_{name}",)).fetchone() == (0,)


def test_a_missing_table_creates_no_topic(tmp_path, source_db, broker):
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    path.write_text(path.read_text().replace("  - public.items\n", "  - public.items\n  - public.nope\n"))
    result = cdc("connector", str(path))
    assert result.returncode == 2 and "public.nope does not exist" in result.stderr, result.stderr

    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def topics() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            return await admin.list_topics()
        finally:
            await admin.close()

    assert not [t for t in asyncio.run(topics()) if t.startswith(name)]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_source_restart_past_the_retry_ceiling_ends_with_its_own_exit_code(tmp_path, source_cluster, source_db,
                                                                              broker, mode):
    """With `source.retry.give_up_after_s: 0` the first fault stops the connector (the default waits
    the source out: tests/integration/test_retries.py)."""
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    path.write_text(path.read_text().replace("  status_interval_s:", "  retry:\n    give_up_after_s: 0\n  status_interval_s:"))
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        source_cluster.stop(mode)
        try:
            proc.proc.wait(60)
        finally:
            source_cluster.start()
    assert proc.proc.returncode == 3, proc.log()
    assert "Traceback" not in proc.log()
    # Nothing was lost: a restart resumes from the slot.
    insert(source_db, range(1, 11))
    with CdcProcess(path, "connector") as proc:
        wait_until(lambda: read_topic(broker.bootstrap_servers, f"{name}.public.items", 10), process=proc,
                   what="events after the restart")


def test_sigterm_while_the_broker_is_down_stops_within_the_grace_period(tmp_path, source_db):
    with LocalBroker() as own_broker:
        # tansu: stopping it is a broker gone for good (it keeps nothing)
        name, path = make_pipeline(tmp_path, source_db, own_broker.bootstrap_servers, idempotence=False)
        proc = CdcProcess(path, "connector").start()
        wait_for_slot(source_db, f"cdc_{name}", proc)
        own_broker.stop()
        insert(source_db, range(1, 51))
        time.sleep(3)
        started = time.monotonic()
        code = proc.stop()
        took = time.monotonic() - started
    assert took < 30, f"took {took:.0f} s:\n{proc.log()}"
    assert code in (0, 1), proc.log()
    # One summary line per interval, not a line per reconnect attempt.
    assert proc.log().count("aiokafka") < 20, proc.log()[-3000:]
    # The events were never acknowledged, so the slot still holds them.
    assert slot_holds_unconfirmed_wal(source_db, f"cdc_{name}")


def test_a_role_that_owns_nothing_gets_one_line_saying_what_to_grant(tmp_path, source_db, broker):
    role = f"reader_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    dsn = source_db.replace("postgresql://postgres@", f"postgresql://{role}@")
    try:
        name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers, dsn=dsn, snapshot="initial")
        result = cdc("connector", str(path))
        assert result.returncode == 2, result.stderr
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert "Traceback" not in result.stderr and len(lines) <= 3, result.stderr
        assert f"role {role} does not own table public.items" in result.stderr, result.stderr
        assert f"CREATE PUBLICATION cdc_{name} FOR TABLE public.items" in result.stderr
        assert f"role {role} may not read table public.items, which the initial snapshot reads" in result.stderr
    finally:
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_all_replication_slots_in_use_is_a_source_problem(tmp_path, source_db, broker):
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    fillers = []
    with psycopg.connect(source_db, autocommit=True) as conn:
        (limit,) = conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'max_replication_slots'").fetchone()
        (used,) = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()
        try:
            for i in range(limit - used):
                fillers.append(f"filler_{uuid.uuid4().hex[:8]}")
                conn.execute("SELECT pg_create_physical_replication_slot(%s)", (fillers[-1],))
            result = cdc("connector", str(path))
        finally:
            for slot in fillers:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert result.returncode == 2, result.stderr
    assert "max_replication_slots" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_broker_that_comes_back_empty_stops_the_connector_with_a_named_error(tmp_path, source_db):
    with LocalBroker() as own_broker:
        name, path = make_pipeline(tmp_path, source_db, own_broker.bootstrap_servers, idempotence=False)
        topic = f"{name}.public.items"
        with CdcProcess(path, "connector") as proc:
            wait_for_slot(source_db, f"cdc_{name}", proc)
            insert(source_db, range(1, 21))
            wait_until(lambda: read_topic(own_broker.bootstrap_servers, topic, 20), process=proc, what="20 events")
            own_broker.stop()
            own_broker.start()  # same port, nothing in it
            insert(source_db, range(21, 31))
            proc.proc.wait(90)
        assert proc.proc.returncode == 4, proc.log()
        assert f"topic {topic} partition 0 gave our events offset 0, but it already held offsets up to 19" in proc.log()
        # Nothing past what Kafka lost was confirmed: the slot still holds 21-30.
        assert slot_holds_unconfirmed_wal(source_db, f"cdc_{name}")


def test_run_checks_every_sink_target_before_creating_anything(tmp_path, source_db, broker, target_pg):
    name, path = make_pipeline(tmp_path, source_db, broker.bootstrap_servers)
    missing_db = target_pg.rsplit("/", 1)[0] + "/no_such_db?connect_timeout=5"
    path.write_text(path.read_text().replace("sinks: {}", f"sinks:\n  replica:\n    url: {missing_db}"))
    result = cdc("run", str(path))
    assert result.returncode == 1, result.stderr
    assert f"sink {name}.replica" in result.stderr and 'database "no_such_db" does not exist' in result.stderr
    assert "cdc_test:cdc_test" not in result.stderr
    assert not slot_exists(source_db, f"cdc_{name}")
