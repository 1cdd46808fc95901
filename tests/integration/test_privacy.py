"""Privacy end to end: excluded, masked and filtered data never reaches Kafka, a sink or the log.

Canary strings sit in every column or row that must not leave; the workload inserts, updates under
REPLICA IDENTITY FULL and DEFAULT, deletes, changes a primary key, moves rows in and out of a row
filter and adds a column to an `include` table. Afterwards every Kafka record (key, value,
headers), every sink table (SQLite and PostgreSQL) and the output of `cdc run` hold none of them,
while allowed columns arrive exactly and masked ones in their documented forms.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import subprocess
import sys
import uuid

import psycopg
import pytest
import yaml

from tests.integration.harness import CdcProcess, published_schemas, schema_of, wait_for_slot, wait_until

pytestmark = pytest.mark.integration

HASH_KEY = "CANARY-HASHKEY-0123456789abcdef"
CANARIES = [
    "CANARY-SSN", "CANARY-AVATAR", "CANARY-NOTES", "CANARY-EMAIL", "CANARYPHONE", "CANARY-PREFS",
    "CANARY-SECRET", "CANARY-ADDED", "CANARY-HANDLE", "CANARY-FILTERED", "CANARY-MOVED-OUT", HASH_KEY,
]

SCHEMA = """
CREATE TABLE customers (
    id bigint PRIMARY KEY, email text, phone text, full_name text, notes text, prefs jsonb,
    ssn text, avatar bytea, active boolean, city text
);
ALTER TABLE customers REPLICA IDENTITY FULL;
-- DEFAULT identity: its only out-of-line column is not included, so the column list drops it and
-- the table needs no full row image.
CREATE TABLE orders (id integer PRIMARY KEY, customer_id bigint, total integer, created_at timestamptz,
                     secret_note text);
-- A hashed primary key, FULL identity, include list (the connector drops the rest).
CREATE TABLE members (handle text PRIMARY KEY, score integer, secret text);
ALTER TABLE members REPLICA IDENTITY FULL;
"""

PRIVACY = {
    "hash_key": "${CDC_HASH_KEY}",
    "tables": {
        "public.customers": {
            "exclude": ["ssn", "avatar"],
            "mask": {"email": "hash", "phone": {"keep_last": 4}, "full_name": {"keep_first": 1},
                     "notes": "redact", "prefs": None},
            "rows": "active is not false",
        },
        "public.orders": {"include": ["id", "customer_id", "total", "created_at"]},
        "public.members": {"include": ["handle", "score"], "mask": {"handle": "hash"}},
    },
}
TABLES = ["public.customers", "public.orders", "public.members"]


def hashed(text: str) -> str:
    return "k1:" + hmac.new(HASH_KEY.encode(), text.encode(), hashlib.sha256).hexdigest()


def write(path, source_dsn, bootstrap, sinks, privacy=PRIVACY, tables=TABLES, name=None):
    name = name or f"priv_{uuid.uuid4().hex[:8]}"
    doc = {
        "pipeline": name,
        "source": {"postgres": source_dsn, "tables": tables, "status_interval_s": 1},
        "kafka": {"bootstrap_servers": bootstrap, "idempotence": False},
        "sinks": sinks,
        "privacy": privacy,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return name


def workload(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():  # one multi-row INSERT: rows share an LSN
            conn.execute(
                """INSERT INTO customers VALUES
                   (1, 'CANARY-EMAIL-1@example.com', 'CANARYPHONE-4567', 'Ada Lovelace', 'CANARY-NOTES-1',
                    '{"k": "CANARY-PREFS"}', 'CANARY-SSN-1', 'CANARY-AVATAR-1', true, 'London'),
                   (2, 'grace@example.com', NULL, 'Grace', 'CANARY-NOTES-2', NULL, 'CANARY-SSN-2', NULL, NULL, 'Arlington'),
                   (3, 'CANARY-FILTERED-3', 'CANARY-FILTERED-3', 'CANARY-FILTERED-3', 'x', '{}', 'CANARY-SSN-3',
                    'CANARY-AVATAR-3', false, 'CANARY-FILTERED-3'),
                   (4, 'linus@example.com', '0123', 'Linus', 'n', NULL, 'CANARY-SSN-4', NULL, false, 'Helsinki')""")
            conn.execute("INSERT INTO orders VALUES (10, 1, 1999, '2026-11-26 20:00:00+00', 'CANARY-SECRET-10'),"
                         " (11, 2, 500, NULL, 'CANARY-SECRET-11')")
            conn.execute("INSERT INTO members VALUES ('CANARY-HANDLE-a', 1, 'CANARY-SECRET-a'),"
                         " ('CANARY-HANDLE-b', 2, 'CANARY-SECRET-b')")
        # Updates under FULL (customers, members) and DEFAULT (orders).
        conn.execute("UPDATE customers SET ssn = 'CANARY-SSN-1b', notes = 'CANARY-NOTES-1b', city = 'Paris' WHERE id = 1")
        conn.execute("UPDATE orders SET total = 2500, secret_note = 'CANARY-SECRET-10b' WHERE id = 10")
        conn.execute("UPDATE members SET score = 5, secret = 'CANARY-SECRET-a2' WHERE handle = 'CANARY-HANDLE-a'")
        # Into the filter (an insert with the full row), out of it (a delete), and within "out".
        conn.execute("UPDATE customers SET active = true, city = 'Espoo' WHERE id = 4")
        conn.execute("UPDATE customers SET active = false, city = 'CANARY-MOVED-OUT' WHERE id = 2")
        conn.execute("UPDATE customers SET city = 'CANARY-FILTERED-3b', ssn = 'CANARY-SSN-3b' WHERE id = 3")
        # Primary-key changes: a plain key, and a hashed one.
        conn.execute("UPDATE orders SET id = 12 WHERE id = 11")
        conn.execute("UPDATE members SET handle = 'CANARY-HANDLE-c' WHERE handle = 'CANARY-HANDLE-b'")
        # Deletes: a published row, a filtered one.
        conn.execute("DELETE FROM customers WHERE id = 3")
        conn.execute("DELETE FROM orders WHERE id = 12")
        # A column added to include tables is dropped, whatever it holds.
        conn.execute("ALTER TABLE orders ADD COLUMN added text DEFAULT 'CANARY-ADDED-default'")
        conn.execute("ALTER TABLE members ADD COLUMN added text DEFAULT 'CANARY-ADDED-default'")
        conn.execute("INSERT INTO orders VALUES (13, 1, 42, NULL, 'CANARY-SECRET-13', 'CANARY-ADDED-13')")
        conn.execute("INSERT INTO members VALUES ('d', 9, 'CANARY-SECRET-d', 'CANARY-ADDED-d')")
        conn.execute("UPDATE members SET added = 'CANARY-ADDED-a' WHERE handle = 'CANARY-HANDLE-a'")


# What the sinks must hold afterwards (column -> value), by key.
EXPECTED_CUSTOMERS = {
    1: {"id": 1, "email": hashed("CANARY-EMAIL-1@example.com"), "phone": "************4567",
        "full_name": "A" + "*" * 11, "notes": "[redacted]", "prefs": None, "active": True, "city": "Paris"},
    4: {"id": 4, "email": hashed("linus@example.com"), "phone": "0123", "full_name": "L****",
        "notes": "[redacted]", "prefs": None, "active": True, "city": "Espoo"},
}
EXPECTED_ORDERS = {10: {"id": 10, "customer_id": 1, "total": 2500}, 13: {"id": 13, "customer_id": 1, "total": 42}}
EXPECTED_MEMBERS = {hashed("CANARY-HANDLE-a"): 5, hashed("CANARY-HANDLE-c"): 2, hashed("d"): 9}


def read_all(bootstrap: str, topics: list[str]) -> list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]:
    """Every record of every topic: (topic, key, value, headers)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def read():
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(t, 0) for t in topics]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out = []
            for tp in tps:
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for m in batch.get(tp, []):
                        out.append((tp.topic, m.key, m.value, list(m.headers)))
            return out
        finally:
            await consumer.stop()

    return asyncio.run(read())


def sqlite_dump(path) -> str:
    conn = sqlite3.connect(path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def pg_dump(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()]
        return "\n".join(
            json.dumps(r[0]) for t in tables
            for r in conn.execute(f'SELECT row_to_json(x)::text FROM "{t}" x').fetchall())


def canaries_in(data: bytes | str) -> list[str]:
    raw = data.encode() if isinstance(data, str) else data
    found = []
    for canary in CANARIES:
        forms = [canary.encode(), base64.b64encode(canary.encode())[:12]]  # bytea travels as base64
        if any(f in raw for f in forms):
            found.append(canary)
    return found


def sink_rows(sqlite_file, target_pg):
    """(sqlite, postgres) rows of each table as {key: {column: value}}."""
    conn = sqlite3.connect(sqlite_file)
    conn.row_factory = sqlite3.Row
    try:
        lite = {t: {r[0]: dict(r) for r in conn.execute(f"SELECT * FROM {t}")} for t in ("customers", "orders", "members")}
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    with psycopg.connect(target_pg) as pg:
        try:
            pgrows = {}
            for t in ("customers", "orders", "members"):
                cur = pg.execute(f"SELECT * FROM {t}")
                names = [d.name for d in cur.description]
                pgrows[t] = {r[0]: dict(zip(names, r)) for r in cur.fetchall()}
        except psycopg.errors.UndefinedTable:
            return None
    return lite, pgrows


def test_canaries_never_leave_and_allowed_columns_arrive_exactly(tmp_path, source_db, target_pg, broker, monkeypatch):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    monkeypatch.setenv("CDC_HASH_KEY", HASH_KEY)
    sqlite_file = tmp_path / "replica.db"
    path = tmp_path / "pipeline.yaml"
    name = write(path, source_db, broker.bootstrap_servers,
                 {"pg": {"url": target_pg}, "lite": {"url": f"sqlite:///{sqlite_file.name}"}})

    def done():
        rows = sink_rows(sqlite_file, target_pg)
        if rows is None:
            return "sink tables not created yet"
        lite, pgrows = rows
        if set(lite["members"]) != set(EXPECTED_MEMBERS) or set(pgrows["members"]) != set(EXPECTED_MEMBERS):
            return f"members: {sorted(lite['members'])}"
        if lite["orders"].get(13) is None or pgrows["orders"].get(13) is None:
            return "order 13 not there yet"
        if set(lite["customers"]) != set(EXPECTED_CUSTOMERS) or set(pgrows["customers"]) != set(EXPECTED_CUSTOMERS):
            return f"customers: {sorted(lite['customers'])} / {sorted(pgrows['customers'])}"
        return rows

    with CdcProcess(path) as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        workload(source_db)
        lite, pgrows = wait_until(done, process=cdc, what="both sinks to apply the workload", timeout=90)
        assert cdc.stop() == 0, cdc.log()

    # Allowed columns exactly, masked ones in their documented forms, dropped columns absent.
    for rows, is_sqlite in ((lite, True), (pgrows, False)):
        for key, expected in EXPECTED_CUSTOMERS.items():
            got = rows["customers"][key]
            if is_sqlite:
                expected = {**expected, "active": 1}
            assert got == expected, (is_sqlite, got)
        for key, expected in EXPECTED_ORDERS.items():
            got = rows["orders"][key]
            assert set(got) == {"id", "customer_id", "total", "created_at"}
            assert {k: got[k] for k in expected} == expected
        created = rows["orders"][10]["created_at"]
        assert created == "2026-11-26T20:00:00Z" if is_sqlite else created.isoformat() == "2026-11-26T20:00:00+00:00"
        assert {k: r["score"] for k, r in rows["members"].items()} == EXPECTED_MEMBERS
        assert set(next(iter(rows["members"].values()))) == {"handle", "score"}
    with psycopg.connect(target_pg) as pg:
        types = dict(pg.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                                "WHERE attrelid = 'customers'::regclass AND attnum > 0 AND NOT attisdropped").fetchall())
    assert types == {"id": "bigint", "email": "text", "phone": "text", "full_name": "text", "notes": "text",
                     "prefs": "text", "active": "boolean", "city": "text"}

    # Nothing of a canary anywhere: Kafka records (keys, values, headers), sink tables, cdc's output.
    topics = [f"{name}.public.{t}" for t in ("customers", "orders", "members")]
    records = read_all(broker.bootstrap_servers, topics + [f"{name}.schemas"])
    assert len(records) >= 15
    for topic, key, value, headers in records:
        for part in (key or b"", value, *(v for _, v in headers)):
            assert canaries_in(part) == [], (topic, part)
    assert canaries_in(sqlite_dump(sqlite_file)) == []
    assert canaries_in(pg_dump(target_pg)) == []
    assert canaries_in(cdc.log()) == []

    # Row-filter semantics: 4 moved in as an insert with the full row, 2 moved out as a delete.
    # Streamed events only: the initial snapshot runs beside the workload and may read a row too (as r).
    customers = [e for e in (json.loads(v) for t, _, v, _ in records if t.endswith(".customers")) if e["op"] != "r"]
    moved_in = [e for e in customers if (e["after"] or {}).get("id") == 4]
    assert [e["op"] for e in moved_in] == ["c"] and moved_in[0]["after"] == EXPECTED_CUSTOMERS[4]
    assert [e["op"] for e in customers if (e["before"] or e["after"])["id"] == 2] == ["c", "d"]
    assert not [e for e in customers if (e["before"] or e["after"])["id"] == 3]
    # The header describes columns as published.
    header = schema_of(records[0][3], published_schemas(broker.bootstrap_servers, name))
    assert [c["name"] for c in header["columns"]] == ["id", "email", "phone", "full_name", "notes", "prefs", "active", "city"]
    assert {c["name"]: c["type"] for c in header["columns"]}["prefs"] == "text"


def _explain(path) -> dict:
    out = subprocess.run([sys.executable, "-m", "cdc.cli", "explain", str(path), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_application_writes_succeed_with_pushdown_and_explain_matches_the_publication(tmp_path, source_db, broker, monkeypatch):
    """The application's own INSERT/UPDATE/DELETE on every published table, under each replica
    identity, with the publication cdc created; and `cdc explain` says what that publication holds."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
        # DEFAULT identity with a key-only filter: both pushed down.
        conn.execute("CREATE TABLE events (id integer PRIMARY KEY, kind integer, payload text)")
    monkeypatch.setenv("CDC_HASH_KEY", HASH_KEY)
    privacy = {**PRIVACY, "tables": {**PRIVACY["tables"], "public.events": {"exclude": ["payload"], "rows": "id > 0"}}}
    path = tmp_path / "pipeline.yaml"
    name = write(path, source_db, broker.bootstrap_servers, {}, privacy, [*TABLES, "public.events"])
    with CdcProcess(path, "connector") as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            # customers and members are FULL (a non-key filter, a text key), orders and events DEFAULT.
            conn.execute("INSERT INTO customers (id, email, active) VALUES (1, 'a', true), (2, 'b', false)")
            conn.execute("UPDATE customers SET active = NOT active, city = 'x'")
            conn.execute("DELETE FROM customers")
            conn.execute("INSERT INTO orders (id, total, secret_note) VALUES (1, 2, 's')")
            conn.execute("UPDATE orders SET total = 3, id = 2")
            conn.execute("DELETE FROM orders")
            conn.execute("INSERT INTO members VALUES ('h', 1, 's')")
            conn.execute("UPDATE members SET score = 2, handle = 'i'")
            conn.execute("DELETE FROM members")
            conn.execute("INSERT INTO events VALUES (1, 1, 'p'), (-1, 1, 'q')")
            conn.execute("UPDATE events SET kind = 2, payload = 'r'")
            conn.execute("UPDATE events SET id = id * 10")
            conn.execute("DELETE FROM events")
        cdc.check_alive()
        assert cdc.stop() == 0, cdc.log()

    audit = _explain(path)
    with psycopg.connect(source_db) as conn:
        published = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT schemaname || '.' || tablename, attnames, rowfilter FROM pg_publication_tables WHERE pubname = %s",
            (f"cdc_{name}",)).fetchall()}
    assert set(published) == {t["table"] for t in audit["tables"]}
    by_table = {t["table"]: t for t in audit["tables"]}
    for table, (attnames, rowfilter) in published.items():
        entry = by_table[table]
        dropped_here = {c["name"] for c in entry["columns"] if c["fate"] == "exclude" and c["enforced"] == "publication"}
        assert set(attnames) == {c["name"] for c in entry["columns"]} - dropped_here, table
        assert (rowfilter is not None) == (entry["rows"]["enforced"] == "publication"), table
    # What was and was not pushed down, and why.
    assert by_table["public.orders"]["column_list"] == ["id", "customer_id", "total", "created_at"]
    assert by_table["public.events"]["rows"] == {"filter": "id > 0", "enforced": "publication", "publication_where": '"id" > 0'}
    assert by_table["public.customers"]["rows"]["enforced"] == "publication"  # FULL: every column is in the identity
    ssn = next(c for c in by_table["public.customers"]["columns"] if c["name"] == "ssn")
    assert ssn["fate"] == "exclude" and ssn["enforced"] == "connector" and "REPLICA IDENTITY FULL" in ssn["reason"]
    fates = {c["name"]: c["fate"] for c in by_table["public.customers"]["columns"]}
    assert fates == {"id": "pass", "email": "hash", "phone": "keep_last", "full_name": "keep_first", "notes": "redact",
                     "prefs": "null", "ssn": "exclude", "avatar": "exclude", "active": "pass", "city": "pass"}
    assert published["public.customers"][1] is not None and published["public.orders"][1] is None
    text = subprocess.run([sys.executable, "-m", "cdc.cli", "explain", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 0, text.stderr
    assert f"public.customers -> topic {name}.public.customers (replica identity full)" in text.stdout
    assert "  rows: active is not false [publication]" in text.stdout
    assert any(ln.split()[:3] == ["secret_note", "exclude", "[publication]"] for ln in text.stdout.splitlines())
    assert HASH_KEY not in text.stdout + text.stderr


def test_policy_problems_stop_the_start_with_file_and_line(tmp_path, source_db, broker, monkeypatch):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("ALTER TABLE customers REPLICA IDENTITY DEFAULT")
        conn.execute("ALTER TABLE customers DROP COLUMN notes, DROP COLUMN prefs, DROP COLUMN avatar")
    monkeypatch.setenv("CDC_HASH_KEY", HASH_KEY)
    privacy = {"hash_key": "${CDC_HASH_KEY}", "tables": {
        "public.customers": {"exclude": ["sn", "email", "phone", "full_name", "city"], "rows": "active"},
        "public.orders": {"mask": {"id": "redact", "total": {"keep_first": 1}}},
    }}
    path = tmp_path / "pipeline.yaml"
    write(path, source_db, broker.bootstrap_servers, {}, privacy, ["public.customers", "public.orders"])
    out = subprocess.run([sys.executable, "-m", "cdc.cli", "connector", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    text = "\n".join(lines)
    assert f"{path}:" in text
    assert "column sn does not exist in public.customers; did you mean 'ssn'?" in text
    # ssn is excluded in spirit but misspelt, so ssn still reaches events: still out of line under DEFAULT.
    assert "REPLICA IDENTITY FULL" in text
    assert "key column id can only be masked with hash" in text
    assert "keep_first applies to text columns; total is integer" in text
    assert HASH_KEY not in out.stderr and HASH_KEY not in out.stdout
    with psycopg.connect(source_db) as conn:  # nothing was created
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)


def test_policy_added_later_applies_to_older_wal_and_reconciles_the_publication(tmp_path, source_db, broker, monkeypatch):
    """Rows written before the policy existed are decoded with the publication as it was (every
    column): the connector still drops and masks them. The publication is reconciled at start,
    keeping a table the user added to it, and a second start changes nothing."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("CREATE TABLE extra (id integer PRIMARY KEY, body text)")
    monkeypatch.setenv("CDC_HASH_KEY", HASH_KEY)
    path = tmp_path / "pipeline.yaml"
    # orders (DEFAULT identity, an out-of-line column) can only be captured once the policy drops that column.
    name = write(path, source_db, broker.bootstrap_servers, {}, {}, ["public.customers", "public.members"])
    publication = f"cdc_{name}"
    with psycopg.connect(source_db, autocommit=True) as conn:  # the user's own publication, with one more table
        conn.execute(f"CREATE PUBLICATION {publication} FOR TABLE customers, extra")
    with CdcProcess(path, "connector") as cdc:
        wait_for_slot(source_db, publication, cdc)
        assert cdc.stop() == 0, cdc.log()
    workload(source_db)  # while the connector is stopped, before the policy exists

    write(path, source_db, broker.bootstrap_servers, {}, PRIVACY, name=name)
    topics = [f"{name}.public.{t}" for t in ("customers", "orders", "members")]
    with CdcProcess(path, "connector") as cdc:
        # (never read a topic the connector has not created: the broker would create it with its defaults)
        wait_until(lambda: len(read_all(broker.bootstrap_servers, [topics[0], topics[2]])) >= 12 or "waiting", process=cdc,
                   what="the older WAL to be published", timeout=60)
        assert cdc.stop() == 0, cdc.log()
    records = read_all(broker.bootstrap_servers, topics)
    for topic, key, value, headers in records:
        for part in (key or b"", value, *(v for _, v in headers)):
            assert canaries_in(part) == [], (topic, part)
    customers = [json.loads(v) for t, _, v, _ in records if t.endswith(".customers")]
    first = next(e for e in customers if e["op"] == "c" and e["after"]["id"] == 1)
    assert first["after"]["email"] == hashed("CANARY-EMAIL-1@example.com") and "ssn" not in first["after"]
    assert "publication cdc_" in cdc.log() and "set from the privacy policy" in cdc.log()

    with psycopg.connect(source_db) as conn:
        rows = dict(conn.execute("SELECT tablename, attnames FROM pg_publication_tables WHERE pubname = %s",
                                 (publication,)).fetchall())
    assert set(rows) == {"customers", "orders", "members", "extra"}  # the user's table stays
    assert rows["orders"] == ["id", "customer_id", "total", "created_at"]

    log_before = len(cdc.log())
    with CdcProcess(path, "connector") as again:
        wait_for_slot(source_db, publication, again)
        assert again.stop() == 0, again.log()
    assert "set from the privacy policy" not in again.log()[log_before:]


def test_a_publication_its_owner_made_to_match_is_used_as_is(tmp_path, source_db, broker, monkeypatch):
    """A role that owns nothing can run a pipeline whose publication the owner created as the policy
    says; when it stops matching, the start says what the owner should run, in one line."""
    role = f"reader_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")  # the initial snapshot reads them
    monkeypatch.setenv("CDC_HASH_KEY", HASH_KEY)
    dsn = source_db.replace("postgresql://postgres@", f"postgresql://{role}@")
    path = tmp_path / "pipeline.yaml"
    name = write(path, dsn, broker.bootstrap_servers, {})
    publication = f"cdc_{name}"
    try:
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"CREATE PUBLICATION {publication} FOR TABLE customers WHERE (active IS NOT FALSE), "
                         "orders (id, customer_id, total, created_at), members")
        with CdcProcess(path, "connector") as cdc:
            wait_for_slot(source_db, publication, cdc)
            assert cdc.stop() == 0, cdc.log()
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"ALTER PUBLICATION {publication} SET TABLE customers, orders, members")
        out = subprocess.run([sys.executable, "-m", "cdc.cli", "connector", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"role {role} may not alter it: have its owner run: ALTER PUBLICATION" in lines[0]
        assert '"public"."orders" ("id", "customer_id", "total", "created_at")' in lines[0]
        assert 'WHERE (NOT "active" IS FALSE)' in lines[0]
    finally:
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(f"DROP PUBLICATION IF EXISTS {publication}")
            conn.execute(f"DROP OWNED BY {role}")
            for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s",
                                        (publication,)).fetchall():
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute(f"DROP ROLE {role}")


def test_a_filter_the_publication_cannot_hold_runs_in_the_connector_with_the_same_semantics(tmp_path, source_db, broker):
    """A filter the publication cannot hold (FOR ALL TABLES) stays with the connector (explain says
    why), compares char(n) as PostgreSQL does (padding ignored), and updates moving rows in and out
    of it become inserts and deletes, as a publication would send them."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE moods (id integer PRIMARY KEY, feeling char(6), note text)")
        conn.execute("ALTER TABLE moods REPLICA IDENTITY FULL")
    path = tmp_path / "pipeline.yaml"
    privacy = {"tables": {"public.moods": {"rows": "feeling = 'happy'", "exclude": ["note"]}}}
    name = write(path, source_db, broker.bootstrap_servers, {}, privacy, ["public.moods"])
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(f"CREATE PUBLICATION cdc_{name} FOR ALL TABLES")
    audit = _explain(path)
    rows = audit["tables"][0]["rows"]
    assert rows["enforced"] == "connector" and "FOR ALL TABLES" in rows["reason"]
    topic = f"{name}.public.moods"
    with CdcProcess(path, "connector") as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            with conn.cursor().copy("COPY moods FROM STDIN") as copy:  # one WAL record for the three rows
                for row in ((2, "sad", "CANARY-FILTERED"), (3, None, "CANARY-FILTERED"), (1, "happy", "CANARY-NOTES")):
                    copy.write_row(row)
            conn.execute("UPDATE moods SET feeling = 'happy' WHERE id = 2")  # in: an insert
            conn.execute("UPDATE moods SET feeling = 'sad', note = 'CANARY-MOVED-OUT' WHERE id = 1")  # out: a delete
            conn.execute("UPDATE moods SET note = 'CANARY-FILTERED-b' WHERE id = 3")  # stays out: nothing
            conn.execute("DELETE FROM moods WHERE id IN (1, 3)")  # both out: nothing
            conn.execute("UPDATE moods SET note = 'x' WHERE id = 2")  # stays in: an update
        records = wait_until(lambda: (r := read_all(broker.bootstrap_servers, [topic]))
                             and sum(json.loads(v)["op"] != "r" for _, _, v, _ in r) >= 4 and r,
                             process=cdc, what="the events of the rows in the filter")
        assert cdc.stop() == 0, cdc.log()
    # Streamed events only: the initial snapshot runs beside the workload and may read a row too (as r).
    events = [e for e in (json.loads(v) for _, _, v, _ in records) if e["op"] != "r"]
    assert [(e["op"], (e["after"] or e["before"])["id"]) for e in events] == [("c", 1), ("c", 2), ("d", 1), ("u", 2)]
    assert events[1]["after"] == {"id": 2, "feeling": "happy "} and events[1]["before"] is None
    assert events[2]["before"] == {"id": 1, "feeling": "happy "} and events[2]["after"] is None
    # Positions do not depend on a filter the connector runs: the two rows it dropped from the
    # COPY keep their numbers, so the third row is seq 2.
    assert events[0]["source"]["seq"] == 2
    for _, key, value, headers in records:
        assert canaries_in(b"".join([key or b"", value, *(v for _, v in headers)])) == []


def test_a_publication_for_all_tables_leaves_everything_to_the_connector(tmp_path, source_db, broker, monkeypatch):
    """cdc does not alter a FOR ALL TABLES publication (it takes no column lists): explain says so,
    and the connector alone keeps excluded columns and filtered rows out."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
    monkeypatch.setenv("CDC_HASH_KEY", HASH_KEY)
    path = tmp_path / "pipeline.yaml"
    privacy = {**PRIVACY, "tables": {t: v for t, v in PRIVACY["tables"].items() if t != "public.orders"}}
    name = write(path, source_db, broker.bootstrap_servers, {}, privacy, ["public.customers", "public.members"])
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute(f"CREATE PUBLICATION cdc_{name} FOR ALL TABLES")
    audit = _explain(path)
    customers = audit["tables"][0]
    assert customers["rows"]["enforced"] == "connector" and "FOR ALL TABLES" in customers["rows"]["reason"]
    topic = f"{name}.public.customers"
    with CdcProcess(path, "connector") as cdc:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO customers (id, ssn, active, city) VALUES (1, 'CANARY-SSN', true, 'Oslo'),"
                         " (2, 'CANARY-SSN', false, 'CANARY-FILTERED')")
        records = wait_until(lambda: (r := read_all(broker.bootstrap_servers, [topic]))
                             and any(json.loads(v)["op"] != "r" for _, _, v, _ in r) and r,
                             process=cdc, what="the event")
        assert cdc.stop() == 0, cdc.log()
    assert "FOR ALL TABLES" in cdc.log()  # said at start: the connector enforces it
    every = [json.loads(v) for _, _, v, _ in records]
    # Streamed events only: the initial snapshot runs beside the insert and may read row 1 too (as r);
    # whatever it read went through the same policy.
    events = [e for e in every if e["op"] != "r"]
    assert [(e["op"], e["after"]["id"], e["after"]["city"]) for e in events] == [("c", 1, "Oslo")]
    assert all("ssn" not in e["after"] and e["after"]["city"] != "CANARY-FILTERED" for e in every)
    with psycopg.connect(source_db) as conn:
        assert conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (f"cdc_{name}",)).fetchone() == (True,)
