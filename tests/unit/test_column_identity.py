"""Column identity (attnum) in the cdc.schema header, and the resolution of a Relation message's
column names to attnums against the catalog (cdc.source.postgres.catalog.resolve_attnums)."""

from __future__ import annotations

import orjson

from cdc.events.schema import Column, TableSchema


def _schema(*columns: Column) -> TableSchema:
    return TableSchema("public", "customers", columns, ("id",))


def test_attnum_round_trips_through_the_header():
    schema = _schema(Column("id", "bigint", "bigint", nullable=False, attnum=1),
                     Column("ssn_v2", "text", "text", attnum=7))
    decoded = TableSchema.from_json(schema.to_json())
    assert decoded == schema
    assert [c.attnum for c in decoded.columns] == [1, 7]
    assert [c["attnum"] for c in orjson.loads(schema.to_json())["columns"]] == [1, 7]


def test_a_header_without_attnum_decodes_with_none():
    old = b'{"schema":"public","table":"t","key":["id"],"columns":[{"name":"id","type":"bigint","kind":"bigint"}]}'
    assert TableSchema.from_json(old).columns[0].attnum is None
    # and a column without one is encoded without the field, as older connectors did
    assert "attnum" not in orjson.loads(_schema(Column("id", "bigint", "bigint")).to_json())["columns"][0]
