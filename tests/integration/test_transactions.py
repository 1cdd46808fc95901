"""Whole source transactions downstream: END records on the transactions topic, and sinks with
`apply: transactional` whose readers never see part of a source transaction, across a SIGKILL."""

from __future__ import annotations

import random
import threading
import uuid

import psycopg
import pytest

from tests.integration.harness import CdcProcess, pg_rows, sqlite_rows, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import read_topic

pytestmark = pytest.mark.integration

ACCOUNTS = 20
OPENING = 1000  # every account's balance before the first transfer

SCHEMA = f"""
CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE ledger (id integer PRIMARY KEY, account_id integer NOT NULL, amount bigint NOT NULL);
INSERT INTO accounts SELECT g, {OPENING} FROM generate_series(1, {ACCOUNTS}) g;
"""

# What a reader of the replica relies on: money moves between accounts, never appears or vanishes,
# and every balance is its opening balance plus its ledger entries.
TOTAL = "SELECT sum(balance) FROM accounts"
UNBALANCED = f"""
SELECT count(*) FROM accounts a
WHERE a.balance <> {OPENING} + coalesce((SELECT sum(amount) FROM ledger l WHERE l.account_id = a.id), 0)
"""


def transfers(dsn: str, first_id: int, count: int, rng: random.Random) -> int:
    """`count` transfers, each one source transaction over both tables; returns the next ledger id."""
    ledger_id = first_id
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(count):
            a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
            amount = rng.randint(1, 50)
            with conn.transaction():
                conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
                conn.execute("INSERT INTO ledger VALUES (%s, %s, %s)", (ledger_id, a, -amount))
                conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
                conn.execute("INSERT INTO ledger VALUES (%s, %s, %s)", (ledger_id + 1, b, amount))
            ledger_id += 2
    return ledger_id


class Reader(threading.Thread):
    """Reads the PostgreSQL replica in a loop, as a downstream service would, and keeps every
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
                    while not self.stop.is_set():
                        with conn.transaction():
                            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                            (total,) = conn.execute(TOTAL).fetchone()
                            (unbalanced,) = conn.execute(UNBALANCED).fetchone()
                        if total is not None:
                            self.views += 1
                            if total != OPENING * ACCOUNTS or unbalanced:
                                self.broken.append(f"total {total}, {unbalanced} unbalanced accounts")
            except psycopg.errors.UndefinedTable:  # the sink creates the tables from their first events
                self.stop.wait(0.05)


def sqlite_consistent(path) -> bool | str:
    balances = dict(sqlite_rows(path, "accounts", "id"))
    entries = sqlite_rows(path, "ledger", "id")
    if not balances:
        return "no accounts yet"
    moved: dict[int, int] = {}
    for _, account, amount in entries:
        moved[account] = moved.get(account, 0) + amount
    wrong = [a for a, balance in balances.items() if balance != OPENING + moved.get(a, 0)]
    return True if sum(balances.values()) == OPENING * ACCOUNTS and not wrong else f"{len(wrong)} unbalanced accounts"


def target_rows(dsn: str, table: str) -> list[tuple]:
    """The rows of a sink's table, none before the sink created it."""
    try:
        return pg_rows(dsn, table, "id")
    except psycopg.errors.UndefinedTable:
        return []


def same_rows(source_dsn: str, target_dsn: str) -> bool | str:
    for table in ("accounts", "ledger"):
        ours, theirs = pg_rows(source_dsn, table, "id"), target_rows(target_dsn, table)
        if ours != theirs:
            return f"{table}: {len(theirs)} rows in the sink, {len(ours)} in the source, or values differ"
    return True


@pytest.fixture
def pipeline(tmp_path, source_db, target_pg, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    name = f"txn_{uuid.uuid4().hex[:8]}"
    sqlite_file = tmp_path / "replica.db"
    path = write_pipeline(
        tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db,
        tables=["public.accounts", "public.ledger"], bootstrap=broker.bootstrap_servers,
        sinks={
            # batch_size 1: each target transaction takes as little as the sink may, one source transaction
            "pg": {"url": target_pg, "apply": "transactional", "batch_size": 1},
            "lite": {"url": f"sqlite:///{sqlite_file.name}", "apply": "transactional", "batch_size": 3},
        },
        snapshot="initial",  # the opening balances arrive by the initial snapshot
    )
    return path, name, source_db, target_pg, sqlite_file


def test_readers_of_a_transactional_sink_never_see_part_of_a_source_transaction(pipeline, broker):
    path, name, source_dsn, target_dsn, sqlite_file = pipeline
    rng = random.Random(7)
    reader = Reader(target_dsn)
    reader.start()
    sqlite_views: list[bool | str] = []
    try:
        cdc = CdcProcess(path).start()
        wait_for_slot(source_dsn, f"cdc_{name}", cdc)
        # The initial snapshot first: it makes the accounts appear, consistent once it is complete.
        wait_until(lambda: len(target_rows(target_dsn, "accounts")) == ACCOUNTS, process=cdc,
                   what="the replica to show the accounts")
        next_id = transfers(source_dsn, 1, 40, rng)
        # Killed while it applies: the restarted connector publishes again what Kafka had but the
        # slot had not confirmed, and the sinks resume from their stored offsets.
        cdc.kill()
        next_id = transfers(source_dsn, next_id, 20, rng)
        with CdcProcess(path) as cdc:
            next_id = transfers(source_dsn, next_id, 40, rng)
            wait_until(lambda: same_rows(source_dsn, target_dsn), process=cdc, what="the PostgreSQL sink to equal the source")
            wait_until(lambda: len(sqlite_rows(sqlite_file, "ledger", "id")) == next_id - 1, process=cdc,
                       what="every ledger entry in the SQLite sink")
            sqlite_views.append(sqlite_consistent(sqlite_file))
            assert cdc.stop() == 0, cdc.log()
    finally:
        reader.stop.set()
        reader.join(10)
    assert reader.views > 10
    assert reader.broken == []
    assert sqlite_views == [True]
    # The opening balances came by the initial snapshot, inside watermark transactions that have
    # END records of their own; so did every transfer.
    assert sqlite_rows(sqlite_file, "accounts", "id") == pg_rows(source_dsn, "accounts", "id")


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
        ledger = wait_until(lambda: [e for e in read_topic(broker.bootstrap_servers, f"{name}.public.ledger", 3) or []
                                     if e["op"] != "r"] or None, process=cdc, what="the ledger events")
    [end] = ends
    assert end["status"] == "END"
    assert end["event_count"] == 6
    assert end["topics"] == {f"{name}.public.accounts": 3, f"{name}.public.ledger": 3}
    # The END record names the transaction as its events do.
    assert [e["op"] for e in ledger] == ["c", "c", "c"]
    assert {e["source"]["commit_lsn"] for e in ledger} == {end["source"]["commit_lsn"]}
    assert end["source"]["lsn"] == end["source"]["commit_lsn"] and end["source"]["seq"] == 0
