"""What only a real Apache Kafka can answer: idempotent producers under retries, a leader broker
killed mid-workload, retention deleting segments, topic configuration as the broker reports it.

Real `cdc` processes, real source clusters (PostgreSQL 15 and 18), Apache Kafka in KRaft mode
(`cdc.dev.kafka`): the session's one-node `broker`, or clusters of this module's own for faults.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import re
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from cdc.dev.kafka import KafkaCluster
from cdc.lsn import parse_lsn
from tests.integration.harness import CdcProcess, sqlite_rows, topic_events, wait_for_slot, wait_until, write_pipeline

pytestmark = pytest.mark.integration

DDL = "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL)"


# Session scope: tests run once per source leg, and a module fixture would start its cluster again
# for the second leg.
@pytest.fixture(scope="session")
def kafka_alone():
    """One node of our own, to pause and restart without disturbing the session's broker."""
    with KafkaCluster(nodes=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def kafka_trio():
    """Three nodes: topics with replication factor 3 and min.insync.replicas 2, as in production.
    A dead broker is noticed after 3 s instead of 9 (faster failover, same mechanism)."""
    with KafkaCluster(nodes=3, config={"broker.session.timeout.ms": 3000, "broker.heartbeat.interval.ms": 500}) as cluster:
        yield cluster


def pipeline(tmp_path: Path, source_db: str, bootstrap: str, *, sinks: dict | None = None, **kafka) -> tuple[str, Path]:
    name = f"k_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(DDL.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    path = write_pipeline(tmp_path / f"{name}.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
                          bootstrap=bootstrap, sinks=sinks or {}, status_interval_s=0.5, kafka=kafka)
    return name, path


class Workload(threading.Thread):
    """Small transactions against the source until stopped: an insert each, and every third one
    also updates an earlier row. `changes` counts the row changes committed."""

    def __init__(self, dsn: str, pause_s: float = 0.01, first_id: int = 1):
        super().__init__(daemon=True)
        self.dsn, self.pause_s, self.next_id = dsn, pause_s, first_id
        self.changes = 0
        self.error: BaseException | None = None
        self._finish = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._finish.is_set():
                    i = self.next_id
                    with conn.transaction():
                        conn.execute("INSERT INTO items VALUES (%s, 0)", (i,))
                        if i % 3 == 0:
                            conn.execute("UPDATE items SET n = n + 1 WHERE id = %s", (i // 2,))
                    self.changes += 2 if i % 3 == 0 else 1
                    self.next_id += 1
                    time.sleep(self.pause_s)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> int:
        self._finish.set()
        self.join(30)
        assert self.error is None, f"the workload failed: {self.error!r}"
        return self.changes


def position(event: dict) -> tuple[int, int, int]:
    source = event["source"]
    return parse_lsn(source["commit_lsn"]), parse_lsn(source["lsn"]), source["seq"]


def assert_each_event_once_in_order(events: list[dict], changes: int) -> None:
    positions = [position(e) for e in events]
    repeated = len(positions) - len(set(positions))
    backwards = sum(1 for a, b in zip(positions, positions[1:]) if b <= a)
    assert (len(events), repeated, backwards) == (changes, 0, 0), (
        f"{len(events)} events for {changes} changes, {repeated} repeated, {backwards} out of order")


# -- the idempotent producer -----------------------------------------------------------------------


def test_a_request_timeout_is_retried_without_a_duplicate_or_a_reordering(tmp_path, source_db, kafka_alone):
    """The broker stops answering (SIGSTOP) for longer than the request timeout: requests time out
    and are retried while the broker may already hold them. Kafka de-duplicates the retries by
    producer sequence: the connector never stops, and the topic holds each change once, in order."""
    name, path = pipeline(tmp_path, source_db, kafka_alone.bootstrap_servers, request_timeout_ms=2000)
    topic = f"{name}.public.items"
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        workload = Workload(source_db)
        workload.start()
        wait_until(lambda: len(topic_events(kafka_alone.bootstrap_servers, topic)) >= 50, process=connector,
                   what="a first 50 events")
        kafka_alone.pause(1)
        time.sleep(6)  # three request timeouts
        kafka_alone.resume(1)
        time.sleep(2)
        changes = workload.finish()
        events = wait_until(lambda: (e := topic_events(kafka_alone.bootstrap_servers, topic)) and len(e) >= changes and e,
                            process=connector, timeout=90, what=f"{changes} events")
        connector.check_alive()
        # It did meet the time-out, and said that it waits (for whichever of its topics timed out first:
        # the table's or the transactions topic).
        assert re.search(rf"Kafka has not acknowledged topic {name}\.\S+\[0\]", connector.log()), connector.log()[-3000:]
    assert_each_event_once_in_order(events, changes)


def test_a_broker_restart_mid_workload_leaves_each_event_once_in_order(tmp_path, source_db, kafka_alone):
    """The only broker is killed (SIGKILL) and started again on its data while changes keep coming:
    the producer keeps retrying, and what the broker had written before the crash is not written twice."""
    name, path = pipeline(tmp_path, source_db, kafka_alone.bootstrap_servers, request_timeout_ms=5000)
    topic = f"{name}.public.items"
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        workload = Workload(source_db)
        workload.start()
        wait_until(lambda: len(topic_events(kafka_alone.bootstrap_servers, topic)) >= 50, process=connector,
                   what="a first 50 events")
        kafka_alone.kill(1)
        time.sleep(2)
        kafka_alone.start_node(1)
        time.sleep(2)
        changes = workload.finish()
        events = wait_until(lambda: (e := topic_events(kafka_alone.bootstrap_servers, topic)) and len(e) >= changes and e,
                            process=connector, timeout=90, what=f"{changes} events")
        connector.check_alive()
    assert_each_event_once_in_order(events, changes)


# -- a leader broker killed ---------------------------------------------------------------------------


class Supervised:
    """`cdc COMMAND FILE`, restarted as a supervisor would after the exit codes that ask for it
    (1: Kafka did not acknowledge, a broker could not be reached; 3: the source connection was lost)."""

    def __init__(self, path: Path, command: str):
        self.path, self.command = path, command
        self.restarts: list[int] = []
        self.proc = CdcProcess(path, command).start()

    def check(self) -> None:
        code = self.proc.proc.poll()
        if code is None:
            return
        assert code in (1, 3), f"cdc {self.command} exited with {code}:\n{self.proc.log()[-5000:]}"
        self.restarts.append(code)
        self.proc = CdcProcess(self.path, self.command).start()  # appends to the same log

    def stop(self) -> int:
        return self.proc.stop()


def source_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, n FROM items ORDER BY id").fetchall()


def test_a_killed_leader_broker_loses_nothing_on_a_three_node_cluster(tmp_path, source_db, kafka_trio):
    name, path = pipeline(tmp_path, source_db, kafka_trio.bootstrap_servers, replication_factor=3,
                          request_timeout_ms=5000, sinks={"replica": {"url": "sqlite:///replica.db"}})
    topic, replica = f"{name}.public.items", tmp_path / "replica.db"
    connector, sink = Supervised(path, "connector"), Supervised(path, "sink")
    leader = None
    try:
        wait_for_slot(source_db, f"cdc_{name}", connector.proc)
        workload = Workload(source_db)
        workload.start()

        def applied(at_least: int) -> bool:
            connector.check()
            sink.check()
            return len(sqlite_rows(replica, "items", "id")) >= at_least

        wait_until(lambda: applied(100), timeout=60, what="100 rows in the replica")
        leader = kafka_trio.leader(topic)
        kafka_trio.kill(leader)
        more = len(sqlite_rows(replica, "items", "id")) + 100
        wait_until(lambda: applied(more), timeout=90, what="100 more rows after the leader died")
        assert kafka_trio.leader(topic) != leader
        workload.finish()
        expected = source_rows(source_db)

        def caught_up() -> bool | str:
            connector.check()
            sink.check()
            got = sqlite_rows(replica, "items", "id")
            return got == expected or f"{len(got)} rows of {len(expected)}"

        wait_until(caught_up, timeout=120, what="the replica to equal the source")
        assert connector.stop() == 0 and sink.stop() == 0
    finally:
        connector.stop()
        sink.stop()
        if leader is not None and not kafka_trio.nodes[leader].running:
            kafka_trio.start_node(leader)  # the next test gets three brokers again


def test_replication_factor_is_applied_and_one_the_cluster_cannot_meet_is_named(tmp_path, source_db, kafka_trio):
    name, path = pipeline(tmp_path, source_db, kafka_trio.bootstrap_servers, replication_factor=3)
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        (description,) = admin_call(kafka_trio.bootstrap_servers, lambda a: a.describe_topics([f"{name}.public.items"]))
        (partition,) = description["partitions"]
        assert sorted(partition["replicas"]) == [1, 2, 3]
        assert topic_configs(kafka_trio.bootstrap_servers, f"{name}.public.items")["min.insync.replicas"] == "2"

    name, path = pipeline(tmp_path, source_db, kafka_trio.bootstrap_servers, replication_factor=4)
    connector = CdcProcess(path, "connector").start()
    assert connector.proc.wait(60) == 1, connector.log()
    (line,) = [ln for ln in connector.log().splitlines() if ln.startswith("error:")]
    assert f"cannot create topic {name}.public.items:" in line
    assert "kafka.replication_factor is 4: it cannot exceed the number of brokers" in line


# -- retention ---------------------------------------------------------------------------------------


def test_retention_deleting_what_a_sink_had_not_read_stops_it_with_exit_code_4(tmp_path, source_db, broker):
    name, path = pipeline(tmp_path, source_db, broker.bootstrap_servers,
                          sinks={"replica": {"url": "sqlite:///replica.db"}})
    topic, replica = f"{name}.public.items", tmp_path / "replica.db"
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT i, 0 FROM generate_series(1, 5) i")
        with CdcProcess(path, "sink") as sink:
            wait_until(lambda: len(sqlite_rows(replica, "items", "id")) == 5, process=sink, what="5 rows applied")
        # Only now a short retention (from the start, a slow sink could find its first rows deleted):
        # segments roll every 200 ms and are deleted 2 s after their last event (checked every second).
        asyncio.run(set_topic_config(broker.bootstrap_servers, topic, {"retention.ms": "2000", "segment.ms": "200"}))
        # The sink is stopped; changes go on, and retention deletes segments it never read.
        workload = Workload(source_db, pause_s=0.1, first_id=6)
        workload.start()
        wait_until(lambda: first_offset(broker.bootstrap_servers, topic) > 6, process=connector, timeout=60,
                   what="retention to delete offsets past the sink's")
        workload.finish()

    sink = CdcProcess(path, "sink").start()
    assert sink.proc.wait(60) == 4, sink.log()
    (line,) = [ln for ln in sink.log().splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: sink {name}.replica: {topic}[0]: the sink applied up to offset 4 "), line
    assert "were deleted (retention) before the sink applied them" in line
    assert len(sqlite_rows(replica, "items", "id")) == 5  # nothing applied past the gap

    # A replay from before what the topic still holds says so, with the oldest LSN it has; it never
    # starts later quietly.
    replay = subprocess.run(
        [sys.executable, "-m", "cdc.cli", "replay", str(path), "--sink", "replica", "--from-lsn", "0/0", "--yes"],
        capture_output=True, text=True, timeout=120)
    assert replay.returncode == 4, replay.stderr
    # Retention may by now have deleted every event of the topic: then it says that instead.
    assert (f"{topic}[0]: the oldest event still held was committed at " in replay.stderr
            or f"{topic}[0]: it holds no event any more" in replay.stderr), replay.stderr
    assert "cdc snapshot" in replay.stderr
    assert len(sqlite_rows(replica, "items", "id")) == 5  # nothing applied


async def set_topic_config(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        await admin.close()


def first_offset(bootstrap: str, topic: str) -> int:
    async def ask() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            return (await consumer.beginning_offsets([tp]))[tp]
        finally:
            await consumer.stop()

    return asyncio.run(ask())


# -- topic configuration -------------------------------------------------------------------------------


def admin_call(bootstrap: str, call):
    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return await call(admin)
        finally:
            await admin.close()

    return asyncio.run(run())


def topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    (response,) = admin_call(bootstrap, lambda a: a.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]))
    ((error, _, _, _, entries),) = response.resources
    assert error == 0, response
    return {entry[0]: entry[1] for entry in entries}


def test_the_broker_reports_the_topic_config_the_yaml_gave(tmp_path, source_db, broker):
    wanted = {"cleanup.policy": "compact", "retention.ms": "86400000", "max.message.bytes": "2000000",
              "min.cleanable.dirty.ratio": "0.25", "compression.type": "zstd"}
    name, path = pipeline(tmp_path, source_db, broker.bootstrap_servers,
                          topic_config={"cleanup.policy": "compact", "retention.ms": 86400000,
                                        "max.message.bytes": 2000000, "min.cleanable.dirty.ratio": 0.25,
                                        "compression.type": "zstd"})
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
    got = topic_configs(broker.bootstrap_servers, f"{name}.public.items")
    assert {k: got[k] for k in wanted} == wanted


def test_a_new_pipeline_gets_its_table_topics_as_the_yaml_says_and_its_state_topics_compacted(
        tmp_path, source_db, broker):
    """The connector creates all its topics at once: the table and transactions topics with
    kafka.topic_config, the topics of its own state compacted (only the last record per key counts)."""
    from cdc.events import schema_changes, schema_ids
    from cdc.transform import column_bindings
    from cdc.verify.records import results_topic

    name, path = pipeline(tmp_path, source_db, broker.bootstrap_servers, topic_config={"retention.ms": 86400000})
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
    for topic in (f"{name}.public.items", f"{name}.transactions"):
        got = topic_configs(broker.bootstrap_servers, topic)
        assert (got["cleanup.policy"], got["retention.ms"]) == ("delete", "86400000"), topic
    for topic in (f"{name}.snapshots", column_bindings.topic_of(name), schema_changes.topic_of(name),
                  schema_ids.topic_of(name), results_topic(name)):
        got = topic_configs(broker.bootstrap_servers, topic)
        assert (got["cleanup.policy"], got["retention.ms"]) == ("compact", "86400000"), topic


def test_a_topic_config_the_broker_refuses_is_one_line_naming_the_key(tmp_path, source_db, broker):
    name, path = pipeline(tmp_path, source_db, broker.bootstrap_servers, topic_config={"cleanup.policy": "shred"})
    connector = CdcProcess(path, "connector").start()
    assert connector.proc.wait(60) == 1, connector.log()
    (line,) = [ln for ln in connector.log().splitlines() if ln.startswith("error:")]
    assert f"cannot create topic {name}.public.items:" in line and "check kafka.topic_config" in line, line
    assert "Traceback" not in connector.log()
