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
    name = f"sp_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.people"],
                          bootstrap=broker.bootstrap_servers, sinks={}, status_interval_s=0.5,
                          snapshot="initial")
    path.write_text(path.read_text() + (
        "privacy:\n  tables:\n    public.people:\n      exclude: [ssn]\n      mask:\n        email: redact\n"
        "      rows: \"active is true\"\n"))
    topic = f"{name}.public.people"
    with CdcProcess(path, "connector") as proc:
        wait_for_slot(source_db, f"cdc_{name}", proc)
        wait_until(lambda: count_ops(broker.bootstrap_servers, topic).get("r", 0) >= 100, process=proc,
                   what="the snapshot published")

    async def read() -> list:
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
    assert CANARY not in proc.log()
