"""The compiled core (cdc.native) against the pure-Python path on what PostgreSQL really sends: every type
of the types table (tests/integration/types_cases.py) and its array, strings needing escapes, non-ASCII,
NULLs, an unchanged TOASTed value, key changes with full before-images, and a backlog shaped like
bench/run.py's orders. Each pgoutput message of the slot is decoded, built into events and encoded both
ways: the Kafka keys and values must be the same bytes. On PostgreSQL 15 and 18."""

from __future__ import annotations

from collections import Counter

import orjson
import psycopg
import pytest
from psycopg import sql

from cdc import native
from cdc.config import TableRef
from cdc.connector.changes import row_events, snapshot_row
from cdc.connector.positions import Positions
from cdc.connector.tables import TableStream
from cdc.events.codec import EventSources, encode_event, encode_key
from cdc.events.schema import Column, TableSchema
from cdc.lsn import parse_lsn
from cdc.source.postgres import pgoutput
from cdc.source.postgres.catalog import Catalog
from cdc.source.postgres.replication import SESSION_OPTIONS
from cdc.source.postgres.snapshot import ChunkReader
from cdc.source.postgres.values import ValueDecoder
from tests.integration.harness import wait_until
from tests.integration.types_cases import CASES, SETUP, has_libxml

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(native.built is None, reason=f"the compiled core is not built: {native.describe()}")]

ESCAPES = "quote \" backslash \\ newline \n tab \t bell \x07 slash / é 中 \U0001F600"


def write_changes(conn: psycopg.Connection) -> list[str]:
    """The tables and changes of the comparison, after the slot; returns the tables' names."""
    conn.execute(SETUP)
    cases = [c for c in CASES if not c[0].startswith("xml") or has_libxml(conn)]
    columns = ", ".join(f"c{i} {pg_type}" for i, (pg_type, *_) in enumerate(cases))
    conn.execute(f"CREATE TABLE everything (id integer PRIMARY KEY, {columns}, note text)")
    conn.execute("ALTER TABLE everything REPLICA IDENTITY FULL")
    for i, (_, literal, *_) in enumerate(cases):  # one value a row: the others NULL
        conn.execute(f"INSERT INTO everything (id, c{i}, note) VALUES ({i}, {literal}, %s)", (ESCAPES,))
    conn.execute(f"INSERT INTO everything VALUES (-1, {', '.join(c[1] for c in cases)}, NULL)")  # all of them
    # The columns the compiled core's InsertEncoder writes (a table with any other has none): their rows again.
    catalog, values = Catalog(conn), ValueDecoder(conn)
    encodable = [name for name, oid, typmod in conn.execute(
        "SELECT attname, atttypid, atttypmod FROM pg_attribute WHERE attrelid = 'everything'::regclass AND attnum > 0")
        if values.native_conversion(catalog.describe_type(oid, typmod)) in native.built.INSERT_CONVERSIONS]
    conn.execute(f"CREATE TABLE encodable AS SELECT {', '.join(encodable)} FROM everything WITH NO DATA")
    conn.execute("ALTER TABLE encodable ADD PRIMARY KEY (id)")
    conn.execute(f"INSERT INTO encodable SELECT {', '.join(encodable)} FROM everything")
    conn.execute("UPDATE everything SET id = id + 1000 WHERE id % 3 = 0")  # key changes: delete and create
    conn.execute("UPDATE everything SET note = 'changed' WHERE id % 3 = 1")
    conn.execute("DELETE FROM everything WHERE id % 3 = 2")

    conn.execute("CREATE TABLE toasted (id integer PRIMARY KEY, big text, small text)")  # default replica identity
    conn.execute("ALTER TABLE toasted ALTER big SET STORAGE EXTERNAL")  # out of line, uncompressed
    conn.execute("INSERT INTO toasted VALUES (1, repeat(%s, 2000), 'a')", (ESCAPES,))
    conn.execute("UPDATE toasted SET small = 'b'")  # big not resent: unchanged
    conn.execute("UPDATE toasted SET id = 2")  # a key change with big unchanged: one u event
    conn.execute("DELETE FROM toasted")

    conn.execute("""CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12, 2) NOT NULL,
                    status text NOT NULL, tags text[], details jsonb, created_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute("""INSERT INTO orders (id, customer, amount, status, tags, details)
                    SELECT g, 'customer-' || (g % 997), (g % 100000) / 100.0, 'new', ARRAY['a', 'b'],
                           jsonb_build_object('n', g, 'note', 'bench') FROM generate_series(1, 2000) g""")
    return ["everything", "encodable", "toasted", "orders"]


def written_changes(conn: psycopg.Connection, name: str) -> tuple[list[str], list[tuple[int, bytes]]]:
    """write_changes after a publication and slot called `name`: the tables, and each pgoutput message
    of the slot (LSN, bytes)."""
    conn.execute(f"CREATE PUBLICATION {name} FOR ALL TABLES")  # the tables to come too
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    tables = write_changes(conn)
    # SQL decoding reads up to the flushed WAL (the test servers commit asynchronously).
    (written,) = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
    wait_until(lambda: conn.execute("SELECT pg_current_wal_flush_lsn() >= %s", (written,)).fetchone()[0],
               what="the changes' WAL flushed")
    payloads = [(parse_lsn(str(lsn)), bytes(data)) for lsn, _, data in conn.execute(
                    "SELECT lsn, xid, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                    "'proto_version', '1', 'publication_names', %s)", (name, name)).fetchall()]
    return tables, payloads


def records(conn: psycopg.Connection, payloads: list[tuple[int, bytes]],
            encoded_in_one_step: Counter[str] | None = None) -> tuple[list[tuple[bytes | None, bytes]], set[str]]:
    """Every Kafka key and value the changes make, the way the connector's stages make them; and the
    tables whose rows the compiled core made. With the compiled core, each INSERT the InsertEncoder
    takes (counted per table) must come out of it as the same bytes."""
    catalog, values = Catalog(conn), ValueDecoder(conn)
    positions, streams, out = Positions(), {}, []
    for lsn, payload in payloads:
        msg = pgoutput.decode(payload, lsn=lsn)
        if isinstance(msg, pgoutput.Begin):
            positions.begin(msg)
        elif isinstance(msg, pgoutput.Relation):
            streams[msg.relation_id] = table_stream(catalog, values, msg)
        elif isinstance(msg, (pgoutput.Insert, pgoutput.Update, pgoutput.Delete)):
            stream = streams[msg.relation_id]
            for event in row_events(positions, stream, msg, lsn):
                out.append((encode_key(event), encode_event(event, "p", "db", "public", stream.ref.name, 0)))
                one_step_taken = isinstance(msg, pgoutput.Insert) and stream.insert_encoder is not None
                if encoded_in_one_step is not None and one_step_taken:
                    # The connector's one step for an INSERT: the same bytes, or the general path's to make.
                    sources = EventSources("p", "db", "public", stream.ref.name, event.txn, False)
                    one_step = stream.insert_encoder.encode(payload, sources.head, event.lsn_text, event.position.seq,
                                                            sources.tail, 0)
                    assert one_step in (None, out[-1]), (stream.ref.name, event.after)
                    encoded_in_one_step[stream.ref.name] += one_step is not None
    return out, {s.ref.name for s in streams.values() if s.native_plan is not None}


def test_native_and_python_paths_publish_the_same_bytes(source_db, monkeypatch):
    with psycopg.connect(source_db, autocommit=True, options=SESSION_OPTIONS) as conn:
        tables, payloads = written_changes(conn, "native_diff")

        monkeypatch.setattr(native, "core", native.built)  # whatever CDC_NATIVE says
        monkeypatch.setattr(pgoutput, "_tuple", _native_tuple_reader())
        one_step: Counter[str] = Counter()
        compiled, plans = records(conn, payloads, one_step)
        assert plans == set(tables)
        # Tables with a float or a Python-converted column have no encoder; the others' INSERTs took it,
        # but for the few rows with a value only Python converts (an infinite date, a BC timestamp).
        (encodable_rows,) = conn.execute("SELECT count(*) FROM encodable").fetchone()
        assert one_step["orders"] == 2000 and one_step["toasted"] == 1 and "everything" not in one_step
        assert encodable_rows * 0.9 < one_step["encodable"] < encodable_rows

        monkeypatch.setattr(native, "core", None)
        monkeypatch.setattr(pgoutput, "_tuple", pgoutput._python_tuple)
        python, plans = records(conn, payloads)
        assert not plans

    assert len(python) > 2000 and len(compiled) == len(python)
    assert any(b'"unchanged":["big"]' in value for _, value in python)  # the TOAST marker was exercised
    assert any(b"\\ud83d" in value or "\U0001F600".encode() in value for _, value in python)
    for (key_c, value_c), (key_p, value_p) in zip(compiled, python):
        assert key_c == key_p
        assert value_c == value_p, orjson.loads(value_p)["source"]


def test_snapshot_rows_encoded_in_one_step_are_the_general_paths_bytes(source_db, monkeypatch):
    """A snapshot chunk's rows, as the chunk's SELECT really returns them: each `r` event the
    InsertEncoder makes (encode_row) is the general path's bytes (snapshot_row, the ChangeEvent, the codec)."""
    monkeypatch.setattr(native, "core", native.built)  # whatever CDC_NATIVE says
    with psycopg.connect(source_db, autocommit=True, options=SESSION_OPTIONS) as conn:
        _, payloads = written_changes(conn, "native_snap")
        streams = table_streams(conn, payloads)
        positions = Positions()
        positions.begin(next(m for m in map(pgoutput.decode, (p for _, p in payloads)) if isinstance(m, pgoutput.Begin)))
        reader = ChunkReader(source_db, "native_snap")
        try:
            for name in ("encodable", "orders"):
                stream = streams[name]
                key = [(k, stream.schema.column(k).type) for k in stream.key_names]
                rows = reader.select_chunk(sql.Identifier("public", name), list(stream.names), key, None, None, None).rows
                sources = EventSources("p", "db", "public", name, positions.info, True)
                taken = 0
                for lsn, raw in enumerate(rows, start=0x16B374D848):
                    lsn_text, seq = positions.next_at(lsn)
                    one_step = stream.insert_encoder.encode_row(raw, sources.head, lsn_text, seq, sources.tail, 0)
                    after, row_key = snapshot_row(stream, raw, lsn)
                    event = positions.event("r", None, after, row_key, lsn, snapshot=True)
                    expected = (encode_key(event), encode_event(event, "p", "db", "public", name, 0))
                    assert one_step in (None, expected), (name, after)
                    taken += one_step is not None
                # Every row but the few holding a value only Python converts (an infinite date, a BC timestamp).
                assert len(rows) * 0.9 < taken <= len(rows) and (name != "orders" or taken == len(rows) == 2000)
        finally:
            reader.close()


def table_streams(conn: psycopg.Connection, payloads: list[tuple[int, bytes]]) -> dict[str, TableStream]:
    """The TableStream of each table of the changes' Relation messages, by name."""
    catalog, values = Catalog(conn), ValueDecoder(conn)
    return {msg.name: table_stream(catalog, values, msg)
            for msg in (pgoutput.decode(payload) for _, payload in payloads) if isinstance(msg, pgoutput.Relation)}


def table_stream(catalog: Catalog, values: ValueDecoder, msg: pgoutput.Relation) -> TableStream:
    """The TableStream of a Relation message, as the connector makes it."""
    types = [catalog.describe_type(c.type_oid, c.type_modifier) for c in msg.columns]
    key = tuple(c.name for c in msg.columns if c.key)
    schema = TableSchema(msg.namespace, msg.name, tuple(Column(c.name, t.type, t.kind, t.array)
                                                        for c, t in zip(msg.columns, types)), key)
    return TableStream(ref=TableRef(msg.namespace, msg.name), topic=msg.name, schema=schema,
                       names=tuple(c.name for c in msg.columns), converters=tuple(values.converter(t) for t in types),
                       key_names=key, headers=[], conversions=tuple(values.native_conversion(t) for t in types))


def _native_tuple_reader():
    read = native.built.TupleReader(pgoutput.UNCHANGED_TOAST).read

    def tuple_(data, off, size, what):
        found = read(data, off)
        return found if found is not None else pgoutput._checked_tuple(data, off, size, what)

    return tuple_
