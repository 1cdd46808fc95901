"""Values arrive exactly as the source holds them, and a value too large to publish is refused early.

Real `cdc run` / `cdc connector` / `cdc status` / `cdc replay` processes, a source on PostgreSQL 15
and 18, the broker, SQLite and PostgreSQL targets.
"""

from __future__ import annotations

import json
import re
import sqlite3
import uuid

import psycopg
import pytest
import yaml

from tests.integration.harness import CdcProcess, wait_for_slot, wait_until, write_pipeline
from tests.integration.test_cli import cdc, read_topic

pytestmark = pytest.mark.integration

# A json value keeps its text: duplicate keys, key order, whitespace inside and around it, numbers
# as written. A jsonb value is as PostgreSQL prints it, here with a number of 5,000 digits.
JSON_TEXT = ' {"b": 1.0,  "a":1e2, "a" : 2,\n "big": -0.000000010} '
BIG_NUMBER = "9" * 5000
JSONB_LITERAL = f'{{"n": {BIG_NUMBER}, "m": -{BIG_NUMBER}.5, "z": [1.50, "\\u00e9"], "a": null}}'
ARRAY_ELEMENT = ' {"k":1, "k":2} '


def source_texts(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, j::text, jb::text, ja::text FROM docs ORDER BY id").fetchall()


def target_pg_matches(dsn: str, source: list[tuple]) -> bool | str:
    try:
        target = source_texts(dsn)
    except psycopg.errors.UndefinedTable:
        return "no table yet"
    return target == source or f"target {target!r}"


def sqlite_texts(path) -> list[tuple] | str:
    if not path.exists():
        return "no database yet"
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, j, jb, ja FROM docs ORDER BY id").fetchall()
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        conn.close()


def docs_pipeline(tmp_path, source_db, target_pg, broker):
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, j json, jb jsonb, ja json[]);"
                     " ALTER TABLE docs REPLICA IDENTITY FULL")
    name = f"verbatim_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.docs"],
                          bootstrap=broker.bootstrap_servers, status_interval_s=0.5,
                          sinks={"lite": {"url": f"sqlite:///{tmp_path / 'replica.db'}"}, "pg": {"url": target_pg}})
    return path, name, tmp_path / "replica.db"


def stream_rows(path, name, source_db, target_pg, replica, insert: str, params: tuple) -> tuple[list, list]:
    """Insert rows through a running `cdc run`; (source texts, SQLite rows) once both sinks hold them."""
    with CdcProcess(path) as run:
        wait_for_slot(source_db, f"cdc_{name}", run)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute(insert, params)
        source = source_texts(source_db)
        wait_until(lambda: target_pg_matches(target_pg, source), process=run,
                   what="the PostgreSQL target to print every json, jsonb and json[] value as the source does")
        stored = wait_until(lambda: sqlite_texts(replica) if isinstance(sqlite_texts(replica), list) and
                            len(sqlite_texts(replica)) == len(source) else None, process=run, what="the rows in SQLite")
    return source, stored


def test_json_arrives_byte_for_byte_and_jsonb_as_postgresql_prints_it(tmp_path, source_db, target_pg, broker):
    path, name, replica = docs_pipeline(tmp_path, source_db, target_pg, broker)
    source, stored = stream_rows(
        path, name, source_db, target_pg, replica,
        "INSERT INTO docs VALUES (1, %s, %s, ARRAY[%s::json, NULL]), (2, '[]', '{}', '{}')",
        (JSON_TEXT, '{"b": 1.50, "a": {"y": [1e2, "\\u00e9"]}, "a": 3}', ARRAY_ELEMENT))
    assert source[0][1] == JSON_TEXT  # what the source holds
    (one, j, jb, ja), two = stored
    assert (one, j, jb) == (1, JSON_TEXT, source[0][2])
    assert ARRAY_ELEMENT in ja  # the element's text, duplicate keys and all, inside the list's JSON text
    assert two == (2, "[]", "{}", "[]")


def test_a_jsonb_number_of_5000_digits_arrives_exactly_and_status_and_replay_read_it(
        tmp_path, source_db, target_pg, broker):
    path, name, replica = docs_pipeline(tmp_path, source_db, target_pg, broker)
    source, stored = stream_rows(path, name, source_db, target_pg, replica,
                                 "INSERT INTO docs (id, jb) VALUES (1, %s)", (JSONB_LITERAL,))
    assert BIG_NUMBER in source[0][2]
    assert stored == [(1, None, source[0][2], None)]

    status = cdc("status", str(path), "--json")
    # 3: everything answered, but no connector runs now (the pipeline was stopped); 1 would be a failure to read.
    assert status.returncode == 3, status.stdout + status.stderr
    (partition,) = json.loads(status.stdout)["kafka"]["topics"][f"{name}.public.docs"]["partitions"].values()
    assert partition["end_offset"] == 1 and partition["last_position"] is not None, partition
    with psycopg.connect(target_pg, autocommit=True) as conn:
        conn.execute("UPDATE docs SET jb = '{}'")  # damage the target, then repair it
    replay = cdc("replay", str(path), "--sink", "pg", "--from-lsn", "0/0", "--yes")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert target_pg_matches(target_pg, source) is True


def test_a_value_too_large_to_publish_is_refused_before_its_event_is_built(tmp_path, source_db, broker, monkeypatch):
    """The refusal names table, LSN, size, setting and the way past it; a large value the privacy
    policy masks is no reason to refuse (its event is small)."""
    monkeypatch.setenv("CDC_HASH_KEY", "test-hash-key-0123456789")
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY, body text, secret text);"
                     " ALTER TABLE a REPLICA IDENTITY FULL")
    name = f"oversize_{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=source_db, tables=["public.a"],
                          bootstrap=broker.bootstrap_servers, sinks={}, status_interval_s=0.5)
    doc = yaml.safe_load(path.read_text())
    doc["privacy"] = {"hash_key": "${CDC_HASH_KEY}", "tables": {"public.a": {"mask": {"secret": "hash"}}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))  # kafka.max_batch_bytes: the default, 1 MiB
    with CdcProcess(path, "connector") as connector:
        wait_for_slot(source_db, f"cdc_{name}", connector)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO a VALUES (1, 'small', repeat('s', 3000000))")  # masked: a small event
            conn.execute("INSERT INTO a VALUES (2, repeat('x', 3000000), 'x')")
        connector.proc.wait(60)
    assert connector.proc.returncode == 1, connector.log()
    log = connector.log()
    refused = re.search(r"a change of public\.a at LSN [0-9A-F]+/[0-9A-F]+ makes an event for topic \S+ of at "
                        r"least (\d+) bytes", log)
    assert refused is not None and int(refused.group(1)) >= 3_000_000, log
    assert "kafka.max_batch_bytes" in log and "--skip-to-lsn" in log, log
    events = read_topic(broker.bootstrap_servers, f"{name}.public.a", 1)
    assert [e["after"]["id"] for e in events] == [1] and len(events[0]["after"]["secret"]) < 100
