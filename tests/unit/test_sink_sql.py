"""Generated SQL and value converters of the sink targets, without any database."""

from __future__ import annotations

import base64
import json
import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.errors import SinkError
from cdc.events.codec import JsonText
from cdc.events.schema import Column, TableSchema
from cdc.sink.backends import PostgresDialect, SqliteDialect
from cdc.sink.values import (
    postgres_verbatim,
    sqlite_verbatim,
    ValueProblem,
    dump_json,
    pg_array_literal,
    postgres_converter,
    sqlite_converter,
)

PG = PostgresDialect()
LITE = SqliteDialect()

# (column, PostgreSQL DDL type, SQLite DDL type): every kind, arrays, and a non-builtin enum.
EVERY_KIND = [
    (Column("id", "bigint", "bigint", nullable=False), "bigint", "INTEGER"),
    (Column("flag", "boolean", "boolean"), "boolean", "INTEGER"),
    (Column("small", "smallint", "smallint"), "smallint", "INTEGER"),
    (Column("int", "integer", "integer"), "integer", "INTEGER"),
    (Column("big", "bigint", "bigint"), "bigint", "INTEGER"),
    (Column("amount", "numeric(30,10)", "numeric"), "numeric(30,10)", "TEXT"),
    (Column("ratio", "real", "real"), "real", "REAL"),
    (Column("score", "double precision", "double"), "double precision", "REAL"),
    (Column("name", "character varying(50)", "text"), "character varying(50)", "TEXT"),
    (Column("code", '"char"', "text"), '"char"', "TEXT"),
    (Column("blob", "bytea", "bytea"), "bytea", "BLOB"),
    (Column("day", "date", "date"), "date", "TEXT"),
    (Column("at", "time(3) without time zone", "time"), "time(3) without time zone", "TEXT"),
    (Column("attz", "time with time zone", "timetz"), "time with time zone", "TEXT"),
    (Column("ts", "timestamp without time zone", "timestamp"), "timestamp without time zone", "TEXT"),
    (Column("tstz", "timestamp(6) with time zone", "timestamptz"), "timestamp(6) with time zone", "TEXT"),
    (Column("span", "interval year to month", "interval"), "interval year to month", "TEXT"),
    (Column("uid", "uuid", "uuid"), "uuid", "TEXT"),
    (Column("doc", "json", "json"), "json", "TEXT"),
    (Column("docb", "jsonb", "jsonb"), "jsonb", "TEXT"),
    (Column("ints", "integer[]", "integer", array=True), "integer[]", "TEXT"),
    (Column("names", "character varying(10)[]", "text", array=True), "character varying(10)[]", "TEXT"),
    (Column("blobs", "bytea[]", "bytea", array=True), "bytea[]", "TEXT"),
    (Column("mood", "mood", "text", builtin=False), "text", "TEXT"),
    (Column("moods", "public.mood[]", "text", array=True, builtin=False), "text[]", "TEXT"),
]
EVERY_KIND_SCHEMA = TableSchema("public", "every", tuple(c for c, _, _ in EVERY_KIND), ("id",))

ORDER_ITEMS = TableSchema(
    "shop",
    "Order Items",
    (
        Column("order_id", "bigint", "bigint", nullable=False),
        Column("Line No", "integer", "integer", nullable=False),
        Column("Qty", "numeric(12,2)", "numeric"),
        Column('say "hi"', "text", "text"),
    ),
    ("order_id", "Line No"),
)


# -- identifiers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", [PG, LITE], ids=["postgres", "sqlite"])
def test_identifiers_are_quoted_keeping_case_spaces_and_quotes(dialect):
    assert dialect.quote("Order Items") == '"Order Items"'
    assert dialect.quote("MixedCase") == '"MixedCase"'
    assert dialect.quote('say "hi"') == '"say ""hi"""'
    assert dialect.quote("select") == '"select"'


def test_postgres_doubles_percent_for_psycopg_but_sqlite_does_not():
    assert PG.quote("share %") == '"share %%"'
    assert LITE.quote("share %") == '"share %"'


# -- DDL --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column,pg_type,sqlite_type", EVERY_KIND, ids=[c.name for c, _, _ in EVERY_KIND])
def test_column_types(column, pg_type, sqlite_type):
    assert PG.column_type(column) == pg_type
    assert LITE.column_type(column) == sqlite_type


def test_create_table_postgres_keeps_builtin_types_and_makes_only_keys_not_null():
    sql = PG.create_table("every", EVERY_KIND_SCHEMA)
    lines = [line.strip().rstrip(",") for line in sql.splitlines()]
    assert lines[0] == 'CREATE TABLE IF NOT EXISTS "every" ('
    assert lines[1] == '"id" bigint NOT NULL'
    assert '"amount" numeric(30,10)' in lines
    assert '"tstz" timestamp(6) with time zone' in lines
    assert '"moods" text[]' in lines
    assert '"code" "char"' in lines
    assert 'PRIMARY KEY ("id")' in lines
    assert sql.count("NOT NULL") == 1


def test_create_table_sqlite_composite_key():
    sql = LITE.create_table("Order Items", ORDER_ITEMS)
    assert sql == (
        'CREATE TABLE IF NOT EXISTS "Order Items" (\n'
        '  "order_id" INTEGER NOT NULL,\n'
        '  "Line No" INTEGER NOT NULL,\n'
        '  "Qty" TEXT,\n'
        '  "say ""hi""" TEXT,\n'
        '  PRIMARY KEY ("order_id", "Line No")\n'
        ")"
    )


def test_add_column_is_nullable():
    col = Column("note", "text", "text", nullable=False)
    assert PG.add_column("Order Items", col) == 'ALTER TABLE "Order Items" ADD COLUMN "note" text'
    assert LITE.add_column("Order Items", col) == 'ALTER TABLE "Order Items" ADD COLUMN "note" TEXT'


@pytest.mark.parametrize(
    "bad_type",
    ["text); DROP TABLE x; --", "text DEFAULT now()", "integer CHECK (false)", "text COLLATE \"C\"", ""],
)
def test_postgres_rejects_type_text_that_is_not_a_type_name(bad_type):
    with pytest.raises(SinkError, match='column "c"'):
        PG.column_type(Column("c", bad_type, "text"))


def test_schema_without_key_is_refused():
    schema = TableSchema("public", "logs", (Column("msg", "text", "text"),), ())
    with pytest.raises(SinkError, match='"logs".*no key'):
        PG.plan("logs", schema)


# -- DML --------------------------------------------------------------------------------------------


def test_upsert_composite_key_postgres():
    cols = tuple(c.name for c in ORDER_ITEMS.columns)
    assert PG.upsert("Order Items", cols, ORDER_ITEMS.key) == (
        'INSERT INTO "Order Items" ("order_id", "Line No", "Qty", "say ""hi""") VALUES (%s, %s, %s, %s) '
        'ON CONFLICT ("order_id", "Line No") DO UPDATE SET "Qty" = EXCLUDED."Qty", '
        '"say ""hi""" = EXCLUDED."say ""hi"""'
    )


def test_upsert_composite_key_sqlite():
    cols = tuple(c.name for c in ORDER_ITEMS.columns)
    assert LITE.upsert("Order Items", cols, ORDER_ITEMS.key) == (
        'INSERT INTO "Order Items" ("order_id", "Line No", "Qty", "say ""hi""") VALUES (?, ?, ?, ?) '
        'ON CONFLICT ("order_id", "Line No") DO UPDATE SET "Qty" = EXCLUDED."Qty", '
        '"say ""hi""" = EXCLUDED."say ""hi"""'
    )


@pytest.mark.parametrize("dialect,mark", [(PG, "%s"), (LITE, "?")], ids=["postgres", "sqlite"])
def test_all_key_table_does_nothing_on_conflict(dialect, mark):
    assert dialect.upsert("Tags", ("post_id", "tag"), ("post_id", "tag")) == (
        f'INSERT INTO "Tags" ("post_id", "tag") VALUES ({mark}, {mark}) ON CONFLICT ("post_id", "tag") DO NOTHING'
    )


def test_delete_and_truncate():
    assert PG.delete("Order Items", ("order_id", "Line No")) == (
        'DELETE FROM "Order Items" WHERE "order_id" = %s AND "Line No" = %s'
    )
    assert LITE.delete("Order Items", ("order_id", "Line No")) == (
        'DELETE FROM "Order Items" WHERE "order_id" = ? AND "Line No" = ?'
    )
    assert PG.truncate("Order Items") == 'TRUNCATE TABLE "Order Items"'
    assert LITE.truncate("Order Items") == 'DELETE FROM "Order Items"'


@pytest.mark.parametrize("dialect", [PG, LITE], ids=["postgres", "sqlite"])
def test_positions_table(dialect):
    ddl = dialect.create_positions()
    for name in ("consumer", "topic", "partition", "kafka_offset", "commit_lsn", "lsn", "seq", "system_id",
                 "timeline", "updated_at"):
        assert f'"{name}"' in ddl
    assert 'PRIMARY KEY ("consumer", "topic", "partition")' in ddl
    assert dialect.insert_position().endswith("ON CONFLICT DO NOTHING")
    # compare-and-set: the WHERE clause holds the key and the position last seen
    where = dialect.update_position().split(" WHERE ")[1]
    for name in ("consumer", "topic", "partition", "kafka_offset", "commit_lsn", "lsn", "seq"):
        assert f'"{name}" = ' in where


def test_partial_rows_update_only_their_columns_grouped_by_column_set():
    plan = LITE.plan("t", SCHEMA_FOR_PARTIAL)
    updates = plan.update_params([
        {"id": 1, "name": "a"},
        {"id": 2, "name": "b"},
        {"id": 3, "notes": "n", "name": "c"},
        {"id": 4},  # only the key: nothing to update
    ])
    assert updates == [
        ('UPDATE "t" SET "name" = ? WHERE "id" = ?', [("a", 1), ("b", 2)]),
        ('UPDATE "t" SET "name" = ?, "notes" = ? WHERE "id" = ?', [("c", "n", 3)]),
    ]


def test_plan_orders_parameters_like_columns():
    plan = PG.plan("Order Items", ORDER_ITEMS)
    row = {"Qty": "3.50", "Line No": 2, "order_id": "9223372036854775807", 'say "hi"': None, "extra": 1}
    # A numeric's text as PostgreSQL printed it is bound as it is: the server reads it as the Decimal.
    assert plan.upsert_params([row]) == [(9223372036854775807, 2, "3.50", None)]
    assert plan.upsert_params([dict(row, Qty="35E-1")]) == [(9223372036854775807, 2, Decimal("3.5"), None)]
    assert plan.delete_params([{"order_id": 5, "Line No": 2}]) == [(5, 2)]


# -- values: JSON -----------------------------------------------------------------------------------


def test_dump_json_keeps_decimal_digits_and_is_compact():
    text = '{"price": 12345678901234567890.123456789012345678901, "tiny": 1E-30, "n": [1, -0.0, true, null], "s": "é\\"\\n"}'
    value = json.loads(text, parse_float=Decimal)
    out = dump_json(value)
    assert out == '{"price":12345678901234567890.123456789012345678901,"tiny":1E-30,"n":[1,-0.0,true,null],"s":"é\\"\\n"}'
    assert json.loads(out, parse_float=Decimal) == value


@pytest.mark.parametrize("bad", [float("nan"), Decimal("Infinity"), {1: "x"}, {"a": object()}])
def test_dump_json_refuses_values_without_json_form(bad):
    with pytest.raises(ValueProblem):
        dump_json(bad)


def test_jsonb_converters_with_big_decimal():
    value = json.loads('{"big": 3.14159265358979323846264338327950288}', parse_float=Decimal)
    col = Column("doc", "jsonb", "jsonb")
    assert postgres_converter(col)(value) == '{"big":3.14159265358979323846264338327950288}'
    assert sqlite_converter(col)(value) == '{"big":3.14159265358979323846264338327950288}'
    # a JSON string value is JSON text too, not the bare string
    assert postgres_converter(col)("hi") == '"hi"'


# -- values: scalars --------------------------------------------------------------------------------


def test_numeric_exact_to_40_digits():
    text = "123456789012345678901234567890.1234567890"
    col = Column("n", "numeric", "numeric")
    assert postgres_converter(col)(text) == Decimal(text)
    assert str(postgres_converter(col)(text)) == text
    assert sqlite_converter(col)(text) == text
    assert sqlite_converter(col)("12.50") == "12.50"  # trailing zero kept: text as PostgreSQL printed it
    assert postgres_converter(col)("NaN").is_nan()
    assert postgres_converter(col)("Infinity") == Decimal("Infinity")


def test_bigint_from_string_and_number():
    col = Column("b", "bigint", "bigint")
    for convert in (postgres_converter(col), sqlite_converter(col)):
        assert convert(str(2**63 - 1)) == 2**63 - 1
        assert convert(str(-(2**63))) == -(2**63)
        assert convert(42) == 42
        assert convert(None) is None
        for bad in ("1_000", " 1", "1.5", "abc", True, 1.5):
            with pytest.raises(ValueProblem):
                convert(bad)


def test_sqlite_refuses_integers_beyond_64_bits():
    with pytest.raises(ValueProblem, match="64-bit"):
        sqlite_converter(Column("b", "numeric", "bigint"))(str(2**63))


def test_bytea_base64_round_trip():
    data = bytes(range(256))
    text = base64.b64encode(data).decode()
    col = Column("b", "bytea", "bytea")
    assert postgres_converter(col)(text) == data
    assert sqlite_converter(col)(text) == data
    with pytest.raises(ValueProblem):
        postgres_converter(col)("not base64!")


def test_floats():
    pg = postgres_converter(Column("r", "real", "real"))
    lite = sqlite_converter(Column("d", "double precision", "double"))
    # PostgreSQL gets decimal text: it rounds once, straight into real or double
    assert pg(Decimal("0.1")) == "0.1"
    assert pg("NaN") == "NaN" and pg("-Infinity") == "-Infinity" and pg(5) == "5"
    assert lite(Decimal("0.1")) == 0.1
    assert math.isnan(lite("NaN")) and lite("Infinity") == math.inf
    with pytest.raises(ValueProblem):
        pg("fast")


def test_boolean_and_strings():
    assert sqlite_converter(Column("b", "boolean", "boolean"))(True) == 1
    assert sqlite_converter(Column("b", "boolean", "boolean"))(False) == 0
    assert postgres_converter(Column("b", "boolean", "boolean"))(False) is False
    ts = "2026-11-26T20:19:10.994151Z"
    assert postgres_converter(Column("t", "timestamp with time zone", "timestamptz"))(ts) == ts
    assert sqlite_converter(Column("t", "timestamp with time zone", "timestamptz"))(ts) == ts
    with pytest.raises(ValueProblem):
        postgres_converter(Column("t", "text", "text"))(12)


def test_non_builtin_postgres_columns_get_the_value_text():
    assert postgres_converter(Column("m", "mood", "text", builtin=False))("happy") == "happy"
    assert postgres_converter(Column("m", "posint", "integer", builtin=False))(7) == "7"
    moods = Column("m", "mood[]", "text", array=True, builtin=False)
    assert postgres_converter(moods)(["happy", None]) == '{"happy",NULL}'


# -- values: arrays ---------------------------------------------------------------------------------


@given(st.lists(st.text()))
def test_sqlite_text_array_is_the_json_text_dump_json_writes(texts):
    """A flat list of strings takes a shortcut to its JSON text: the very text of the general path."""
    convert = sqlite_converter(Column("t", "text[]", "text", array=True))
    assert convert(texts) == "[" + ",".join(json.dumps(t, ensure_ascii=False) for t in texts) + "]"
    assert convert(texts) == dump_json(texts)
    assert convert(texts + ["\ud800"]) == dump_json(texts + ["\ud800"])  # lone surrogates (not from st.text())


@given(st.lists(st.one_of(st.from_regex(r"-?[0-9]{1,20}(\.[0-9]{1,20})?", fullmatch=True), st.text(max_size=8),
                          st.sampled_from(["NaN", "-Infinity", "1e5", " 1", "1.", ".5", "1_0", "1\n2", "١٢"]))))
def test_numeric_texts_bound_as_they_are_are_the_ones_the_converters_keep(values):
    """A batch of numerics is bound as its texts only if each is a decimal the converters accept,
    and keep as that text (SQLite) or read as the same number (PostgreSQL)."""
    column = Column("n", "numeric", "numeric")
    for verbatim in (sqlite_verbatim(column, key=True), postgres_verbatim(column, key=True)):
        if verbatim(values):
            assert [sqlite_converter(column)(v) for v in values] == values
            assert [postgres_converter(column)(v) for v in values] == [Decimal(v) for v in values]
            assert all(v.lstrip("-")[:1].isdigit() and v.isascii() and "\n" not in v for v in values)


def test_postgres_array_literal_quotes_every_element():
    col = Column("t", "text[]", "text", array=True)
    value = ['a"b', "back\\slash", "", "NULL", None, "{x,y}"]
    assert postgres_converter(col)(value) == '{"a\\"b","back\\\\slash","","NULL",NULL,"{x,y}"}'


def test_postgres_array_literal_nested_dimensions_and_kinds():
    assert postgres_converter(Column("i", "integer[]", "integer", array=True))([[1, 2], [3, None]]) == (
        '{{"1","2"},{"3",NULL}}'
    )
    assert postgres_converter(Column("i", "bigint[]", "bigint", array=True))([]) == "{}"
    assert postgres_converter(Column("b", "boolean[]", "boolean", array=True))([True, False]) == '{"t","f"}'
    assert postgres_converter(Column("n", "numeric[]", "numeric", array=True))(["1.50", "NaN"]) == '{"1.50","NaN"}'
    blobs = postgres_converter(Column("b", "bytea[]", "bytea", array=True))
    assert blobs([base64.b64encode(b"\x00\xff").decode()]) == '{"\\\\x00ff"}'


def test_postgres_jsonb_array_is_one_dimensional():
    col = Column("j", "jsonb[]", "jsonb", array=True)
    value = [[1, 2], {"a": Decimal("1.10")}, "s", None]
    assert postgres_converter(col)(value) == '{"[1,2]","{\\"a\\":1.10}","\\"s\\"",NULL}'


def test_pg_array_literal_refuses_non_lists():
    with pytest.raises(ValueProblem):
        pg_array_literal("{1,2}", str)


STRING_ARRAYS = [Column("t", "text[]", "text", array=True), Column("d", "date[]", "date", array=True),
                 Column("b", "box[]", "box", array=True), Column("e", "mood[]", "enum", array=True, builtin=False),
                 Column("j", "jsonb[]", "jsonb", array=True)]


@given(st.lists(st.text()))
def test_arrays_of_strings_are_written_as_their_elements_one_by_one(value):
    # A flat list of strings is joined in one go: the same text as the element-by-element writers give.
    for col in STRING_ARRAYS:
        delimiter = ";" if col.type.startswith("box[") else ","
        element = dump_json if col.kind == "jsonb" else str
        expected = pg_array_literal(value, element, nested=col.kind != "jsonb", delimiter=delimiter)
        assert postgres_converter(col)(value) == expected
        assert sqlite_converter(col)(value) == dump_json(value)


@given(st.lists(st.one_of(st.text(max_size=5), st.none(), st.lists(st.text(max_size=3), max_size=2),
                          st.text(max_size=5).map(JsonText))))
def test_arrays_of_strings_with_nulls_nested_lists_or_str_subclasses_are_written_element_by_element(value):
    # Anything but a flat list of strings (for PostgreSQL: without quotes or backslashes) takes the general writer.
    for col in STRING_ARRAYS[:4]:
        delimiter = ";" if col.type.startswith("box[") else ","
        assert postgres_converter(col)(value) == pg_array_literal(value, str, delimiter=delimiter)
        assert sqlite_converter(col)(value) == dump_json(value)


@given(st.text())
def test_json_text_is_written_as_the_text_it_holds(text):
    for convert in (dump_json, postgres_converter(Column("j", "jsonb", "jsonb")),
                    sqlite_converter(Column("j", "json", "json"))):
        written = convert(JsonText(text))
        assert written == text and type(written) is str


def test_sqlite_arrays_are_json_text_with_bigints_as_numbers():
    col = Column("b", "bigint[]", "bigint", array=True)
    assert sqlite_converter(col)([1, "9223372036854775807", None]) == "[1,9223372036854775807,null]"
    nums = Column("n", "numeric[]", "numeric", array=True)
    assert sqlite_converter(nums)([["1.50"], ["2"]]) == '[["1.50"],["2"]]'


# -- errors never show the value --------------------------------------------------------------------


def test_conversion_error_names_table_column_and_kind_but_not_the_value():
    plan = LITE.plan("Order Items", ORDER_ITEMS)
    with pytest.raises(SinkError) as info:
        plan.upsert_params([{"order_id": 1, "Line No": 1, "Qty": "1.00", 'say "hi"': "ok"},
                            {"order_id": 2, "Line No": 1, "Qty": "SECRET-42", 'say "hi"': "ok"}])
    message = str(info.value)
    assert 'table "Order Items"' in message and 'column "Qty"' in message and "numeric" in message
    assert "SECRET" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_column_in_row_is_an_error():
    plan = PG.plan("Order Items", ORDER_ITEMS)
    with pytest.raises(SinkError, match='no column "Line No"'):
        plan.delete_params([{"order_id": 1}])


SCHEMA_FOR_PARTIAL = TableSchema(
    "public", "t",
    (Column("id", "integer", "integer", nullable=False), Column("name", "text", "text"), Column("notes", "text", "text")),
    ("id",),
)


@pytest.mark.parametrize("old, new, widens", [
    ("smallint", "integer", True), ("integer", "bigint", True), ("bigint", "integer", False),
    ("integer", "numeric(12,2)", True), ("integer", "numeric(10,2)", False), ("bigint", "numeric", True),
    ("numeric(10,2)", "numeric(14,4)", True), ("numeric(10,2)", "numeric(10,4)", False),
    ("numeric(14,4)", "numeric(10,2)", False), ("numeric(10,2)", "numeric", True), ("numeric", "numeric(40,10)", False),
    ("character varying(5)", "text", True), ("character varying(5)", "character varying(9)", True),
    ("character varying(9)", "character varying(5)", False), ("character varying(5)", "character varying", True),
    ("integer", "text", True), ("date", "text", True), ("text", "integer", False),
    ("real", "double precision", True), ("double precision", "real", False),
    ("integer[]", "bigint[]", True), ("integer[]", "bigint", False), ("timestamp without time zone", "timestamp with time zone", False),
])
def test_postgres_alters_a_column_only_to_a_type_that_holds_every_old_value(old, new, widens):
    assert PG.widens(old, new) is widens


def test_sqlite_type_changes_keep_the_affinity_or_go_from_integer_to_text():
    assert LITE.widens("INTEGER", "INTEGER") and LITE.widens("TEXT", "TEXT")  # int -> bigint, varchar -> text...
    assert LITE.widens("INTEGER", "TEXT")
    assert not LITE.widens("TEXT", "INTEGER") and not LITE.widens("REAL", "INTEGER")
    assert LITE.alter_type("t", "c", "TEXT") == [
        'ALTER TABLE "t" ADD COLUMN "c (cdc retype)" TEXT',
        'UPDATE "t" SET "c (cdc retype)" = CAST("c" AS TEXT)',
        'ALTER TABLE "t" DROP COLUMN "c"',
        'ALTER TABLE "t" RENAME COLUMN "c (cdc retype)" TO "c"',
    ]


def test_postgres_alter_type_rename_and_drop_column():
    assert PG.alter_type("t", "c%", "bigint") == ['ALTER TABLE "t" ALTER COLUMN "c%%" TYPE bigint USING "c%%"::bigint']
    assert PG.rename_column("t", "a", "b") == 'ALTER TABLE "t" RENAME COLUMN "a" TO "b"'
    assert LITE.drop_column("t", "a") == 'ALTER TABLE "t" DROP COLUMN "a"'


def test_upsert_writes_null_into_kept_columns_the_source_dropped():
    assert LITE.upsert("t", ("id", "a"), ("id",), nulled=("gone",)) == (
        'INSERT INTO "t" ("id", "a") VALUES (?, ?) ON CONFLICT ("id") DO UPDATE SET "a" = EXCLUDED."a", "gone" = NULL')
    assert LITE.upsert("t", ("id",), ("id",), nulled=("gone",)).endswith('ON CONFLICT ("id") DO UPDATE SET "gone" = NULL')


def test_schema_header_carries_attnum_and_reads_headers_without_it():
    schema = TableSchema("public", "t", (Column("id", "integer", "integer", attnum=1), Column("n", "text", "text")), ("id",))
    decoded = TableSchema.from_json(schema.to_json())
    assert decoded == schema and [c.attnum for c in decoded.columns] == [1, None]
    assert "attnum" not in json.loads(schema.to_json())["columns"][1]
