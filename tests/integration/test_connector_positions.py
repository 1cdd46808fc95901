"""Positions name changes in the WAL, whatever the pipeline captures; a stuck transaction has a way out.

Real `cdc` processes against a real source (PostgreSQL 15 and 18), the broker and a SQLite sink.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from tests.integration.harness import CdcProcess, pg_rows, sqlite_rows, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import cdc, read_topic

pytestmark = pytest.mark.integration

TWO_TABLES = """
CREATE TABLE a (id int PRIMARY KEY, body text);
CREATE TABLE b (id int PRIMARY KEY, n int);
ALTER TABLE a REPLICA IDENTITY FULL;
ALTER TABLE b REPLICA IDENTITY FULL;
"""


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"  # the broker lives for the whole session


def pipeline_file(path: Path, name: str, source_db: str, broker, tables: list[str], sinks: dict | None = None) -> Path:
    return write_pipeline(path, pipeline=name, source_dsn=source_db, tables=tables, bootstrap=broker.bootstrap_servers,
                          sinks=sinks or {}, status_interval_s=0.5)


def positions(events: list[dict]) -> list[tuple]:
    return [(e["op"], e["source"]["commit_lsn"], e["source"]["lsn"], e["source"]["seq"],
             (e["after"] or e["before"] or {}).get("id")) for e in events]


def test_the_same_wal_gets_the_same_positions_whatever_tables_a_pipeline_captures(tmp_path, source_db, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(TWO_TABLES)
    both, only_b = unique("both"), unique("onlyb")
    (tmp_path / "both").mkdir()
    (tmp_path / "onlyb").mkdir()
    both_file = pipeline_file(tmp_path / "both" / "p.yaml", both, source_db, broker, ["public.a", "public.b"])
    b_file = pipeline_file(tmp_path / "onlyb" / "p.yaml", only_b, source_db, broker, ["public.b"])
    with CdcProcess(both_file, "connector") as p1, CdcProcess(b_file, "connector") as p2:
        wait_for_slot(source_db, f"cdc_{both}", p1)
        wait_for_slot(source_db, f"cdc_{only_b}", p2)
        with psycopg.connect(source_db, autocommit=True) as conn:
            with conn.transaction():  # interleaved tables, a multi-row insert, a key change
                conn.execute("INSERT INTO a VALUES (1, 'x')")
                conn.execute("INSERT INTO b VALUES (1, 1), (2, 2), (3, 3)")
                conn.execute("INSERT INTO a VALUES (2, 'y')")
                conn.execute("UPDATE b SET id = 10 WHERE id = 1")
                conn.execute("UPDATE b SET n = 20 WHERE id = 2")
            with conn.cursor().copy("COPY b (id, n) FROM STDIN") as copy:  # COPY: one WAL record, many rows
                for i in range(100, 105):
                    copy.write_row((i, i))
            conn.execute("DELETE FROM b WHERE id = 3")
        expected = 3 + 2 + 1 + 5 + 1  # the key change is a delete and a create
        got_both = wait_until(lambda: read_topic(broker.bootstrap_servers, f"{both}.public.b", expected),
                              process=p1, what="b's events in the first pipeline")
        got_b = wait_until(lambda: read_topic(broker.bootstrap_servers, f"{only_b}.public.b", expected),
                           process=p2, what="b's events in the second pipeline")
    assert positions(got_both) == positions(got_b)
    keys = [(p[1], p[2], p[3]) for p in positions(got_b)]
    as_numbers = [tuple(int(x.replace("/", ""), 16) if isinstance(x, str) else x for x in k) for k in keys]
    assert as_numbers == sorted(as_numbers) and len(set(keys)) == len(keys), "positions strictly increase"
    copy_rows = [p for p in positions(got_b) if p[4] in range(100, 105)]
    assert len({p[2] for p in copy_rows}) == 1 and [p[3] for p in copy_rows] == [0, 1, 2, 3, 4]


def test_removing_a_failing_table_from_the_pipeline_loses_no_row_of_the_others(tmp_path, source_db, broker):
    """The reproduction: a transaction writes a and b; the connector stops on a row of a after b's
    first row reached the sink; the operator drops a from the YAML and restarts. b's second row must
    not take the position b's first one had and be skipped as already applied."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(TWO_TABLES)
    name = unique("drop")
    replica = tmp_path / "replica.db"
    # per_partition: b's first row is applied before its transaction is complete, as in the report
    # (a transactional sink would hold it until the END record, which never comes for this transaction).
    sinks = {"replica": {"url": f"sqlite:///{replica}", "apply": "per_partition"}}
    path = pipeline_file(tmp_path / "p.yaml", name, source_db, broker, ["public.a", "public.b"], sinks)
    with CdcProcess(path, "sink") as sink:
        with CdcProcess(path, "connector") as connector:
            wait_for_slot(source_db, f"cdc_{name}", connector)
            with psycopg.connect(source_db, autocommit=True) as conn, conn.transaction():
                conn.execute("INSERT INTO a VALUES (1, 'small')")
                conn.execute("INSERT INTO b VALUES (1, 1)")
                conn.execute("INSERT INTO a VALUES (2, repeat('x', 2000000))")  # too large for Kafka: refused
                conn.execute("INSERT INTO b VALUES (2, 2)")
            connector.proc.wait(30)
            assert connector.proc.returncode == 1, connector.log()
        wait_until(lambda: sqlite_rows(replica, "b", "id") == [(1, 1)], process=sink, what="b's first row applied")
        # The operator takes a out of the pipeline and restarts the connector.
        path.write_text(path.read_text().replace("  - public.a\n", ""))
        with CdcProcess(path, "connector") as connector:
            wait_until(lambda: sqlite_rows(replica, "b", "id") == [(1, 1), (2, 2)], process=connector,
                       what="b's second row applied")
            sink.check_alive()


def test_a_transaction_that_cannot_be_published_is_skipped_only_deliberately(tmp_path, source_db, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(TWO_TABLES)
    name = unique("skip")
    path = pipeline_file(tmp_path / "p.yaml", name, source_db, broker, ["public.a"])
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO a VALUES (1, repeat('x', 2000000))")
            conn.execute("INSERT INTO a VALUES (2, 'after')")
        connector.proc.wait(30)
    assert connector.proc.returncode == 1
    log = connector.log()
    assert "--skip-to-lsn" in log, log
    skip_to = log.split("--skip-to-lsn ")[1].split()[0]
    # The slot is where it was: a restart stops on the same transaction.
    assert cdc("connector", str(path), "--skip-to-lsn", "nonsense").returncode == 2
    refused = cdc("connector", str(path), "--skip-to-lsn", skip_to)  # no terminal, no --yes: refused
    assert refused.returncode == 2 and "--yes" in refused.stderr, refused.stderr
    assert cdc("connector", str(path), "--skip-to-lsn", "0/1", "--yes").returncode == 2  # behind the slot
    done = cdc("connector", str(path), "--skip-to-lsn", skip_to, "--yes")
    assert done.returncode == 0, done.stderr
    with CdcProcess(path, "connector") as connector:
        events = wait_until(lambda: read_topic(broker.bootstrap_servers, f"{name}.public.a", 1), process=connector,
                            what="the next transaction published")
    assert [e["after"]["id"] for e in events] == [2]


def test_an_update_whose_unchanged_toast_no_before_image_holds_is_published_with_unchanged_columns(
        tmp_path, source_db, broker, target_pg):
    """Replica identity changed while running: the stream must not wedge on WAL it cannot rewrite."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(TWO_TABLES)
    name = unique("toast")
    replica = tmp_path / "replica.db"
    path = pipeline_file(tmp_path / "p.yaml", name, source_db, broker, ["public.a", "public.b"],
                         {"replica": {"url": f"sqlite:///{replica}"}, "pg": {"url": target_pg}})
    with CdcProcess(path, "run") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO a VALUES (1, (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) i))")
            (body,) = conn.execute("SELECT body FROM a").fetchone()
            wait_until(lambda: sqlite_rows(replica, "a", "id") == [(1, body)], process=connector, what="the row in the sink")
            conn.execute("ALTER TABLE a REPLICA IDENTITY DEFAULT")
            conn.execute("UPDATE a SET id = 1 WHERE id = 1")  # body untouched: not resent
            conn.execute("UPDATE a SET id = 2 WHERE id = 1")  # a key change, body untouched: not resent either
            conn.execute("INSERT INTO b VALUES (1, 1)")  # the stream goes on
        events = wait_until(lambda: read_topic(broker.bootstrap_servers, f"{name}.public.a", 3),
                                    process=connector, what="the updates published")
        (_, event, moved) = events
        wait_until(lambda: read_topic(broker.bootstrap_servers, f"{name}.public.b", 1), process=connector,
                   what="later changes published")
        # The sink kept the value the stream never carried, under the row's new key.
        wait_until(lambda: sqlite_rows(replica, "a", "id") == [(2, body)], process=connector,
                   what="the moved row in the SQLite sink")
        wait_until(lambda: pg_rows(target_pg, "a", "id") == [(2, body)], process=connector,
                   what="the moved row in the PostgreSQL sink")
        connector.check_alive()
        assert "REPLICA IDENTITY FULL" in connector.log()  # the early warning
    assert event["op"] == "u" and event["unchanged"] == ["body"] and event["after"] == {"id": 1}
    # A key change that cannot carry the full row stays one update, which moves the row in a sink.
    assert (moved["op"], moved["before"], moved["after"], moved["unchanged"]) == ("u", {"id": 1}, {"id": 2}, ["body"])
