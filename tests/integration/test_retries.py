"""Transient faults are healed by the running process (docs/operations.md: Faults and retries).

Real `cdc run` / `cdc connector` processes against a source that restarts, a target that restarts,
and a broker that stops answering; each ends with the targets equal to the source, or, past the
configured ceiling, with the documented exit code.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import uuid

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from cdc.dev.broker import LocalBroker
from cdc.dev.postgres import LocalPostgres
from cdc.errors import is_transient
from tests.integration.harness import CdcProcess, pg_rows, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import read_topic

pytestmark = pytest.mark.integration


class Workload:
    """Single-row transactions into `items`, one after the other, until stopped. Rides out a source
    that is down (an insert that fails is tried again on a new connection)."""

    def __init__(self, dsn: str, first_id: int = 1):
        self.dsn = dsn
        self.next_id = first_id
        self.committed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    while not self._stop.is_set():
                        conn.execute("INSERT INTO items VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
                                     (self.next_id, self.next_id))
                        self.next_id += 1
                        self.committed += 1
                        self._stop.wait(0.01)
            except psycopg.Error:
                self._stop.wait(0.2)  # the source is away: try again

    def __enter__(self) -> "Workload":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_for(self, rows: int, process: CdcProcess) -> None:
        start = self.committed
        wait_until(lambda: self.committed >= start + rows, process=process, what=f"{rows} more source transactions")


def items_pipeline(tmp_path, source_db: str, bootstrap: str, *, sinks: dict, idempotence: bool = True,
                   kafka: dict | None = None, source_retry: dict | None = None):
    name = f"r_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
                          bootstrap=bootstrap, sinks=sinks, status_interval_s=0.5, idempotence=idempotence,
                          kafka=kafka)
    if source_retry is not None:
        import yaml

        doc = yaml.safe_load(path.read_text())
        doc["source"]["retry"] = source_retry
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return name, path


def target_rows(target_dsn: str) -> int:
    try:
        return len(pg_rows(target_dsn, "items", "id"))
    except psycopg.Error:  # not created yet
        return 0


def ids_published(bootstrap: str, topic: str, wanted: set[int]) -> list[dict] | None:
    """The topic's events once they hold every id in `wanted` (repeats allowed)."""
    events = read_topic(bootstrap, topic, 1) or []
    return events if wanted <= {e["after"]["id"] for e in events} else None


def same_rows(source_dsn: str, target_dsn: str) -> bool | str:
    source = pg_rows(source_dsn, "items", "id")
    try:
        target = pg_rows(target_dsn, "items", "id")
    except psycopg.Error as exc:  # not created yet, or the target is still coming back
        return f"target: {exc}"
    return True if source == target else f"source {len(source)} rows, target {len(target)} rows"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_source_restart_under_run_is_healed_in_the_process(tmp_path, source_cluster, source_db, broker, target_pg,
                                                              mode):
    name, path = items_pipeline(tmp_path, source_db, broker.bootstrap_servers, sinks={"replica": {"url": target_pg}})
    with CdcProcess(path, "run") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)  # changes are captured from here on
        with Workload(source_db) as workload:
            workload.wait_for(50, proc)
            source_cluster.stop(mode)
            source_cluster.start()
            workload.wait_for(50, proc)
            wait_for_slot(source_db, f"cdc_{name}", proc)  # streaming again, in the same process
        # The workload stopped: everything it committed reaches the target.
        wait_until(lambda: same_rows(source_db, target_pg), process=proc, timeout=120,
                   what="the target equal to the source")
    log = proc.log()
    assert "the source unavailable" in log and "the source available again after" in log, log[-3000:]
    assert "Traceback" not in log, log[-5000:]


def test_a_source_down_past_the_ceiling_stops_with_exit_3(tmp_path, source_cluster, source_db, broker):
    name, path = items_pipeline(tmp_path, source_db, broker.bootstrap_servers, sinks={},
                                source_retry={"give_up_after_s": 3})
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        source_cluster.stop("fast")
        try:
            proc.proc.wait(120)
        finally:
            source_cluster.start()
    assert proc.proc.returncode == 3, proc.log()
    assert "giving up" in proc.log() and "Traceback" not in proc.log(), proc.log()


def test_a_target_restart_mid_apply_pauses_only_its_sink(tmp_path, source_db, broker):
    with LocalPostgres() as target_cluster:
        target = target_cluster.dsn()
        name, path = items_pipeline(tmp_path, source_db, broker.bootstrap_servers, sinks={"replica": {"url": target}})
        with CdcProcess(path, "run") as proc:
            wait_for_slot(source_db, f"cdc_{name}", proc)  # changes are captured from here on
            with Workload(source_db) as workload:
                workload.wait_for(50, proc)
                wait_until(lambda: target_rows(target), process=proc, what="rows in the target")
                target_cluster.stop("immediate")
                workload.wait_for(50, proc)  # the connector goes on publishing meanwhile
                target_cluster.start()
                workload.wait_for(50, proc)
            wait_until(lambda: same_rows(source_db, target), process=proc, timeout=120,
                       what="the target equal to the source")
    log = proc.log()
    assert f"sink {name}.replica: the target or Kafka unavailable" in log and "available again after" in log, log[-3000:]
    assert "the source unavailable" not in log and "Traceback" not in log, log[-5000:]


def _signal(broker: LocalBroker, sig: signal.Signals) -> None:
    assert broker._proc is not None
    broker._proc.send_signal(sig)


def test_a_broker_that_stops_answering_is_waited_out_without_idempotence(tmp_path, source_db):
    """tansu (no idempotent producer) paused for longer than a request time-out: the failed batch and
    everything after it is re-read from the slot, with no KeyError and no exit."""
    with LocalBroker() as tansu:
        name, path = items_pipeline(tmp_path, source_db, tansu.bootstrap_servers, sinks={}, idempotence=False,
                                    kafka={"request_timeout_ms": 2000})
        topic = f"{name}.public.items"
        with CdcProcess(path, "connector") as proc:
            wait_for_slot(source_db, f"cdc_{name}", proc)
            with psycopg.connect(source_db, autocommit=True) as conn:
                conn.execute("INSERT INTO items SELECT i, i FROM generate_series(1, 20) i")
                wait_until(lambda: read_topic(tansu.bootstrap_servers, topic, 20), process=proc, what="20 events")
                _signal(tansu, signal.SIGSTOP)
                try:
                    for i in range(21, 41):  # one transaction each: batches keep being sent into the outage
                        conn.execute("INSERT INTO items VALUES (%s, %s)", (i, i))
                    wait_until(lambda: "Kafka unavailable" in proc.log(), process=proc, what="the outage noticed")
                finally:
                    _signal(tansu, signal.SIGCONT)
            wait_until(lambda: "Kafka available again after" in proc.log(), process=proc, timeout=120,
                       what="the connector streaming again")
            events = wait_until(lambda: ids_published(tansu.bootstrap_servers, topic, set(range(1, 41))), process=proc,
                                timeout=120, what="every event after the outage")
            proc.check_alive()
    assert {e["after"]["id"] for e in events} == set(range(1, 41))  # repeats allowed, nothing missing
    assert "KeyError" not in proc.log(), proc.log()[-3000:]


def test_a_broker_down_past_the_ceiling_stops_with_exit_1(tmp_path, source_db):
    with LocalBroker() as tansu:
        name, path = items_pipeline(tmp_path, source_db, tansu.bootstrap_servers, sinks={}, idempotence=False,
                                    kafka={"request_timeout_ms": 2000, "retry": {"give_up_after_s": 5}})
        with CdcProcess(path, "connector") as proc:
            wait_for_slot(source_db, f"cdc_{name}", proc)
            tansu.stop()
            with psycopg.connect(source_db, autocommit=True) as conn:
                conn.execute("INSERT INTO items SELECT i, i FROM generate_series(1, 20) i")
            proc.proc.wait(120)
    assert proc.proc.returncode == 1, proc.log()
    assert "Kafka still unavailable" in proc.log() and "Traceback" not in proc.log(), proc.log()


def test_waiting_for_kafka_keeps_the_replication_connection_alive(tmp_path, source_cluster, source_db, broker):
    """The idempotent producer waits for a broker that stopped answering while changes keep coming;
    meanwhile standby status updates keep the walsender from ending the connection at
    wal_sender_timeout (5 s here): the same walsender streams before and after, and no source
    failure is reported."""
    with psycopg.connect(source_cluster.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_sender_timeout = '5s'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        name, path = items_pipeline(tmp_path, source_db, broker.bootstrap_servers, sinks={},
                                    kafka={"request_timeout_ms": 3000})
        topic, slot = f"{name}.public.items", f"cdc_{name}"
        with CdcProcess(path, "connector") as proc:
            wait_for_slot(source_db, slot, proc)
            node = next(iter(broker.nodes))
            with Workload(source_db) as workload:
                broker.pause(node)
                try:
                    # The producer waits for its batch, or (a batch failed) the connector starts over.
                    wait_until(lambda: "has not acknowledged" in proc.log() or "Kafka unavailable" in proc.log(),
                               process=proc, timeout=60, what="the connector waiting for Kafka")
                    # Longer than the walsender waits for a reply: it must have had status updates.
                    with psycopg.connect(source_db) as conn:
                        conn.execute("SELECT pg_sleep(12)")
                    proc.check_alive()
                finally:
                    broker.resume(node)
            wanted = set(range(1, workload.next_id))
            wait_until(lambda: ids_published(broker.bootstrap_servers, topic, wanted), process=proc, timeout=120,
                       what="the events after the broker answers again")
            proc.check_alive()
        # A walsender that ended the connection at wal_sender_timeout would be a source outage here.
        assert "the source unavailable" not in proc.log() and "connection to the source was lost" not in proc.log(), \
            proc.log()[-3000:]
    finally:
        with psycopg.connect(source_cluster.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET wal_sender_timeout")
            conn.execute("SELECT pg_reload_conf()")


def test_a_metadata_request_no_broker_answers_is_a_fault_to_wait_out(broker):
    """A broker that stops answering between a client's start and its metadata request (or that
    answers without brokers while it rejoins its cluster) makes aiokafka raise a plain KafkaError.
    The connector asks for metadata at the start of every attempt, so this must be waited out like
    any other outage, not end the process (it did: exit 1 after a 12 s pause of the broker)."""
    async def metadata_while_paused() -> BaseException:
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, request_timeout_ms=2000)
        await consumer.start()
        node = next(iter(broker.nodes))
        broker.pause(node)
        try:
            await consumer.topics()
        except KafkaError as exc:
            return exc
        finally:
            broker.resume(node)
            await consumer.stop()
        raise AssertionError("a paused broker answered a metadata request")

    exc = asyncio.run(metadata_while_paused())
    assert is_transient(exc), f"{type(exc).__name__}: {exc}"
