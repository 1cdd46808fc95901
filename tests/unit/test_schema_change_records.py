"""Schema change records (cdc.events.schema_changes): what changed, matched by column identity."""

from __future__ import annotations

import orjson

from cdc.events import schema_changes
from cdc.events.envelope import ChangeEvent, TransactionInfo
from cdc.events.schema import Column, TableSchema
from cdc.lsn import Position


def shape(*columns: Column, key=("id",)) -> TableSchema:
    return TableSchema("public", "items", columns, tuple(key))


ID = Column("id", "integer", "integer", nullable=False, attnum=1)


def test_a_rename_is_told_from_a_drop_and_an_add_by_attnum():
    old = shape(ID, Column("n", "text", "text", attnum=2))
    renamed = shape(ID, Column("n2", "text", "text", attnum=2))
    replaced = shape(ID, Column("n", "text", "text", attnum=3))
    assert schema_changes.changes(old, renamed) == [{"change": "renamed", "attnum": 2, "from": "n", "to": "n2"}]
    assert schema_changes.changes(old, replaced) == [
        {"change": "dropped", "column": "n", "attnum": 2, "type": "text"},
        {"change": "added", "column": "n", "attnum": 3, "type": "text"},
    ]


def test_type_changes_say_whether_they_widen():
    old = shape(ID, Column("a", "integer", "integer", attnum=2), Column("d", "text", "text", attnum=3))
    new = shape(ID, Column("a2", "bigint", "bigint", attnum=2), Column("d", "integer", "integer", attnum=3))
    assert schema_changes.changes(old, new) == [
        {"change": "renamed", "attnum": 2, "from": "a", "to": "a2"},
        {"change": "retyped", "column": "a2", "attnum": 2, "from": "integer", "to": "bigint", "widening": True},
        {"change": "retyped", "column": "d", "attnum": 3, "from": "text", "to": "integer", "widening": False},
    ]


def test_a_record_carries_both_column_lists_and_the_first_events_position_and_decodes_back():
    old = shape(ID, Column("n", "text", "text", attnum=2))
    new = shape(ID, Column("n2", "text", "text", attnum=2), Column("c", "integer", "integer", default=7, attnum=3))
    txn = TransactionInfo(0x1A00, "0/1A00", 731, "2026-12-06T12:00:00.000000Z")
    first = ChangeEvent("c", None, {"id": 1, "n2": "x", "c": 7}, {"id": 1}, Position(0x1A00, 0x19F0, 0), "0/19F0", txn)
    value = schema_changes.encode("shop", "shop", "shop.public.items", old, new, first)
    record = orjson.loads(value)
    assert record["source"]["commit_lsn"] == "0/1A00" and record["source"]["lsn"] == "0/19F0"
    assert record["old"]["columns"][1] == {"name": "n", "attnum": 2, "type": "text", "kind": "text", "array": False,
                                           "key": False, "nullable": True, "builtin": True}
    assert [c["key"] for c in record["new"]["columns"]] == [True, False, False]
    assert record["new"]["columns"][2]["default"] == 7
    assert [c["change"] for c in record["changes"]] == ["renamed", "added"]
    decoded = schema_changes.decode(value)
    assert decoded.position == Position(0x1A00, 0x19F0, 0)
    assert decoded.schema == new and schema_changes.same_shape(decoded.schema, new)
    assert not schema_changes.same_shape(decoded.schema, old)
