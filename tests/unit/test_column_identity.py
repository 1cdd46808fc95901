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


import pytest  # noqa: E402

from cdc.source.postgres.column_identity import ColumnIdentityError, LiveColumn, resolve_attnums  # noqa: E402

TEXT, INT = 25, 23


def live(*cols):
    return [LiveColumn(a, n, t) for a, n, t in cols]


def test_a_rename_keeps_the_attnum_while_streaming_and_after_a_restart():
    now = live((1, "id", INT), (2, "ssn_v2", TEXT), (3, "city", TEXT))
    # while streaming: the previous version knew ssn as #2
    assert resolve_attnums(["id", "ssn_v2", "city"], [INT, TEXT, TEXT], now, [],
                           {"id": 1, "ssn": 2, "city": 3}) == [1, 2, 3]
    # a change from before the rename, read after a restart: no dropped columns, same count -> exact
    assert resolve_attnums(["id", "ssn", "city"], [INT, TEXT, TEXT], now, [], None) == [1, 2, 3]


def test_without_dropped_columns_a_change_holds_the_first_columns():
    # read after `RENAME ssn TO ssn_v2, RENAME phone TO tel, ADD ssn`: the old name now names a new column
    now = live((1, "id", INT), (2, "ssn_v2", TEXT), (3, "tel", TEXT), (4, "city", TEXT), (5, "ssn", TEXT))
    assert resolve_attnums(["id", "ssn", "phone", "city"], [INT, TEXT, TEXT, TEXT], now, [], None) == [1, 2, 3, 4]
    # unless the publication's column list changed since: then by name and position only, and here neither fits
    with pytest.raises(ColumnIdentityError):
        resolve_attnums(["id", "ssn", "phone", "city"], [INT, TEXT, TEXT, TEXT], now, [], None, exact_prefix=False)


def test_rename_plus_add_in_one_step_resolves_when_the_catalog_agrees():
    now = live((1, "id", INT), (2, "ssn_v2", TEXT), (3, "note", TEXT))
    assert resolve_attnums(["id", "ssn_v2", "note"], [INT, TEXT, TEXT], now, [], {"id": 1, "ssn": 2}) == [1, 2, 3]


def test_a_column_dropped_since_the_change_is_the_one_known_before():
    now = live((1, "id", INT), (3, "city", TEXT))
    assert resolve_attnums(["id", "ssn", "city"], [INT, TEXT, TEXT], now, [2],
                           {"id": 1, "ssn": 2, "city": 3}) == [1, 2, 3]


def test_columns_dropped_since_fit_the_dropped_attnums_after_a_restart():
    # a change from before `DROP COLUMN x, DROP COLUMN y`, read after a restart (no previous version)
    now = live((1, "id", INT), (3, "city", TEXT))
    assert resolve_attnums(["id", "x", "city", "y"], [INT, TEXT, TEXT, TEXT], now, [2, 4], None) == [1, 2, 3, 4]
    with pytest.raises(ColumnIdentityError):  # y may be `added`, renamed since
        resolve_attnums(["id", "x", "city", "y"], [INT, TEXT, TEXT, TEXT], [*now, *live((6, "added", TEXT))], [2, 4, 5],
                        None)
    assert resolve_attnums(["id", "x", "city"], [INT, TEXT, TEXT], live((1, "id", INT), (3, "city", TEXT)), [2],
                           None) == [1, 2, 3]
    with pytest.raises(ColumnIdentityError):  # two dropped columns in the gap, one name: which one?
        resolve_attnums(["id", "x", "city"], [INT, TEXT, TEXT], live((1, "id", INT), (4, "city", TEXT)), [2, 3], None)


@pytest.mark.parametrize("names, types, now, dropped, previous", [
    # renamed and added, a row, then the added column dropped and another added before the connector read it
    (["id", "ssn_v2", "note"], [INT, TEXT, TEXT], [(1, "id", INT), (2, "ssn_v2", TEXT), (4, "note2", TEXT)], [3],
     {"id": 1, "ssn": 2}),
    # dropped and added again under the same name: the change may hold either
    (["id", "ssn"], [INT, TEXT], [(1, "id", INT), (3, "ssn", TEXT)], [2], {"id": 1, "ssn": 2}),
    # a name that no longer exists, and dropped columns: a rename or a drop and an add
    (["id", "ssn"], [INT, TEXT], [(1, "id", INT), (3, "x", TEXT)], [2], None),
    # two columns swapped their names since the change
    (["id", "a", "b"], [INT, TEXT, TEXT], [(1, "id", INT), (2, "b", TEXT), (3, "a", TEXT), (5, "c", TEXT)], [4], None),
    # a new name whose catalog column is named otherwise: the table changed again since
    (["id", "ssn", "x"], [INT, TEXT, TEXT], [(1, "id", INT), (2, "ssn", TEXT), (4, "y", TEXT)], [3],
     {"id": 1, "ssn": 2}),
])
def test_what_is_not_conclusive_stops(names, types, now, dropped, previous):
    with pytest.raises(ColumnIdentityError):
        resolve_attnums(names, types, live(*now), dropped, previous)


from cdc.transform.column_bindings import problems  # noqa: E402
from cdc.config import load_pipeline_text  # noqa: E402

PIPELINE = """\
version: 1
pipeline: shop
source:
  postgres: postgresql://cdc@db/shop
  tables: [public.customers]
kafka:
  bootstrap_servers: k:9092
privacy:
  tables:
    public.customers:
      exclude: [{excluded}]
"""


def _problems(excluded: str, now: dict[int, str], last_columns: dict[str, int], oid: int = 7) -> list[str]:
    config = load_pipeline_text(PIPELINE.format(excluded=excluded), "shop.yaml", env={})
    ref = next(iter(config.source.tables))
    return problems(config, ref, 7, now, {"oid": oid, "columns": last_columns})


def test_a_rule_whose_name_now_names_another_column_is_refused_at_start():
    last = {"id": 1, "ssn": 2}
    renamed_and_readded = {1: "id", 2: "ssn_v2", 3: "ssn"}
    [message] = _problems("ssn", renamed_and_readded, last)
    assert message.startswith("shop.yaml:11: column ssn of public.customers was renamed to ssn_v2 since cdc last ran")
    assert _problems("ssn_v2", renamed_and_readded, last) == []  # the file follows the rename
    assert _problems("ssn, ssn_v2", renamed_and_readded, last) == []
    assert _problems("ssn", {1: "id", 3: "ssn"}, last) == []  # dropped and added again: nothing lives on
    assert _problems("ssn", renamed_and_readded, last, oid=8) == []  # another table of that name


def test_a_renamed_column_is_fixed_by_its_place_between_columns_matched_by_name():
    # read after RENAME ssn TO ssn_v2, ADD note, DROP note, ADD note2 (a dropped column: no prefix rule)
    now = live((1, "id", INT), (2, "ssn_v2", TEXT), (3, "phone", TEXT), (4, "city", TEXT), (6, "note2", TEXT))
    assert resolve_attnums(["id", "ssn", "phone", "city"], [INT, TEXT, TEXT, TEXT], now, [5], None) == [1, 2, 3, 4]
    with pytest.raises(ColumnIdentityError):  # the last column: ssn_v2, the dropped #5, or note2?
        resolve_attnums(["id", "phone", "city", "ssn"], [INT, TEXT, TEXT, TEXT],
                        live((1, "id", INT), (2, "phone", TEXT), (3, "city", TEXT), (4, "ssn_v2", TEXT),
                             (6, "note2", TEXT)), [5], None)


def test_a_row_filter_column_whose_name_now_names_another_column_is_refused_at_start():
    text = PIPELINE.replace("      exclude: [{excluded}]\n", '      rows: "active is not false"\n')
    config = load_pipeline_text(text, "shop.yaml", env={})
    ref = next(iter(config.source.tables))
    last = {"oid": 7, "columns": {"id": 1, "active": 2}}
    [message] = problems(config, ref, 7, {1: "id", 2: "enabled", 3: "active"}, last)
    assert message.startswith("shop.yaml:11: column active of public.customers was renamed to enabled since cdc last ran")
    assert "The rule (row filter) meant enabled" in message
