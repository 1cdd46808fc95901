"""Whole source transactions downstream: END records on the transactions topic, and sinks with
`apply: transactional` whose readers never see part of a source transaction, across a SIGKILL."""

from __future__ import annotations

import random
import threading
import uuid

import psycopg
import pytest

from tests.integration.harness import (CdcProcess, pg_rows, sqlite_rows, wait_for_confirmed, wait_for_initial_snapshot,
                                      wait_for_slot, wait_until, write_pipeline)
from tests.integration.test_cli import read_topic

pytestmark = pytest.mark.integration

ACCOUNTS = 20
OPENING = 1000  # every account's balance before the first transfer

SCHEMA = f"""
CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE ledger (id integer PRIMARY KEY, account_id integer NOT NULL, amount bigint NOT NULL);
CREATE TABLE orders (id integer PRIMARY KEY, customer integer NOT NULL, line_count integer NOT NULL);
CREATE TABLE order_lines (order_id integer, line_no integer, sku integer NOT NULL, qty integer NOT NULL,
                          PRIMARY KEY (order_id, line_no));
INSERT INTO accounts SELECT g, {OPENING} FROM generate_series(1, {ACCOUNTS}) g;
"""
TABLES = ["public.accounts", "public.ledger", "public.orders", "public.order_lines"]
ORDER_BY = {"accounts": "id", "ledger": "id", "orders": "id", "order_lines": "order_id, line_no"}

# What a reader of the replica relies on: money moves between accounts, never appears or vanishes;
# every balance is its opening balance plus its ledger entries; an order comes with all its lines.
TOTAL = "SELECT sum(balance) FROM accounts"
UNBALANCED = f"""
SELECT count(*) FROM accounts a
WHERE a.balance <> {OPENING} + coalesce((SELECT sum(amount) FROM ledger l WHERE l.account_id = a.id), 0)
"""
INCOMPLETE_ORDERS = """
SELECT (SELECT count(*) FROM orders o
        WHERE o.line_count <> (SELECT count(*) FROM order_lines l WHERE l.order_id = o.id))
     + (SELECT count(*) FROM order_lines l WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = l.order_id))
"""


def business(dsn: str, first_id: int, count: int, rng: random.Random) -> int:
    """`count` source transactions over several tables, each either a transfer (two account rows and
    two ledger entries) or an order with 2 to 6 lines; returns the next id to use."""
    next_id = first_id
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(count):
            with conn.transaction():
                if i % 2 == 0:
                    lines = rng.randint(2, 6)
                    conn.execute("INSERT INTO orders VALUES (%s, %s, %s)", (next_id, rng.randint(1, 9), lines))
                    for line in range(1, lines + 1):
                        conn.execute("INSERT INTO order_lines VALUES (%s, %s, %s, %s)",
                                     (next_id, line, rng.randint(1, 99), rng.randint(1, 5)))
                else:
                    a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
                    amount = rng.randint(1, 50)
                    conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
                    conn.execute("INSERT INTO ledger VALUES (%s, %s, %s)", (next_id, a, -amount))
                    conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
                    conn.execute("INSERT INTO ledger VALUES (%s, %s, %s)", (next_id + 1, b, amount))
            next_id += 2
    return next_id


class Reader(threading.Thread):
    """Polls the PostgreSQL replica every 10 ms, as a downstream service would, and keeps every
    inconsistent view it saw."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.views = 0
        self.broken: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    while not self.stop.wait(0.01):
                        with conn.transaction():
                            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                            (total,) = conn.execute(TOTAL).fetchone()
                            (unbalanced,) = conn.execute(UNBALANCED).fetchone()
                            (incomplete,) = conn.execute(INCOMPLETE_ORDERS).fetchone()
                        if total is not None:
                            self.views += 1
                            if total != OPENING * ACCOUNTS or unbalanced or incomplete:
                                self.broken.append(
                                    f"total {total}, {unbalanced} unbalanced accounts, {incomplete} incomplete orders")
            except psycopg.errors.UndefinedTable:  # the sink creates the tables from their first events
                self.stop.wait(0.05)


def target_rows(dsn: str, table: str) -> list[tuple]:
    """The rows of a sink's table, none before the sink created it."""
    try:
        return pg_rows(dsn, table, ORDER_BY.get(table, "id"))
    except psycopg.errors.UndefinedTable:
        return []


def same_rows(source_dsn: str, target_dsn: str) -> bool | str:
    for table, order_by in ORDER_BY.items():
        ours, theirs = pg_rows(source_dsn, table, order_by), target_rows(target_dsn, table)
        if ours != theirs:
            return f"{table}: {len(theirs)} rows in the sink, {len(ours)} in the source, or values differ"
    return True


def same_rows_sqlite(source_dsn: str, path) -> bool | str:
    for table, order_by in ORDER_BY.items():
        ours, theirs = pg_rows(source_dsn, table, order_by), sqlite_rows(path, table, order_by)
        if ours != theirs:
            return f"{table}: {len(theirs)} rows in the SQLite sink, {len(ours)} in the source, or values differ"
    return True


def make_pipeline(tmp_path, source_db, broker, sinks: dict) -> tuple:
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    name = f"txn_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(
        tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db, tables=TABLES,
        bootstrap=broker.bootstrap_servers, sinks=sinks,
        snapshot="initial",  # the opening balances arrive by the initial snapshot
    )
    return path, name


@pytest.fixture
def pipeline(tmp_path, source_db, target_pg, broker):
    sqlite_file = tmp_path / "replica.db"
    path, name = make_pipeline(tmp_path, source_db, broker, sinks={
        # batch_size 1: each target transaction takes as little as the sink may, one source transaction.
        # No `apply`: a sink of several tables applies whole transactions by default.
        "pg": {"url": target_pg, "batch_size": 1},
        "lite": {"url": f"sqlite:///{sqlite_file.name}", "batch_size": 3},
    })
    return path, name, source_db, target_pg, sqlite_file


def test_readers_of_a_transactional_sink_never_see_part_of_a_source_transaction(pipeline, broker):
    path, name, source_dsn, target_dsn, sqlite_file = pipeline
    rng = random.Random(7)
    reader = Reader(target_dsn)
    reader.start()
    try:
        cdc = CdcProcess(path).start()
        wait_for_slot(source_dsn, f"cdc_{name}", cdc)
        # The initial snapshot first: it makes the accounts appear, consistent once it is complete.
        wait_until(lambda: len(target_rows(target_dsn, "accounts")) == ACCOUNTS, process=cdc,
                   what="the replica to show the accounts")
        next_id = business(source_dsn, 1, 60, rng)
        # Killed while it applies: the restarted connector publishes again what Kafka had but the
        # slot had not confirmed, and the sinks resume from their stored offsets.
        cdc.kill()
        next_id = business(source_dsn, next_id, 30, rng)
        with CdcProcess(path) as cdc:
            business(source_dsn, next_id, 60, rng)
            wait_until(lambda: same_rows(source_dsn, target_dsn), process=cdc, what="the PostgreSQL sink to equal the source")
            wait_until(lambda: same_rows_sqlite(source_dsn, sqlite_file), process=cdc,
                       what="the SQLite sink to equal the source")
            assert cdc.stop() == 0, cdc.log()
    finally:
        reader.stop.set()
        reader.join(10)
    assert reader.views > 10
    assert reader.broken == []


def test_readers_of_a_per_partition_sink_see_parts_of_source_transactions(tmp_path, source_db, target_pg, broker):
    """Why `apply: transactional` exists: the same workload through `apply: per_partition`, the
    mode that applies each topic partition as soon as it arrives, shows readers half-applied
    transactions. The count is printed (`pytest -rP` shows it), and the target still ends equal."""
    path, name = make_pipeline(tmp_path, source_db, broker, sinks={
        # batch_size 1: every event is a target transaction of its own, as a sink that keeps up with
        # a live stream applies them; the backlog lets the reader poll while they are applied
        "pg": {"url": target_pg, "apply": "per_partition", "batch_size": 1},
    })
    rng = random.Random(11)
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        business(source_db, 1, 400, rng)
        # Everything is in Kafka before the connector stops: the opening balances (the initial
        # snapshot) and every transaction committed.
        wait_for_initial_snapshot(connector)
        wait_for_confirmed(source_db, f"cdc_{name}", connector)
    # The backlog, applied while a reader polls.
    reader = Reader(target_pg)
    reader.start()
    try:
        with CdcProcess(path, "sink") as sink:
            wait_until(lambda: same_rows(source_db, target_pg), process=sink, timeout=120,
                       what="the PostgreSQL sink to equal the source")
    finally:
        reader.stop.set()
        reader.join(10)
    print(f"per_partition: {len(reader.broken)} of {reader.views} polls saw part of a source transaction")
    assert reader.views > 10
    assert reader.broken, f"no partial view in {reader.views} polls of a per_partition sink"


def test_every_transaction_is_closed_by_an_end_record_that_counts_its_events_per_topic(pipeline, broker):
    path, name, source_dsn, _, _ = pipeline
    with CdcProcess(path, "connector") as cdc:
        wait_for_slot(source_dsn, f"cdc_{name}", cdc)
        with psycopg.connect(source_dsn) as conn:
            (xid,) = conn.execute("SELECT txid_current()").fetchone()
            conn.execute("UPDATE accounts SET balance = balance - 5 WHERE id IN (1, 2)")
            conn.execute("INSERT INTO ledger VALUES (1, 1, -5), (2, 2, -5), (3, 3, 10)")
            conn.execute("UPDATE accounts SET balance = balance + 10 WHERE id = 3")
            conn.commit()
        ends = wait_until(
            lambda: [e for e in read_topic(broker.bootstrap_servers, f"{name}.transactions", 1) or [] if e["source"]["txid"] == xid],
            process=cdc, what="the transfer's END record",
        )
        # The initial snapshot runs beside the transfer and may read the ledger after its commit:
        # those rows come again as `r` events of the snapshot's own window, not of this transaction.
        def streamed_ledger() -> list[dict] | None:
            events = [e for e in read_topic(broker.bootstrap_servers, f"{name}.public.ledger", 3) or [] if e["op"] != "r"]
            return events if len(events) >= 3 else None

        ledger = wait_until(streamed_ledger, process=cdc, what="the ledger events")
    [end] = ends
    assert end["status"] == "END"
    assert end["event_count"] == 6
    assert end["topics"] == {f"{name}.public.accounts": 3, f"{name}.public.ledger": 3}
    # The END record names the transaction as its events do.
    assert [e["op"] for e in ledger] == ["c", "c", "c"]
    assert {e["source"]["commit_lsn"] for e in ledger} == {end["source"]["commit_lsn"]}
    assert end["source"]["lsn"] == end["source"]["commit_lsn"] and end["source"]["seq"] == 0


LIMIT = 50  # max_transaction_events of the sinks below: small, so transactions past it are quick to make


class Hold:
    """Makes whoever writes rows matching `condition` into a target table wait for a lock this test
    holds (a trigger): a deterministic place to kill a sink or a replay part-way."""

    LOCK = 4242

    def __init__(self, dsn: str, table: str, condition: str):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.table = table
        self.conn.execute(f"""
            CREATE FUNCTION wait_for_test() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF {condition} THEN PERFORM pg_advisory_xact_lock_shared({self.LOCK}); END IF; RETURN NEW; END $$;
            CREATE TRIGGER wait_for_test BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION wait_for_test();
            SELECT pg_advisory_lock({self.LOCK});
        """)

    def wait_for_writer(self, process=None) -> None:
        def waiting() -> bool:
            (count,) = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                         " AND wait_event_type = 'Lock' AND wait_event = 'advisory'").fetchone()
            return count == 1

        wait_until(waiting, process=process, what=f"a writer of {self.table} waiting")

    def release(self) -> None:
        self.conn.execute(f"DROP TRIGGER wait_for_test ON {self.table}; DROP FUNCTION wait_for_test()")
        self.conn.execute(f"SELECT pg_advisory_unlock({self.LOCK})")
        self.conn.close()


def test_transactions_larger_than_max_transaction_events_complete_across_a_sigkill_between_pieces(
        tmp_path, source_db, target_pg, broker):
    """One INSERT of 10x the limit into one table of a two-table sink (after one of 1.5x into the
    other), the sink killed while it applies the pieces: after a restart the target equals the
    source, with no later commit to push the tail along, and the transaction's END record is never
    stored before all its rows are (it counted as applied once the first piece was, and the tail
    stayed missing)."""
    from cdc.sink.backends import open_target

    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE big (id integer PRIMARY KEY); CREATE TABLE small (id integer PRIMARY KEY)")
    name = f"big_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db,
                          tables=["public.big", "public.small"], bootstrap=broker.bootstrap_servers,
                          sinks={"pg": {"url": target_pg, "max_transaction_events": LIMIT, "batch_size": 20}})
    open_target(target_pg).close()  # the positions table, to watch
    with psycopg.connect(target_pg, autocommit=True) as conn:
        # Every END record stored is noted with the rows `big` has then, in the same transaction.
        conn.execute(f"""
            CREATE TABLE big (id integer PRIMARY KEY);
            CREATE TABLE ends_stored (commit_lsn pg_lsn, big_rows bigint);
            CREATE FUNCTION note_end() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.topic = '{name}.transactions' THEN
                INSERT INTO ends_stored SELECT NEW.commit_lsn::pg_lsn, count(*) FROM big;
              END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER note_end AFTER INSERT OR UPDATE ON cdc_sink_positions FOR EACH ROW EXECUTE FUNCTION note_end();
        """)
    hold = Hold(target_pg, "big", f"NEW.id > {LIMIT * 2}")
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"INSERT INTO small SELECT generate_series(1, {LIMIT * 3 // 2})")
            conn.execute(f"INSERT INTO big SELECT generate_series(1, {LIMIT * 10})")
        sink = CdcProcess(path, "sink").start()
        hold.wait_for_writer(sink)
        assert 0 < len(target_rows(target_pg, "big")) <= LIMIT * 2  # pieces are applied, not all of it
        sink.kill()
        hold.release()
        with CdcProcess(path, "sink") as sink:
            for table in ("big", "small"):
                wait_until(lambda: pg_rows(source_db, table, "id") == target_rows(target_pg, table), process=sink,
                           what=f"the sink's {table} to equal the source's")
            assert sink.stop() == 0, sink.log()
        assert "applying it in pieces" in sink.log()
        connector.check_alive()
    # The END record of the INSERT into `big` (the last commit) was stored with all of its rows.
    ends = pg_rows(target_pg, "ends_stored", "commit_lsn")
    assert {rows for commit, rows in ends if commit == ends[-1][0]} == {LIMIT * 10}, ends
