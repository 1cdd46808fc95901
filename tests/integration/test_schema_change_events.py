"""Schema change records on `{pipeline}.schema_changes`, as a consumer of our own reads them.

Every change of a captured table's published shape is one record, in order, with the old and new
column lists (identities, types, key flags), what changed, and the position of the first event of
the new shape: a consumer lines the records up with the table's events by position. Excluded
columns never appear; a masked one appears as published (`text`). A restart neither repeats a
record nor misses a change made while the connector was down.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
import yaml

from cdc.lsn import Position, parse_lsn
from tests.integration.harness import (CdcProcess, published_schemas, schema_of, wait_for_confirmed, wait_for_slot,
                                       wait_until)
from tests.integration.test_privacy import read_all

pytestmark = pytest.mark.integration


def event_position(source: dict) -> Position:
    return Position(parse_lsn(source["commit_lsn"]), parse_lsn(source["lsn"]), int(source["seq"]))


def column_ids(columns: list[dict]) -> list[tuple]:
    return [(c["name"], c["attnum"], c["type"]) for c in columns]


def schema_change_records(bootstrap: str, name: str):
    """(the schema change records as (key, value, headers), the events of items: position -> (header columns, event))."""
    records = read_all(bootstrap, [f"{name}.schema_changes", f"{name}.public.items"])
    changes = [(key, json.loads(value), dict(headers)) for topic, key, value, headers in records
               if topic.endswith(".schema_changes")]
    events: dict[Position, tuple] = {}
    schemas = published_schemas(bootstrap, name)
    for topic, _, value, headers in records:
        if topic.endswith(".items") and value:
            event = json.loads(value)
            header = schema_of(headers, schemas)
            events.setdefault(event_position(event["source"]), (column_ids(header["columns"]), event))
    return changes, dict(sorted(events.items()))


def test_each_change_of_the_published_shape_is_one_record_ordered_with_the_rows(tmp_path, source_db, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, a text, b integer, secret text, email text)")
        conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    name = f"scev_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "pipeline": name,
        "source": {"postgres": source_db, "tables": ["public.items"], "status_interval_s": 1, "snapshot": "never"},
        "kafka": {"bootstrap_servers": broker.bootstrap_servers},
        "sinks": {"lite": {"url": f"sqlite:///{tmp_path / 'replica.db'}"}},
        "privacy": {"hash_key": "0123456789abcdef0123",
                    "tables": {"public.items": {"exclude": ["secret"], "mask": {"email": "hash"}}}},
    }, sort_keys=False))

    def run(*statements: str) -> None:
        with psycopg.connect(source_db) as conn:  # one transaction
            for statement in statements:
                conn.execute(statement)

    cdc = CdcProcess(path, "connector").start()
    try:
        wait_for_slot(source_db, f"cdc_{name}", cdc)
        run("INSERT INTO items VALUES (1, 'a1', 1, 'CANARY-SECRET', 'e1')")
        # Rows between the changes, inside one transaction.
        run("ALTER TABLE items RENAME COLUMN a TO a2", "INSERT INTO items VALUES (2, 'a2', 2, 's', 'e2')",
            "ALTER TABLE items ALTER COLUMN b TYPE bigint", "INSERT INTO items VALUES (3, 'a3', 3, 's', 'e3')")
        # Changes of an excluded and of a masked column: the published shape stays as it was.
        run("ALTER TABLE items RENAME COLUMN secret TO secret2", "ALTER TABLE items ALTER COLUMN email TYPE varchar(50)",
            "UPDATE items SET a2 = 'changed' WHERE id = 1")
        run("ALTER TABLE items ADD COLUMN c integer DEFAULT 7", "ALTER TABLE items DROP COLUMN a2",
            "INSERT INTO items VALUES (4, 4, 's', 'e4', 8)")
        run("ALTER TABLE items ALTER COLUMN b TYPE integer", "INSERT INTO items VALUES (5, 5, 's', 'e5', 9)")
        wait_until(lambda: len(schema_change_records(broker.bootstrap_servers, name)[0]) == 5 or "not yet", process=cdc,
                   what="five schema change records")
        # bigint -> integer made the connector re-read the table: let that finish and be confirmed,
        # so the kill leaves nothing of it to publish again.
        wait_until(lambda: "finished" in cdc.log(), process=cdc, what="the re-read of the table")
        wait_for_confirmed(source_db, f"cdc_{name}", cdc)
        cdc.kill()
        path.write_text(path.read_text().replace("- secret\n", "- secret2\n"))  # as the rename's warning asks
        run("ALTER TABLE items RENAME COLUMN b TO b2")  # while no connector runs
        run("INSERT INTO items VALUES (6, 6, 's', 'e6', 10)")
        cdc = CdcProcess(path, "connector").start()
        def row_6_published() -> bool:
            events = schema_change_records(broker.bootstrap_servers, name)[1].values()
            return any(e["after"] and e["after"]["id"] == 6 for _, e in events)

        wait_until(row_6_published, process=cdc, what="the row written while the connector was down")
        assert cdc.stop() == 0, cdc.log()
    finally:
        cdc.stop()

    changes, events = schema_change_records(broker.bootstrap_servers, name)
    assert [[(c["change"], c.get("column"), c.get("from"), c.get("to"), c.get("widening")) for c in record["changes"]]
            for _, record, _ in changes] == [
        [],  # the first shape published
        [("renamed", None, "a", "a2", None)],
        [("retyped", "b", "integer", "bigint", True)],
        [("dropped", "a2", None, None, None), ("added", "c", None, None, None)],
        [("retyped", "b", "bigint", "integer", False)],
        [("renamed", None, "b", "b2", None)],  # made while the connector was down; nothing repeated
    ]
    ids_first = [1, 2, 3, 4, 5, 6]
    positions = list(events)
    for (key, record, headers), first_id in zip(changes, ids_first):
        assert json.loads(key) == {"schema": "public", "table": "items"}
        assert "cdc.origin" in headers
        assert b"secret" not in key + json.dumps(record).encode()  # an excluded column is never named
        email = next(c for c in record["new"]["columns"] if c["name"] == "email")
        assert (email["type"], email["kind"]) == ("text", "text")  # masked: as published
        assert [c["name"] for c in record["new"]["columns"] if c["key"]] == ["id"]
        # The record's position is that of the first event of the new shape: the consumer orders by it.
        at = event_position(record["source"])
        assert at in events, (record, positions)
        header, event = events[at]
        assert event["after"]["id"] == first_id
        assert header == column_ids(record["new"]["columns"])
        earlier = [p for p in positions if p < at]
        if record["old"] is None:
            assert earlier == []
        else:
            assert events[earlier[-1]][0] == column_ids(record["old"]["columns"])  # events before: the old shape
    later_than_last = [p for p in positions if p >= event_position(changes[-1][1]["source"])]
    assert all(events[p][0] == column_ids(changes[-1][1]["new"]["columns"]) for p in later_than_last)
