"""Snapshot rows go through the privacy policy: dropped columns are never read, masks and filters apply."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.integration.harness import CdcProcess, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_snapshot import count_ops

pytestmark = pytest.mark.integration

CANARY = "CANARY-7f3a"


def test_snapshot_rows_follow_the_privacy_policy(tmp_path, source_db, broker):
    import asyncio
    import json

    from aiokafka import AIOKafkaConsumer, TopicPartition

    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (id int PRIMARY KEY, email text, ssn text, active boolean)")
        conn.execute("ALTER TABLE people REPLICA IDENTITY FULL")
        conn.execute(f"INSERT INTO people SELECT i, 'p' || i || '@example.com', '{CANARY}-' || i, i % 2 = 0"
                     " FROM generate_series(1, 200) i")
        # Rows PostgreSQL's own filter excludes hold the canary: float, real, char(n), numeric, text.
        conn.execute("CREATE TABLE readings (id int PRIMARY KEY, ratio double precision, r real, code char(4),"
                     " n numeric, label text, secret text)")
        conn.execute("ALTER TABLE readings REPLICA IDENTITY FULL")
        conn.execute(f"""INSERT INTO readings VALUES
            (1, 0.3, 0.5, 'cd', 1, 'x', '{CANARY}-ratio'), (2, 0.5, 0.3, 'cd', 1, 'x', '{CANARY}-real'),
            (3, 0.5, 0.5, 'ab', 1, 'x', '{CANARY}-char'), (4, 0.5, 0.5, 'cd', 0.30, 'x', '{CANARY}-numeric'),
            (5, 0.5, 0.5, 'cd', 1, 'x ', '{CANARY}-text'), (6, 0.5, 0.5, 'cd', 1, 'x', 'kept'),
            (7, 0.30000000000000004, 0.25, 'ab c', 0.31, 'x', 'kept')""")
    filter_sql = "ratio <> 0.3 AND r <> '0.3' AND code <> 'ab' AND n <> 0.3 AND label = 'x'"
    with psycopg.connect(source_db) as conn:
        kept = [r[0] for r in conn.execute(f"SELECT id FROM readings WHERE {filter_sql} ORDER BY id")]
    assert kept == [6, 7]
    name = f"sp_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.people", "public.readings"],
                          bootstrap=broker.bootstrap_servers, sinks={}, status_interval_s=0.5,
                          snapshot="initial")
    path.write_text(path.read_text() + (
        "privacy:\n  tables:\n    public.people:\n      exclude: [ssn]\n      mask:\n        email: redact\n"
        "      rows: \"active is true\"\n"
        f"    public.readings:\n      rows: \"{filter_sql}\"\n"))
    topic = f"{name}.public.people"
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        wait_until(lambda: count_ops(broker.bootstrap_servers, topic).get("r", 0) >= 100
                   and count_ops(broker.bootstrap_servers, f"{name}.public.readings").get("r", 0) >= 2, process=proc,
                   what="the snapshot published")

    async def read(topic: str = topic) -> list:
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            return (await consumer.getmany(tp, timeout_ms=3000)).get(tp, [])
        finally:
            await consumer.stop()

    messages = asyncio.run(read())
    assert len(messages) == 100  # only the active half passes the row filter
    for m in messages:
        assert CANARY.encode() not in m.value and all(CANARY.encode() not in v for _, v in m.headers)
        event = json.loads(m.value)
        assert event["op"] == "r" and set(event["after"]) == {"id", "email", "active"}
        assert event["after"]["email"] == "[redacted]" and event["after"]["active"] is True
    readings = asyncio.run(read(f"{name}.public.readings"))
    assert sorted(json.loads(m.value)["after"]["id"] for m in readings) == kept  # exactly what PostgreSQL keeps
    assert all(CANARY.encode() not in (m.key or b"") + m.value + b"".join(v for _, v in m.headers) for m in readings)
    assert CANARY not in proc.log()
