"""Privacy follows the column, not its name (issue 15, second half).

An excluded, masked or included column renamed while the connector streams keeps its fate: rows
written before and after the rename, in separate transactions and in the same one, never carry a
canary into Kafka (keys, values, headers), a sink table or cdc's output, and the rename is logged
once with the pipeline file's line to update. A restart with the old name refuses to start, also
when the old name now names a column added since; with the new name it reads changes from before
the rename correctly. A schema change the connector
cannot resolve stops it before anything of that transaction is published.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.integration.harness import CdcProcess, published_schemas, schema_of, wait_for_slot, wait_until
from tests.integration.test_privacy import pg_dump, read_all, sqlite_dump

pytestmark = pytest.mark.integration

CANARIES = ["CANARY-SSN", "CANARY-PHONE", "CANARY-SECRET", "CANARY-TOKEN", "CANARY-NOTE"]

SCHEMA = """
CREATE TABLE customers (id bigint PRIMARY KEY, ssn text, phone text, city text);
ALTER TABLE customers REPLICA IDENTITY FULL;  -- every column in the stream: the connector drops ssn
CREATE TABLE orders (id integer PRIMARY KEY, total integer, secret_note text);
CREATE TABLE accounts (id integer PRIMARY KEY, token text, score integer);  -- DEFAULT identity: a column list on 15+
"""


def privacy(ssn="ssn", phone="phone", total="total", token="token", also_excluded=()):
    return {"tables": {
        "public.customers": {"exclude": [ssn, *also_excluded], "mask": {phone: "redact"}},
        "public.orders": {"include": ["id", total]},
        "public.accounts": {"exclude": [token]},
    }}


def write(path, name, source_db, bootstrap, sinks, policy):
    path.write_text(yaml.safe_dump({
        "pipeline": name,
        "source": {"postgres": source_db, "tables": ["public.customers", "public.orders", "public.accounts"],
                   "status_interval_s": 1, "snapshot": "never"},
        "kafka": {"bootstrap_servers": bootstrap},
        "sinks": sinks,
        "privacy": policy,
    }, sort_keys=False))


def canaries_in(data: bytes | str) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    return [c for c in CANARIES if c.encode() in raw]


def assert_no_canary_in_kafka(bootstrap, name):
    records = read_all(bootstrap, [f"{name}.public.{t}" for t in ("customers", "orders", "accounts")])
    for topic, key, value, headers in records:
        for part in (key or b"", value or b"", *(v for _, v in headers)):
            assert canaries_in(part) == [], (topic, part)
    return records


def events(records, table):
    return [(json.loads(v), dict(h)) for t, _, v, h in records if t.endswith(f".{table}") and v]


def test_renamed_excluded_masked_and_included_columns_keep_their_fate(tmp_path, source_db, target_pg, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    name = f"rename_fate_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "pipeline.yaml"
    sqlite_file = tmp_path / "replica.db"
    sinks = {"pg": {"url": target_pg}, "lite": {"url": f"sqlite:///{sqlite_file.name}"}}
    write(path, name, source_db, broker.bootstrap_servers, sinks, privacy())

    def all_published(ids):
        def check():
            records = read_all(broker.bootstrap_servers, [f"{name}.public.{t}" for t in ("customers", "orders", "accounts")])
            seen = {(t.rsplit(".", 1)[1], json.loads(v)["after"]["id"]) for t, _, v, _ in records if v and json.loads(v)["after"]}
            missing = set(ids) - seen
            return f"missing {sorted(missing)}" if missing else records
        return check

    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO customers VALUES (1, 'CANARY-SSN-1', 'CANARY-PHONE-1', 'Oslo')")
            conn.execute("INSERT INTO orders VALUES (10, 100, 'CANARY-SECRET-10')")
            conn.execute("INSERT INTO accounts VALUES (100, 'CANARY-TOKEN-100', 7)")
            # Renames in their own transactions, rows after them in others.
            conn.execute("ALTER TABLE customers RENAME COLUMN ssn TO ssn_v2")
            conn.execute("INSERT INTO customers VALUES (2, 'CANARY-SSN-2', 'CANARY-PHONE-2', 'Rome')")
            conn.execute("ALTER TABLE orders RENAME COLUMN secret_note TO memo")
            conn.execute("INSERT INTO orders VALUES (11, 110, 'CANARY-SECRET-11')")
            conn.execute("ALTER TABLE accounts RENAME COLUMN token TO token_v2")
            conn.execute("INSERT INTO accounts VALUES (101, 'CANARY-TOKEN-101', 8)")
            # Rows before and after a rename in one transaction.
            with conn.transaction():
                conn.execute("INSERT INTO customers VALUES (3, 'CANARY-SSN-3', 'CANARY-PHONE-3', 'Lima')")
                conn.execute("ALTER TABLE customers RENAME COLUMN phone TO tel")
                conn.execute("INSERT INTO customers VALUES (4, 'CANARY-SSN-4', 'CANARY-PHONE-4', 'Kyiv')")
                conn.execute("UPDATE customers SET ssn_v2 = 'CANARY-SSN-1b', tel = 'CANARY-PHONE-1b' WHERE id = 1")
                conn.execute("ALTER TABLE orders RENAME COLUMN total TO amount")  # an included column
                conn.execute("INSERT INTO orders VALUES (12, 120, 'CANARY-SECRET-12')")
            # Columns added after the renames, under the renamed columns' old names: the include table
            # blocks its new column, and the exclude table excludes a new column named as excluded.
            conn.execute("ALTER TABLE orders ADD COLUMN secret_note text")
            conn.execute("INSERT INTO orders VALUES (13, 130, 'CANARY-SECRET-13', 'CANARY-SECRET-13b')")
            conn.execute("ALTER TABLE customers ADD COLUMN ssn text")
            conn.execute("INSERT INTO customers VALUES (6, 'CANARY-SSN-6', 'CANARY-PHONE-6', 'Bern', 'CANARY-SSN-6b')")
        wanted = [("customers", i) for i in (1, 2, 3, 4, 6)] + [("orders", i) for i in (10, 11, 12, 13)] + \
                 [("accounts", 100), ("accounts", 101)]
        wait_until(all_published(wanted), process=cdc, what="every row in Kafka", timeout=90)

        def sinks_hold():
            try:
                with psycopg.connect(target_pg) as pg:
                    n = pg.execute("SELECT count(*) FROM customers").fetchone()[0]
            except psycopg.errors.UndefinedTable:
                return "no customers table yet"
            return n == 5 or f"{n} customers"
        wait_until(sinks_hold, process=cdc, what="the sink to apply the rows", timeout=90)
        assert cdc.stop() == 0, cdc.log()
    first_log = cdc.log()

    records = assert_no_canary_in_kafka(broker.bootstrap_servers, name)
    assert canaries_in(sqlite_dump(sqlite_file)) == []
    assert canaries_in(pg_dump(target_pg)) == []
    assert canaries_in(first_log) == []
    # Published as the policy says, under the columns' current names; the header carries identities.
    after = {e["after"]["id"]: (e["after"], h) for e, h in events(records, "customers") if e["after"]}
    assert after[2][0] == {"id": 2, "phone": "[redacted]", "city": "Rome"}
    assert after[4][0] == {"id": 4, "tel": "[redacted]", "city": "Kyiv"}
    assert after[1][0] == {"id": 1, "tel": "[redacted]", "city": "Oslo"}
    assert after[6][0] == {"id": 6, "tel": "[redacted]", "city": "Bern"}
    header = schema_of(list(after[4][1].items()), published_schemas(broker.bootstrap_servers, name))
    assert [(c["name"], c["attnum"]) for c in header["columns"]] == [("id", 1), ("tel", 3), ("city", 4)]
    orders = {e["after"]["id"]: e["after"] for e, _ in events(records, "orders")}
    assert orders == {10: {"id": 10, "total": 100}, 11: {"id": 11, "total": 110}, 12: {"id": 12, "amount": 120},
                      13: {"id": 13, "amount": 130}}
    accounts = {e["after"]["id"]: e["after"] for e, _ in events(records, "accounts")}
    assert accounts == {100: {"id": 100, "score": 7}, 101: {"id": 101, "score": 8}}
    # Each rename of a column the pipeline file names is logged once, with the line to update.
    for old, new, key in (("ssn", "ssn_v2", "exclude"), ("phone", "tel", "mask"), ("total", "amount", "include"),
                          ("token", "token_v2", "exclude")):
        said = [line for line in first_log.splitlines() if f"column {old} of " in line and f"renamed to {new}" in line]
        assert len(said) == 1, (old, first_log)
        assert "pipeline.yaml:" in said[0] and key in said[0]

    # Stopped: a row under the new name, and one more rename the connector has not seen yet.
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO customers VALUES (5, 'CANARY-SSN-5', 'CANARY-PHONE-5', 'Baku', NULL)")
        conn.execute("ALTER TABLE customers RENAME COLUMN ssn_v2 TO ssn_v3")

    # The pipeline file still has the old names: refused at start, naming the lines, nothing published.
    # phone no longer exists; ssn now names the column added since, while the one it meant is ssn_v3.
    with CdcProcess(path, command="connector") as again:
        assert again.proc.wait(60) == 2, again.log()
    refusal = again.log()
    assert "column phone does not exist in public.customers" in refusal and "renamed" in refusal, refusal
    assert "pipeline.yaml:" in refusal and canaries_in(refusal) == []
    write(path, name, source_db, broker.bootstrap_servers, sinks, privacy(phone="tel", total="amount", token="token_v2"))
    with CdcProcess(path, command="connector") as again:
        assert again.proc.wait(60) == 2, again.log()
    refusal = again.log().split("column phone does not exist")[-1]
    assert "column ssn of public.customers was renamed to ssn_v3 since cdc last ran" in refusal, refusal
    assert "pipeline.yaml:" in refusal and canaries_in(refusal) == []

    # Updated: the change from before the last rename is read by identity.
    write(path, name, source_db, broker.bootstrap_servers, sinks,
          privacy(ssn="ssn_v3", phone="tel", total="amount", token="token_v2", also_excluded=["ssn"]))
    with CdcProcess(path, command="connector") as again:
        wait_until(all_published([("customers", 5)]), process=again, what="row 5", timeout=90)
        assert again.stop() == 0, again.log()
    records = assert_no_canary_in_kafka(broker.bootstrap_servers, name)
    assert canaries_in(again.log()) == []
    row5 = [e["after"] for e, _ in events(records, "customers") if e["after"] and e["after"]["id"] == 5]
    assert row5 == [{"id": 5, "tel": "[redacted]", "city": "Baku"}]


def several_changes_at_once(conn, note: str) -> None:
    # Renamed and added, a row, then the added column dropped and another added: when the connector
    # reads the row, the change's `note` may be the dropped column or the new one renamed, as far as
    # the catalog can tell.
    with conn.transaction():
        conn.execute("ALTER TABLE customers RENAME COLUMN ssn TO ssn_v2")
        conn.execute("ALTER TABLE customers ADD COLUMN note text")
        conn.execute("INSERT INTO customers VALUES (2, 'CANARY-SSN-2', '2', 'Rome', %s)", (note,))
        conn.execute("ALTER TABLE customers DROP COLUMN note")
        conn.execute("ALTER TABLE customers ADD COLUMN note2 text")
    conn.execute("INSERT INTO customers VALUES (3, 'CANARY-SSN-3', '3', 'Lima', 'n')")


def connector_pipeline(tmp_path, source_db, broker, *, event_trigger: bool):
    """The schema (with sql/column_identity.sql's event trigger or without), a pipeline file without
    sinks: (name, path, customers topic)."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
        if event_trigger:
            conn.execute((Path(__file__).parents[2] / "sql" / "column_identity.sql").read_text())
    name = f"rename_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "pipeline.yaml"
    write(path, name, source_db, broker.bootstrap_servers, {}, privacy())
    return name, path, f"{name}.public.customers"


def test_a_schema_change_that_cannot_be_resolved_stops_before_publishing_it(tmp_path, source_db, broker):
    name, path, topic = connector_pipeline(tmp_path, source_db, broker, event_trigger=False)
    with CdcProcess(path, command="connector") as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO customers VALUES (1, 'CANARY-SSN-1', '1', 'Oslo')")
            wait_until(lambda: len(read_all(broker.bootstrap_servers, [topic])) == 1, process=cdc, what="row 1")
            several_changes_at_once(conn, note="CANARY-NOTE-2")
        assert cdc.proc.wait(60) == 2, cdc.log()
    out = cdc.log()
    assert "cannot tell which columns of public.customers" in out, out
    assert "pipeline.yaml:" in out and canaries_in(out) == []
    records = assert_no_canary_in_kafka(broker.bootstrap_servers, name)
    assert [json.loads(v)["after"]["id"] for _, _, v, _ in records if v] == [1]

    # The way forward the message names: skip that transaction; the next one is published.
    skip = out.split("--skip-to-lsn ", 1)[1].split()[0]
    done = subprocess.run([sys.executable, "-m", "cdc.cli", "connector", str(path), "--skip-to-lsn", skip, "--yes"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    write(path, name, source_db, broker.bootstrap_servers, {}, privacy(ssn="ssn_v2"))
    with CdcProcess(path, command="connector") as cdc:
        wait_until(lambda: len(read_all(broker.bootstrap_servers, [topic])) == 2, process=cdc, what="row 3")
        assert cdc.stop() == 0, cdc.log()
    records = assert_no_canary_in_kafka(broker.bootstrap_servers, name)
    assert [json.loads(v)["after"] for _, _, v, _ in records if v][1] == {"id": 3, "phone": "[redacted]", "city": "Lima",
                                                                                   "note2": "n"}
    assert canaries_in(cdc.log()) == []


def test_with_the_event_trigger_several_changes_at_once_are_resolved(tmp_path, source_db, broker):
    name, path, topic = connector_pipeline(tmp_path, source_db, broker, event_trigger=True)
    with CdcProcess(path, command="connector") as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO customers VALUES (1, 'CANARY-SSN-1', '1', 'Oslo')")
            several_changes_at_once(conn, note="visible")
        wait_until(lambda: len(read_all(broker.bootstrap_servers, [topic])) == 3, process=cdc, what="rows 1-3")
        assert cdc.stop() == 0, cdc.log()
    assert canaries_in(cdc.log()) == []
    records = assert_no_canary_in_kafka(broker.bootstrap_servers, name)
    schemas = published_schemas(broker.bootstrap_servers, name)
    rows = [(json.loads(v)["after"], schema_of(h, schemas)) for _, _, v, h in records if v]
    assert [r for r, _ in rows] == [
        {"id": 1, "phone": "[redacted]", "city": "Oslo"},
        {"id": 2, "phone": "[redacted]", "city": "Rome", "note": "visible"},  # added to an exclude table: published
        {"id": 3, "phone": "[redacted]", "city": "Lima", "note2": "n"},
    ]
    assert [(c["name"], c["attnum"]) for c in rows[1][1]["columns"]] == [("id", 1), ("phone", 3), ("city", 4), ("note", 5)]
    assert [(c["name"], c["attnum"]) for c in rows[2][1]["columns"]] == [("id", 1), ("phone", 3), ("city", 4), ("note2", 6)]
    assert "column ssn of public.customers was renamed to ssn_v2" in cdc.log()


def test_a_row_filter_follows_a_renamed_column(tmp_path, source_db, broker):
    """`rows: "active is not false"`, then `RENAME COLUMN active TO enabled` while streaming: the
    filter keeps filtering by that column (rows in and out of it, moves across it), the rename is
    logged with the line to update, and a restart with the old name refuses to start."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE members (id integer PRIMARY KEY, active boolean, note text)")
        conn.execute("ALTER TABLE members REPLICA IDENTITY FULL")
    name = f"rowfilter_rename_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "pipeline.yaml"
    topic = f"{name}.public.members"

    def write_filter(column: str) -> None:
        path.write_text(yaml.safe_dump({
            "pipeline": name,
            "source": {"postgres": source_db, "tables": ["public.members"], "status_interval_s": 1, "snapshot": "never"},
            "kafka": {"bootstrap_servers": broker.bootstrap_servers},
            "sinks": {},
            "privacy": {"tables": {"public.members": {"rows": f"{column} is not false"}}},
        }, sort_keys=False))

    def published():
        return [(e["op"], (e["after"] or e["before"])["id"]) for e in
                (json.loads(v) for _, _, v, _ in read_all(broker.bootstrap_servers, [topic]) if v)]

    write_filter("active")
    with CdcProcess(path, command="connector") as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO members VALUES (1, true, 'in'), (2, false, 'out')")
            conn.execute("ALTER TABLE members RENAME COLUMN active TO enabled")
            conn.execute("INSERT INTO members VALUES (3, true, 'in'), (4, false, 'out')")
            conn.execute("UPDATE members SET enabled = false WHERE id = 1")  # moves out: a delete
            conn.execute("UPDATE members SET enabled = true WHERE id = 2")  # moves in: an insert
            conn.execute("UPDATE members SET note = 'still out' WHERE id = 4")  # stays out: nothing
            conn.execute("UPDATE members SET note = 'last' WHERE id = 3")
        wait_until(lambda: published()[-1:] == [("u", 3)] or str(published()), process=cdc, what="the last update")
        assert cdc.stop() == 0, cdc.log()
    assert published() == [("c", 1), ("c", 3), ("d", 1), ("c", 2), ("u", 3)]
    assert "column active of public.members was renamed to enabled; it keeps its policy (row filter)" in cdc.log()

    refused = subprocess.run([sys.executable, "-m", "cdc.cli", "connector", str(path)], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "column active" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    write_filter("enabled")
    with CdcProcess(path, command="connector") as cdc:
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO members VALUES (5, false, 'out'), (6, true, 'in')")
        wait_until(lambda: published()[-1:] == [("c", 6)] or str(published()), process=cdc, what="row 6")
        assert cdc.stop() == 0, cdc.log()
    assert published() == [("c", 1), ("c", 3), ("d", 1), ("c", 2), ("u", 3), ("c", 6)]
