"""The schema travels once per shape: events carry a `cdc.schema_id` header, the schema itself is a
record on the compacted `{pipeline}.schemas` topic, and sinks still need nothing but Kafka.

A real connector (PostgreSQL 15 and 18) and real `cdc sink` processes on the real broker; the
records of older connectors (the full `cdc.schema` header) and a record naming an unknown id are
written by the test itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from contextlib import closing

import psycopg
import yaml
from aiokafka import AIOKafkaProducer

from cdc.config import load_pipeline
from cdc.events import schema_ids
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.publish.admin import compacted_topics, ensure_topics
from tests.integration.harness import (CdcProcess, published_schemas, wait_for_confirmed, wait_for_slot, wait_until,
                                       write_pipeline)
from tests.integration.test_privacy import read_all
from tests.integration.test_sink_safety import ITEMS, ORIGIN_A, Pipeline, change


def replica_rows(path, sql: str) -> list[tuple]:
    if not path.exists():
        return []
    with closing(sqlite3.connect(path)) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


def test_events_name_their_schema_by_id_and_a_sink_started_later_reads_it_from_the_schemas_topic(
        tmp_path, source_db, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id integer PRIMARY KEY, title text, secret text, email text, body jsonb)")
        conn.execute("ALTER TABLE docs REPLICA IDENTITY FULL")
    name = f"sid_{uuid.uuid4().hex[:8]}"
    replica = tmp_path / "replica.db"
    path = write_pipeline(tmp_path / "pipeline.yaml", pipeline=name, source_dsn=source_db, tables=["public.docs"],
                          bootstrap=broker.bootstrap_servers, sinks={"lite": {"url": f"sqlite:///{replica}"}})
    privacy = {"hash_key": "0123456789abcdef0123",
               "tables": {"public.docs": {"exclude": ["secret"], "mask": {"email": "hash"}}}}
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "privacy": privacy}, sort_keys=False))
    topic = f"{name}.public.docs"

    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("""INSERT INTO docs VALUES (1, 't1', 's', 'a@example.com', '{"b": 1, "a": [2]}')""")
            conn.execute("INSERT INTO docs VALUES (2, 't2', 's', 'b@example.com', NULL)")
            conn.execute("ALTER TABLE docs ADD COLUMN pages integer")
            conn.execute("INSERT INTO docs VALUES (3, 't3', 's', 'c@example.com', '[]', 30)")
            conn.execute("UPDATE docs SET title = 'T1' WHERE id = 1")
        wait_until(lambda: len(read_all(broker.bootstrap_servers, [topic])) == 4, process=connector,
                   what="four events")
        wait_for_confirmed(source_db, f"cdc_{name}", connector)
        assert connector.stop() == 0, connector.log()

    # Each event names its shape by id and carries no schema; two shapes, two ids.
    events = read_all(broker.bootstrap_servers, [topic])
    names = [[k for k, _ in headers] for _, _, _, headers in events]
    assert names == [[schema_ids.HEADER, ORIGIN_HEADER]] * 4
    ids = [dict(headers)[schema_ids.HEADER] for _, _, _, headers in events]
    assert ids[0] == ids[1] != ids[2] == ids[3]
    # The schemas topic: compacted, keyed by id, the published schema (excluded column absent,
    # masked one as text), exactly the JSON the id is the digest of, with the source history.
    assert asyncio.run(compacted_topics(load_pipeline(path).kafka, [f"{name}.schemas"])) == {f"{name}.schemas"}
    records = read_all(broker.bootstrap_servers, [f"{name}.schemas"])
    assert {key for _, key, _, _ in records} == {ids[0], ids[2]}
    for _, key, value, headers in records:
        assert schema_ids.schema_id(value) == key
        assert [k for k, _ in headers] == [ORIGIN_HEADER]
    schemas = published_schemas(broker.bootstrap_servers, name)
    columns = {c["name"]: c["type"] for c in schemas[ids[2]]["columns"]}
    assert columns == {"id": "integer", "title": "text", "email": "text", "body": "jsonb", "pages": "integer"}

    # A sink that starts only now reads the schemas cold from Kafka and applies everything.
    with CdcProcess(path, "sink") as sink:
        wait_until(lambda: len(replica_rows(replica, "SELECT id FROM docs WHERE id = 1 AND title = 'T1'")) == 1,
                   process=sink, what="every event applied")
        assert sink.stop() == 0, sink.log()
    rows = replica_rows(replica, "SELECT id, title, body, pages FROM docs ORDER BY id")
    assert rows == [(1, "T1", '{"a": [2], "b": 1}', None), (2, "t2", None, None), (3, "t3", "[]", 30)]


def publish_by_id(p: Pipeline, events: list[tuple[bytes, bytes]], schema_id: bytes, *, schema: bytes | None) -> None:
    """Events with a schema id header, as the connector writes them; with `schema`, its record first."""
    async def send() -> None:
        await ensure_topics(p.config.kafka, [p.topic])
        await ensure_topics(p.config.kafka, [schema_ids.topic_of(p.name)], compact=True)
        producer = AIOKafkaProducer(bootstrap_servers=p.config.kafka.bootstrap_servers)
        await producer.start()
        try:
            if schema is not None:
                await producer.send_and_wait(schema_ids.topic_of(p.name), schema, key=schema_id,
                                             headers=[(ORIGIN_HEADER, ORIGIN_A.to_json())])
            for key, value in events:
                await producer.send_and_wait(p.topic, value, key=key,
                                             headers=[(schema_ids.HEADER, schema_id), (ORIGIN_HEADER, ORIGIN_A.to_json())])
        finally:
            await producer.stop()

    asyncio.run(send())


def test_records_with_the_full_schema_header_of_the_previous_release_are_still_applied(tmp_path, broker):
    p = Pipeline(tmp_path, broker.bootstrap_servers, "sqlite:///replica.db")
    p.publish([change(1, 0x1000), change(2, 0x1100)])  # the full `cdc.schema` header, as before
    items_id = schema_ids.schema_id(ITEMS.to_json())
    publish_by_id(p, [change(3, 0x1200), change(1, 0x1300, op="u", name="new")], items_id, schema=ITEMS.to_json())
    with p.sink(log="mixed") as sink:
        wait_until(lambda: p.rows() == [(1, "new", "long text"), (2, "n", "long text"), (3, "n", "long text")],
                   process=sink, what="the old and the new records applied")


def test_a_record_naming_a_schema_on_no_schema_record_stops_the_sink_naming_it(tmp_path, broker):
    p = Pipeline(tmp_path, broker.bootstrap_servers, "sqlite:///replica.db")
    items_id = schema_ids.schema_id(ITEMS.to_json())
    publish_by_id(p, [change(1, 0x1000)], items_id, schema=ITEMS.to_json())
    unknown = schema_ids.schema_id(b'{"a schema": "nobody published"}')
    publish_by_id(p, [change(2, 0x1100)], unknown, schema=None)
    publish_by_id(p, [change(3, 0x1200)], items_id, schema=None)
    for attempt in ("first", "restart"):
        stopped = p.sink(log=attempt).start()
        assert stopped.exit_code() == 4, stopped.log()
        (line,) = stopped.error_lines()
        assert f"sink {p.consumer}: {p.topic}[0]@1: its schema id {unknown.decode()} is on no record" in line, line
        assert f"--skip-record {p.topic}:0:1" in line  # the documented way past it
    assert p.rows() == [(1, "n", "long text")]  # nothing past it, nothing skipped silently
    with p.sink("--name", "replica", "--skip-record", f"{p.topic}:0:1", "--yes", log="skip") as sink:
        wait_until(lambda: len(p.rows()) == 2, process=sink, what="the event after the skipped record")
    assert [r[0] for r in p.rows()] == [1, 3]
