"""The fault suite (README: Faults and retries; docs/reliability.md): real `cdc` processes, a real
source PostgreSQL, Apache Kafka and two targets (PostgreSQL and SQLite), faults injected by crash
points (CDC_FAILPOINT), by the tests' TCP proxy between cdc and a database, by restarting the source
or a target, and by pausing or killing the broker. Every scenario ends with the same checker.

Broker faults are made on the broker process (SIGSTOP, SIGKILL) rather than through the proxy: a
Kafka client learns the broker's address from the broker itself (advertised.listeners), so a proxy
in front of it would be bypassed after the first metadata request.

`make test` runs the fast part; `make test-faults` (CDC_FAULTS_FULL=1) runs every scenario and
writes the figures (CDC_FAULT_RESULTS).
"""

from __future__ import annotations

import time

import psycopg
import pytest

from cdc.dev.postgres import LocalPostgres
from tests.faults import checker
from tests.faults.proxy import FaultProxy
from tests.faults.scenario import Scenario, upstream, via
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration
full = pytest.mark.faults_full

CRASH_POINTS = [
    # (point, n-th time reached, pre-loaded rows for a snapshot, fast part)
    ("connector.received", 40, 0, False),
    ("connector.published", 40, 0, True),
    ("connector.acknowledged", 10, 0, False),
    ("connector.confirmed", 6, 0, False),
    ("sink.consumed", 5, 0, False),
    ("sink.applied", 5, 0, True),
    ("sink.committed", 5, 0, False),
    ("snapshot.chunk_read", 3, 2000, False),
    ("snapshot.chunk_published", 3, 2000, True),
    ("snapshot.chunk_recorded", 3, 2000, False),
]


def _crash_params():
    for point, nth, preload, fast in CRASH_POINTS:
        yield pytest.param(point, nth, preload, id=point, marks=() if fast else (full,))


@pytest.mark.parametrize("point, nth, preload", list(_crash_params()))
def test_a_crash_at_each_point_loses_nothing_after_a_restart(tmp_path, source_db, broker, target_pg, fault_results,
                                                              point, nth, preload):
    """Killed at the point (SIGKILL, from CDC_FAILPOINT) while a workload runs, then started again:
    the targets end equal to the source, with nothing missing or reordered in Kafka."""
    began = time.monotonic()
    scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target_pg, preload=preload,
                        snapshot="initial" if preload else "never", source_extra={"snapshot_chunk_size": 200})
    crashing = scenario.cdc(failpoint=f"{point}:{nth}", label=".crash").start()

    def slot_created() -> bool:
        # A snapshot's early chunks may reach the point before this sees the slot: only that crash may end it.
        if crashing.proc.poll() is not None:
            assert f"failpoint {point} reached" in crashing.log(), crashing.log()[-3000:]
        return scenario.slot_state()[0]

    wait_until(slot_created, timeout=120, what="the slot created")
    with scenario.watch() as watch, scenario.workload() as workload:
        wait_until(lambda: crashing.proc.poll() is not None, timeout=180, what=f"the crash at {point}")
        assert crashing.proc.returncode == -9, crashing.log()[-3000:]
        assert f"failpoint {point} reached" in crashing.log(), crashing.log()[-3000:]
        scenario.wait_slot_released()
        with scenario.cdc(label=".restart") as restarted:
            workload.wait_for(30, restarted)
            workload.stop()
            scenario.conclude(restarted, watch, fault_results, f"crash at {point}", faults=1,
                              began=began, restarts=1)


@pytest.mark.parametrize("command", ["run", pytest.param("connector", marks=full)])
def test_started_while_the_source_is_coming_back_it_waits_and_streams(tmp_path, source_cluster, source_db, broker,
                                                                       target_pg, fault_results, command):
    """Issue 17: `cdc run` / `cdc connector` started while the source is down and then starting up
    waits (source.retry) instead of exiting, and streams once the source is back."""
    began = time.monotonic()
    scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target_pg)
    source_cluster.stop("immediate")
    try:
        proc = scenario.cdc(command).start()
        wait_until(lambda: "the source unavailable" in proc.log(), process=proc, timeout=60,
                   what="the connector waiting for the source")
    finally:
        source_cluster.start()
    with proc, scenario.watch() as watch:
        scenario.wait_streaming(proc)
        with scenario.workload() as workload:
            workload.wait_for(30, proc)
        if command == "connector":  # the sinks run beside it
            with scenario.cdc("sink") as sinks:
                scenario.finish(sinks, watch)
        assert "the source available again after" in proc.log(), proc.log()[-3000:]
        scenario.conclude(proc, watch, fault_results, f"cdc {command} started while the source is down", faults=1,
                          began=began)


def test_sinks_started_while_their_target_refuses_connections_wait_for_it(tmp_path, source_db, broker, target_pg,
                                                                         fault_results):
    began = time.monotonic()
    with FaultProxy(*upstream(target_pg)) as target_link:
        scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target_pg,
                            target_via=via(target_pg, target_link))
        with scenario.cdc("connector") as connector, scenario.watch() as watch:
            scenario.wait_streaming(connector)
            target_link.set("reset")
            sinks = scenario.cdc("sink").start()
            with sinks:
                wait_until(lambda: "the target or Kafka unavailable" in sinks.log(), process=sinks, timeout=60,
                           what="the sink waiting for its target")
                with scenario.workload() as workload:
                    workload.wait_for(30, connector, sinks)
                    target_link.set("pass")
                    workload.wait_for(30, connector, sinks)
                scenario.conclude(sinks, watch, fault_results, "cdc sink started while its target refuses connections",
                                  faults=1, began=began)
    assert "available again after" in sinks.log(), sinks.log()[-3000:]


# -- the "done when": cdc run of a two-sink pipeline through every kind of fault ------------


def _through_every_fault(tmp_path, source_cluster, source_db, broker, fault_results, *, cut_s: list[float],
                         kafka_pause_s: float, label: str) -> None:
    """`cdc run` (a PostgreSQL and a SQLite sink) under a steady workload: the source restarted fast
    and immediate, the source link reset, the source and target links blackholed for each of
    `cut_s`, the only Kafka node paused, the target restarted. The process never exits; both sinks
    end equal to the source."""
    began = time.monotonic()
    faults = 0
    node = next(iter(broker.nodes))
    with LocalPostgres() as target_cluster, FaultProxy(*upstream(source_cluster.dsn())) as source_link:
        target = target_cluster.dsn()
        with FaultProxy(*upstream(target)) as target_link:
            scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target,
                                source_via=via(source_db, source_link), target_via=via(target, target_link))
            with scenario.cdc() as proc, scenario.watch() as watch:
                scenario.wait_streaming(proc)
                with scenario.workload() as workload:
                    workload.wait_for(30, proc)
                    for mode in ("fast", "immediate"):
                        source_cluster.stop(mode)
                        source_cluster.start()
                        faults += 1
                        workload.wait_for(30, proc)
                        scenario.wait_streaming(proc)
                    source_link.set("reset")
                    source_link.set("pass")
                    faults += 1
                    workload.wait_for(30, proc)
                    for seconds in cut_s:
                        for link in (source_link, target_link):
                            link.set("blackhole")
                            faults += 1
                            time.sleep(seconds)  # the fault's length is the scenario, not a wait for a result
                            link.set("pass")
                            workload.wait_for(30, proc, timeout=300)
                    broker.pause(node)
                    faults += 1
                    try:
                        time.sleep(kafka_pause_s)
                        proc.check_alive()
                    finally:
                        broker.resume(node)
                    workload.wait_for(30, proc, timeout=300)
                    target_cluster.stop("fast")
                    faults += 1
                    workload.wait_for(30, proc)
                    target_cluster.start()
                    workload.wait_for(30, proc)
                scenario.conclude(proc, watch, fault_results, label, faults=faults, began=began, timeout=600)
    log = proc.log()
    assert "Traceback" not in log, log[-5000:]


def test_cdc_run_keeps_both_sinks_equal_through_every_fault_short(tmp_path, source_cluster, source_db, broker,
                                                                  fault_results):
    _through_every_fault(tmp_path, source_cluster, source_db, broker, fault_results, cut_s=[5], kafka_pause_s=5,
                         label="cdc run through every fault (5 s cuts)")


@full
@pytest.mark.timeout(1800)
def test_cdc_run_keeps_both_sinks_equal_through_every_fault(tmp_path, source_cluster, source_db, broker,
                                                            fault_results):
    _through_every_fault(tmp_path, source_cluster, source_db, broker, fault_results, cut_s=[30, 90],
                         kafka_pause_s=90, label="cdc run through every fault (30 and 90 s cuts, Kafka paused 90 s)")


# -- the long part (make test-faults) ---------------------------------------------------------------


def _snapshot_running(scenario: Scenario, rows: int):
    """Some snapshot rows reached the PostgreSQL target, not all of them yet."""
    def check() -> bool:
        got = checker_rows(scenario)
        return 0 < got < rows
    return check


def checker_rows(scenario: Scenario) -> int:
    return len(checker.target_rows(scenario.targets[0]) or [])


@full
@pytest.mark.parametrize("phase", ["streaming", "snapshot"])
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_source_restart_is_healed_in_the_process(tmp_path, source_cluster, source_db, broker, target_pg,
                                                   fault_results, mode, phase):
    began = time.monotonic()
    preload = 30_000 if phase == "snapshot" else 0
    scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target_pg, preload=preload,
                        snapshot="initial" if preload else "never", source_extra={"snapshot_chunk_size": 500})
    with scenario.cdc() as proc, scenario.watch() as watch:
        scenario.wait_streaming(proc)
        with scenario.workload() as workload:
            if phase == "snapshot":
                wait_until(_snapshot_running(scenario, preload), process=proc, timeout=120, interval=0.05,
                           what="the snapshot under way")
            else:
                workload.wait_for(50, proc)
            source_cluster.stop(mode)
            source_cluster.start()
            workload.wait_for(50, proc)
            scenario.wait_streaming(proc)
        scenario.conclude(proc, watch, fault_results, f"source restart ({mode}) during {phase}", faults=1,
                          began=began)
    assert "the source available again after" in proc.log(), proc.log()[-3000:]


@full
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seconds", [5, 30, 90])
@pytest.mark.parametrize("fault", ["reset", "blackhole"])
@pytest.mark.parametrize("link", ["source", "target"])
def test_a_link_fault_is_healed_in_the_process(tmp_path, source_db, broker, target_pg, fault_results, link, fault,
                                               seconds):
    """The TCP link between cdc and the source (connector) or the target (PostgreSQL sink) reset
    (every connection, and new ones refused for `seconds`) or blackholed for `seconds`."""
    began = time.monotonic()
    peer = source_db if link == "source" else target_pg
    with FaultProxy(*upstream(peer)) as proxy:
        scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target_pg,
                            **{f"{link}_via": via(peer, proxy)})
        with scenario.cdc() as proc, scenario.watch() as watch:
            scenario.wait_streaming(proc)
            with scenario.workload() as workload:
                workload.wait_for(50, proc)
                proxy.set(fault)
                time.sleep(seconds)  # the fault's length is the scenario, not a wait for a result
                proc.check_alive()
                proxy.set("pass")
                workload.wait_for(50, proc, timeout=300)
            scenario.conclude(proc, watch, fault_results, f"{link} link {fault} for {seconds} s", faults=1,
                              began=began)


@full
def test_the_only_kafka_node_killed_and_restarted(tmp_path, source_db, broker, target_pg, fault_results):
    began = time.monotonic()
    node = next(iter(broker.nodes))
    scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target_pg)
    with scenario.cdc() as proc, scenario.watch() as watch:
        scenario.wait_streaming(proc)
        with scenario.workload() as workload:
            workload.wait_for(50, proc)
            broker.kill(node)
            try:
                workload.wait_for(100, proc)  # the source goes on; the connector waits for Kafka
            finally:
                broker.start_node(node)
            workload.wait_for(50, proc, timeout=300)
        scenario.conclude(proc, watch, fault_results, "Kafka node SIGKILL and restart", faults=1,
                          began=began)


@full
def test_a_target_restart_and_a_held_table_lock(tmp_path, source_db, broker, fault_results):
    """The PostgreSQL target restarted (immediate) mid-apply, then its table locked by another session
    for a while: the sink waits for both, the SQLite sink and the connector go on."""
    began = time.monotonic()
    with LocalPostgres() as target_cluster:
        target = target_cluster.dsn()
        scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target)
        with scenario.cdc() as proc, scenario.watch() as watch:
            scenario.wait_streaming(proc)
            with scenario.workload() as workload:
                workload.wait_for(50, proc)
                wait_until(lambda: checker_rows(scenario), process=proc, what="rows in the target")
                target_cluster.stop("immediate")
                workload.wait_for(50, proc)
                target_cluster.start()
                workload.wait_for(50, proc)
                with psycopg.connect(target) as locker:
                    locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
                    workload.wait_for(100, proc)  # the sink is blocked meanwhile, nothing else is
                    locker.rollback()
                workload.wait_for(50, proc)
            scenario.conclude(proc, watch, fault_results, "target restart and a held table lock", faults=2,
                              began=began)


@full
@pytest.mark.timeout(1200)
# sink.committed counts the pieces both sinks committed: the third is the second piece of one of them.
@pytest.mark.parametrize("point", ["connector.published:120000", "sink.committed:3"])
def test_a_200k_row_transaction_with_crashes_between_its_pieces(tmp_path, source_db, broker, target_pg,
                                                                fault_results, point):
    """One source transaction of 200,000 rows, applied by the sinks in pieces of 50,000
    (`max_transaction_events`); the process killed in the middle of publishing it, or between two
    of its pieces in the targets; restarted, both targets end equal to the source."""
    began = time.monotonic()
    scenario = Scenario(tmp_path, source_db, broker.bootstrap_servers, postgres_target=target_pg,
                        sink_extra={"apply": "transactional", "max_transaction_events": 50_000, "batch_size": 5000})
    crashing = scenario.cdc(failpoint=point, label=".crash").start()
    scenario.wait_streaming(crashing)
    with scenario.watch() as watch:
        checker.record_history(source_db)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items (id, pad) SELECT i, 'big' FROM generate_series(1, 200000) i")
        wait_until(lambda: crashing.proc.poll() is not None, timeout=600, what=f"the crash at {point}")
        assert crashing.proc.returncode == -9, crashing.log()[-3000:]
        scenario.wait_slot_released()
        with scenario.cdc(label=".restart") as restarted:
            scenario.conclude(restarted, watch, fault_results, f"200,000-row transaction, crash at {point.split(':')[0]}",
                              faults=1, began=began, restarts=1, timeout=900)
