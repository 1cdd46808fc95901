"""Dead letters (`on_error: dlq`, docs/sinks.md: Dead letters): real `cdc sink`, `cdc run` and `cdc dlq`
processes, the real broker, real PostgreSQL and SQLite targets.

The sink-only tests publish their events themselves (as in test_sink_safety), so each controls
exactly what the sink sees; the end-to-end test runs a source on PostgreSQL 15 and 18.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.schema import HEADER as SCHEMA_HEADER
from tests.integration.harness import CdcProcess, pg_rows, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_sink_safety import ORIGIN_A, Pipeline, change

pytestmark = pytest.mark.integration

CHECKED_ITEMS = "CREATE TABLE items (id integer PRIMARY KEY, name text CHECK (length(name) < 10), notes text)"


@pytest.fixture(params=["sqlite", "postgres"])
def target_url(request, tmp_path):
    if request.param == "sqlite":
        return "sqlite:///replica.db"  # relative to the YAML file's directory
    return request.getfixturevalue("target_pg")


class DlqPipeline(Pipeline):
    """test_sink_safety's pipeline of one table, with `on_error` set, and the `cdc dlq` commands."""

    def __init__(self, tmp_path: Path, bootstrap: str, url: str, on_error: str = "dlq"):
        super().__init__(tmp_path, bootstrap, url)
        write_pipeline(self.file, pipeline=self.name, bootstrap=bootstrap,
                       source_dsn="postgresql://nobody@127.0.0.1:1/unused", tables=["public.items"],
                       sinks={"replica": {"url": url, "on_error": on_error}})
        self.dlq_topic = f"{self.name}.replica.dlq"

    def target_sql(self, *statements: str) -> None:
        """Change the target by hand, as its owner would."""
        if self.sqlite_path is not None:
            with closing(sqlite3.connect(self.sqlite_path)) as conn:
                conn.executescript(";".join(statements))
            return
        with psycopg.connect(self.url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def drop_check(self) -> None:
        """The fix: the target no longer refuses the name (SQLite cannot drop a CHECK: rebuild)."""
        if self.sqlite_path is None:
            self.target_sql("ALTER TABLE items DROP CONSTRAINT items_name_check")
        else:
            self.target_sql("CREATE TABLE items_new (id integer PRIMARY KEY, name text, notes text)",
                            "INSERT INTO items_new SELECT * FROM items", "DROP TABLE items",
                            "ALTER TABLE items_new RENAME TO items")

    def dlq(self, *args: str, log: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "cdc.cli", "dlq", str(self.file), "--sink", "replica", *args],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        self.file.with_suffix(f".{log}.log").write_text(out.stdout + out.stderr)
        return out

    def listed(self) -> list[dict]:
        out = self.dlq("list", "--json", log="list")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["dead_letters"]

    def dlq_records(self) -> list:
        """Every record of the DLQ topic, as the broker holds it."""

        async def read() -> list:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.config.kafka.bootstrap_servers,
                                        enable_auto_commit=False, auto_offset_reset="earliest")
            await consumer.start()
            try:
                tp = TopicPartition(self.dlq_topic, 0)
                consumer.assign([tp])
                end = (await consumer.end_offsets([tp]))[tp]
                records: list = []
                while len(records) < end:
                    records.extend((await consumer.getmany(tp, timeout_ms=1000)).get(tp, []))
                return records
            finally:
                await consumer.stop()

        return asyncio.run(read())


def test_a_rejected_change_waits_in_the_dlq_with_its_key_until_retried(tmp_path, broker, target_url):
    """The contract's poison event: the change the target refuses (a CHECK added by hand) goes to
    the DLQ with its reason and origin; the later changes of its key wait behind it, also across a
    restart, while other keys are applied; `cdc dlq retry` applies them once the target is fixed."""
    p = DlqPipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.target_sql(CHECKED_ITEMS)
    p.publish([change(1, 0x1000, name="a"), change(2, 0x1100, name="too-long-private"), change(3, 0x1200, name="c")])
    with p.sink(log="first") as sink:
        wait_until(lambda: len(p.dlq_records()) == 1, process=sink, what="key 2 in the DLQ")
        # (Published after: a batch holding both would apply only the last state of the key.)
        p.publish([change(2, 0x1300, op="u", name="b2"), change(4, 0x1400, name="d")])
        wait_until(lambda: [r[0] for r in p.rows()] == [1, 3, 4] and len(p.dlq_records()) == 2, process=sink,
                   what="keys 1, 3 and 4 applied, key 2 in the DLQ")
        assert p.stored()[0] == 4  # the positions moved past the dead letters
    rejected, held = p.dlq_records()
    # The original record, with its own headers and where it came from.
    assert (rejected.key, rejected.value) == change(2, 0x1100, name="too-long-private")
    headers = dict(rejected.headers)
    assert headers[SCHEMA_HEADER] and headers[ORIGIN_HEADER] == ORIGIN_A.to_json()
    assert (headers["cdc.dlq.sink"], headers["cdc.dlq.table"], headers["cdc.dlq.topic"]) == (
        b"replica", b"items", p.topic.encode())
    assert (headers["cdc.dlq.partition"], headers["cdc.dlq.offset"]) == (b"0", b"1")
    assert headers["cdc.dlq.position"].startswith(b"0/1100:")
    reason = headers["cdc.dlq.reason"].decode()
    assert 'table "items"' in reason and "check" in reason.lower() and "private" not in reason  # never the value
    assert (held.key, held.value) == change(2, 0x1300, op="u", name="b2")
    assert dict(held.headers)["cdc.dlq.reason"].startswith(b"held back")
    assert [(d["key"], d["offset"]) for d in p.listed()] == [('{"id":2}', 1), ('{"id":2}', 3)]

    # A restart keeps the hold: it comes from the DLQ topic.
    p.publish([change(2, 0x1500, op="u", name="still-too-long"), change(5, 0x1600, name="e")])
    with p.sink(log="restart") as sink:
        wait_until(lambda: [r[0] for r in p.rows()] == [1, 3, 4, 5] and len(p.dlq_records()) == 3, process=sink,
                   what="key 5 applied, key 2's third change held")
        # The target still refuses key 2's last state: nothing is applied, nothing released.
        refused = p.dlq("retry", log="retry-refused")
        assert refused.returncode == 1 and 'table "items"' in refused.stderr, refused.stderr
        assert len(p.listed()) == 3 and 2 not in [r[0] for r in p.rows()]

        p.drop_check()
        retried = p.dlq("retry", log="retry")  # while the sink runs
        assert retried.returncode == 0, retried.stderr
        assert "3 dead letters applied, 1 keys released" in retried.stdout
        assert p.rows() == [(1, "a", "long text"), (2, "still-too-long", "long text"), (3, "c", "long text"),
                            (4, "d", "long text"), (5, "e", "long text")]
        assert p.listed() == []
        # Released in the running sink too: key 2's next change is applied directly.
        p.publish([change(2, 0x1700, op="u", name="b4")])
        wait_until(lambda: (2, "b4", "long text") in p.rows(), process=sink, what="key 2 applied again")
    assert len(p.dlq_records()) == 4  # the three dead letters and their release


def test_refused_records_among_many_are_found_and_only_they_are_dead_lettered(tmp_path, broker, target_url):
    """A backlog read in large batches: the batches holding a refused record are bisected until the
    refused ones are alone; every other row is applied."""
    p = DlqPipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.target_sql(CHECKED_ITEMS)
    refused = {57, 58, 230}
    p.publish([change(i, 0x1000 + 0x10 * i, name="too-long-private" if i in refused else f"n{i}")
               for i in range(1, 301)])
    with p.sink(log="sink") as sink:
        wait_until(lambda: len(p.rows()) == 297 and len(p.dlq_records()) == 3, process=sink,
                   what="297 rows applied, 3 in the DLQ")
        assert p.stored()[0] == 299
    assert sorted(json.loads(d["key"])["id"] for d in p.listed()) == sorted(refused)
    assert [r[0] for r in p.rows()] == [i for i in range(1, 301) if i not in refused]


def test_skip_drops_dead_letters_deliberately_and_releases_the_key(tmp_path, broker, target_url):
    p = DlqPipeline(tmp_path, broker.bootstrap_servers, target_url)
    # 2**63 fits no 64-bit integer column: refused before the target is touched (SQLite), or by
    # PostgreSQL with a data exception (class 22).
    out_of_range = change(2, 0x1100)[1].replace(b'"id": 2', b'"id": 9223372036854775808')
    p.publish([change(1, 0x1000), (b'{"id": 2}', out_of_range), change(3, 0x1200)])
    with p.sink(log="first") as sink:
        wait_until(lambda: [r[0] for r in p.rows()] == [1, 3] and len(p.dlq_records()) == 1, process=sink,
                   what="the out-of-range key in the DLQ")
    (letter,) = p.listed()
    assert letter["table"] == "items" and 'column "id"' in letter["reason"]
    refused = p.dlq("skip", log="skip-no-yes")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert p.dlq("skip", "--key", '{"id": 7}', "--yes", log="skip-unknown").returncode == 2
    skipped = p.dlq("skip", "--key", '{"id": 2}', "--yes", log="skip")
    assert skipped.returncode == 0 and "1 dead letters skipped, 1 keys released" in skipped.stdout, skipped.stderr
    assert p.listed() == []
    p.publish([change(2, 0x1300, name="later")])
    with p.sink(log="after") as sink:
        wait_until(lambda: [r[0] for r in p.rows()] == [1, 2, 3], process=sink, what="key 2's next change applied")


def test_a_record_that_is_no_event_goes_to_the_dlq_and_can_only_be_skipped(tmp_path, broker, target_url):
    p = DlqPipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.publish([change(1, 0x1000), (b'{"id": 2}', b"{not json"), change(3, 0x1200)])
    with p.sink(log="first") as sink:
        wait_until(lambda: [r[0] for r in p.rows()] == [1, 3] and len(p.dlq_records()) == 1, process=sink,
                   what="the record in the DLQ, the events around it applied")
    (record,) = p.dlq_records()
    assert record.value == b"{not json"
    assert "not a cdc change event" in dict(record.headers)["cdc.dlq.reason"].decode()
    # A restart reads it again (no position stands on it) and does not write it twice.
    p.publish([change(4, 0x1300)])
    with p.sink(log="restart") as sink:
        wait_until(lambda: [r[0] for r in p.rows()] == [1, 3, 4], process=sink, what="the next event")
    assert len(p.dlq_records()) == 1
    retry = p.dlq("retry", log="retry")
    assert retry.returncode == 2 and "skip --key" in retry.stderr
    assert p.dlq("skip", "--yes", log="skip").returncode == 0
    assert p.listed() == []


def test_a_crash_right_after_a_dead_letter_is_written_neither_loses_nor_repeats_it(tmp_path, broker, target_url,
                                                                                 monkeypatch):
    """Crash point dlq.written: the dead letter is in its topic, the sink's position not yet past it.
    The restart finds it there (the topic is the record of what was written): one dead letter, its
    key still held, every other change applied."""
    p = DlqPipeline(tmp_path, broker.bootstrap_servers, target_url)
    p.target_sql(CHECKED_ITEMS)
    p.publish([change(1, 0x1000, name="a"), change(2, 0x1100, name="too-long-private")])
    monkeypatch.setenv("CDC_FAILPOINT", "dlq.written")
    crashed = p.sink(log="crash").start()
    assert crashed.exit_code(timeout=120) == -signal.SIGKILL, crashed.log()
    assert len(p.dlq_records()) == 1
    stored = p.stored()
    assert stored is None or stored[0] < 1  # the position did not move past the dead letter (offset 1)
    monkeypatch.delenv("CDC_FAILPOINT")
    p.publish([change(2, 0x1200, op="u", name="b2"), change(3, 0x1300, name="c")])
    with p.sink(log="restart") as sink:
        wait_until(lambda: [r[0] for r in p.rows()] == [1, 3] and len(p.dlq_records()) == 2, process=sink,
                   what="keys 1 and 3 applied, key 2's two changes in the DLQ")
    assert [(d["key"], d["offset"]) for d in p.listed()] == [('{"id":2}', 1), ('{"id":2}', 2)]


def test_halt_stays_the_default(tmp_path, broker, target_pg):
    p = DlqPipeline(tmp_path, broker.bootstrap_servers, target_pg, on_error="halt")
    p.target_sql(CHECKED_ITEMS)
    p.publish([change(1, 0x1000), change(2, 0x1100, name="too-long-private")])
    proc = p.sink().start()
    assert proc.exit_code() == 1
    (line,) = proc.error_lines()
    assert line.startswith(f'error: sink {p.consumer}: table "items"') and "check" in line.lower()
    assert p.rows() == [] and p.listed() == []  # the batch that held it, rolled back


def test_a_lost_target_connection_is_retried_not_dead_lettered(tmp_path, broker, target_pg):
    p = DlqPipeline(tmp_path, broker.bootstrap_servers, target_pg)
    p.publish([change(1, 0x1000)])
    with p.sink(log="first") as sink:
        wait_until(lambda: len(p.rows()) == 1, process=sink, what="the first row")
        with psycopg.connect(target_pg, autocommit=True) as conn:
            ended = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert ended >= 1
        p.publish([change(i, 0x1000 + 0x100 * i) for i in range(2, 6)])
        wait_until(lambda: len(p.rows()) == 5, process=sink, what="every row after the reconnect")
    assert "available again" in sink.log()
    assert p.listed() == []


# -- end to end, from a source on PostgreSQL 15 and 18 ----------------------------------------------


def test_a_poison_change_under_run_is_dead_lettered_and_retried_until_the_target_equals_the_source(
        tmp_path, source_cluster, source_db, broker, target_pg):
    name = f"d_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, qty int)")
    with psycopg.connect(target_pg, autocommit=True) as conn:  # the target's owner allows less than the source
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, qty integer CHECK (qty < 100))")
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.items"],
                          bootstrap=broker.bootstrap_servers, status_interval_s=0.5,
                          sinks={"replica": {"url": target_pg, "on_error": "dlq"}})

    def source() -> list[tuple]:
        return pg_rows(source_db, "items", "id")

    def dlq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cdc.cli", "dlq", str(path), "--sink", "replica", *args],
                              capture_output=True, text=True, timeout=120)

    def dead_letters() -> int:
        return len(json.loads(dlq("list", "--json").stdout)["dead_letters"])

    with CdcProcess(path, "run") as run:
        wait_for_slot(source_db, f"cdc_{name}", run)
        with psycopg.connect(source_db, autocommit=True) as conn:
            for i in range(1, 6):
                conn.execute("INSERT INTO items VALUES (%s, %s)", (i, i))
            conn.execute("UPDATE items SET qty = 500 WHERE id = 2")  # refused by the target
        wait_until(lambda: pg_rows(target_pg, "items", "id") == [(i, i) for i in range(1, 6)] and dead_letters() == 1,
                   process=run, what="the refused change in the DLQ")
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("UPDATE items SET qty = 7 WHERE id = 2")  # would pass, but waits behind it
            conn.execute("INSERT INTO items VALUES (6, 6)")
            conn.execute("UPDATE items SET qty = 30 WHERE id = 3")
        wait_until(lambda: pg_rows(target_pg, "items", "id") == [(1, 1), (2, 2), (3, 30), (4, 4), (5, 5), (6, 6)]
                   and dead_letters() == 2, process=run, what="every key but 2 up to date, 2 held back")
        listed = dlq("list")
        assert listed.returncode == 0
        assert listed.stdout.startswith(f"sink {name}.replica: 2 dead letters, 1 keys held back")
        with psycopg.connect(target_pg, autocommit=True) as conn:
            conn.execute("ALTER TABLE items DROP CONSTRAINT items_qty_check")
        retried = dlq("retry")  # while cdc run goes on
        assert retried.returncode == 0, retried.stderr
        assert pg_rows(target_pg, "items", "id") == source()
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("UPDATE items SET qty = 8 WHERE id = 2")  # released: applied directly
        wait_until(lambda: pg_rows(target_pg, "items", "id") == source(), process=run, what="key 2's next change")
    assert dead_letters() == 0
    assert pg_rows(target_pg, "items", "id") == source()


def test_a_transactional_sink_dead_letters_the_whole_source_transaction(
        tmp_path, source_cluster, source_db, broker, target_pg):
    """`apply: transactional`: the target never holds part of a source transaction. One refused line
    sends its order along to the DLQ; a later change of that order waits behind them; `retry`
    applies them once the target is fixed."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
        conn.execute("CREATE TABLE lines (id int PRIMARY KEY, order_id int, qty int)")
    with psycopg.connect(target_pg, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id integer PRIMARY KEY, note text)")
        conn.execute("CREATE TABLE lines (id integer PRIMARY KEY, order_id integer, qty integer CHECK (qty < 100))")
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db,
                          tables=["public.orders", "public.lines"], bootstrap=broker.bootstrap_servers,
                          status_interval_s=0.5, sinks={"replica": {"url": target_pg, "on_error": "dlq"}})

    def order(conn: psycopg.Connection, i: int, qty: int) -> None:
        with conn.transaction():
            conn.execute("INSERT INTO orders VALUES (%s, 'new')", (i,))
            conn.execute("INSERT INTO lines VALUES (%s, %s, %s)", (i, i, qty))

    def dead_letters() -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "cdc.cli", "dlq", str(path), "--sink", "replica", "list", "--json"],
                             capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout)["dead_letters"]

    def target() -> tuple[list, list]:
        return pg_rows(target_pg, "orders", "id"), pg_rows(target_pg, "lines", "id")

    with CdcProcess(path, "run") as run:
        wait_for_slot(source_db, f"cdc_{name}", run)
        with psycopg.connect(source_db) as conn:
            order(conn, 1, 1)
            order(conn, 2, 500)  # its line is refused: the order goes to the DLQ with it
        wait_until(lambda: target() == ([(1, "new")], [(1, 1, 1)]) and len(dead_letters()) == 2, process=run,
                   what="order 1 applied, order 2 in the DLQ whole")
        with psycopg.connect(source_db) as conn:
            order(conn, 3, 3)
            conn.execute("UPDATE orders SET note = 'paid' WHERE id = 2")  # waits behind order 2's insert
            conn.commit()
        wait_until(lambda: target() == ([(1, "new"), (3, "new")], [(1, 1, 1), (3, 3, 3)])
                   and len(dead_letters()) == 3, process=run, what="order 3 applied, order 2's update held")
    letters = dead_letters()
    # The whole transaction, each of its events with the target's reason; then the held update.
    assert {d["table"] for d in letters[:2]} == {"orders", "lines"}
    assert all('table "lines"' in d["reason"] and "check" in d["reason"] for d in letters[:2])
    assert (letters[2]["table"], letters[2]["key"]) == ("orders", '{"id":2}')
    assert letters[2]["reason"].startswith("held back")
    with psycopg.connect(target_pg, autocommit=True) as conn:
        conn.execute("ALTER TABLE lines DROP CONSTRAINT lines_qty_check")
    out = subprocess.run([sys.executable, "-m", "cdc.cli", "dlq", str(path), "--sink", "replica", "retry"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert target() == (pg_rows(source_db, "orders", "id"), pg_rows(source_db, "lines", "id"))
