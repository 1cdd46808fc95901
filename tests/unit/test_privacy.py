"""Privacy rules as pure functions: masks, row filters (PostgreSQL's semantics), update transitions,
the published schema, compilation against catalog columns, pushdown decisions, config errors."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import pytest

from cdc.config import load_pipeline_text
from cdc.errors import ConfigError
from cdc.events.build import RowEvent, update_events
from cdc.events.schema import Column, TableSchema
from cdc.transform.privacy import (
    REDACTED,
    Hasher,
    Mask,
    TablePolicy,
    TableRules,
    compile_policy,
    plan_pushdown,
    update_transition,
)
from cdc.transform.rowfilter import FilterError, RowFilter

KEY = "0123456789abcdef-secret"


@dataclass(frozen=True)
class Col:
    name: str
    type: str = "text"
    kind: str = "text"
    array: bool = False
    builtin: bool = True
    toastable: bool = True


COLUMNS = [Col("id", "bigint", "bigint", toastable=False), Col("email"), Col("phone"), Col("ssn"),
           Col("active", "boolean", "boolean", toastable=False), Col("score", "numeric", "numeric"),
           Col("mood", "mood", "text", builtin=False), Col("level", "integer", "integer", builtin=False)]
TYPES = {c.name: (c.type, c.array) for c in COLUMNS}


def where(*path):
    return "p.yaml:9" + "".join(f"/{p}" for p in path)


def compiled(rules: TableRules, identity: str = "f", key=("id",)) -> TablePolicy:
    policy, problems = compile_policy("public.c", rules, COLUMNS, key, identity, Hasher(KEY, "k1"), where)
    assert problems == []
    schema = TableSchema("public", "c", tuple(Column(c.name, c.type, c.kind) for c in COLUMNS), key)
    return policy.bind(schema)


RULES = TableRules(include=None, exclude=("ssn",), masks={"email": Mask("hash"), "phone": Mask("keep_last", 4)},
                   rows="active is not false")


# ---- masks -----------------------------------------------------------------------------------------

def test_mask_forms():
    h = Hasher(KEY, "k2")
    assert Mask("hash").apply("ada@example.com", h) == "k2:" + hmac.new(
        KEY.encode(), b"ada@example.com", hashlib.sha256).hexdigest()
    assert Mask("hash").apply(42, h) == Hasher(KEY, "k2")("42")  # the value's text
    assert Mask("keep_last", 4).apply("555-123-4567", h) == "********4567"
    assert Mask("keep_first", 1).apply("Ada", h) == "A**"
    assert Mask("keep_first", 5).apply("Ada", h) == "Ada"
    assert Mask("keep_last", 0).apply("Ada", h) == "***"
    assert Mask("redact").apply({"a": 1}, h) == REDACTED
    assert Mask("null").apply("x", h) is None
    for kind in ("hash", "keep_first", "redact", "null"):
        assert Mask(kind, 1).apply(None, h) is None
    assert KEY not in repr(h)


def test_publish_row_drops_masks_and_filters():
    policy = compiled(RULES)
    row = {"id": 1, "email": "a@x", "phone": "5551234", "ssn": "123", "active": None, "score": "1.5", "mood": "ok"}
    out = policy.publish_row(row)
    assert out == {"id": 1, "email": Hasher(KEY, "k1")("a@x"), "phone": "***1234", "active": None, "score": "1.5",
                   "mood": "ok"}
    assert policy.publish_row({**row, "active": False}) is None
    assert policy.map_row({"id": 1}) == {"id": 1}


def test_include_drops_columns_added_later():
    policy = compiled(TableRules(include=("id", "email"), exclude=(), masks={}, rows=None))
    assert policy.map_row({"id": 1, "email": "e", "phone": "p", "added_later": "x"}) == {"id": 1, "email": "e"}
    assert policy.fate("added_later") == "exclude" and policy.fate("email") == "pass"


def test_published_schema_describes_columns_as_published():
    policy = compiled(RULES)
    schema = TableSchema("public", "c", (
        Column("id", "bigint", "bigint", nullable=False), Column("email", "varchar(20)", "text", nullable=False),
        Column("phone", "text", "text", default="5550000"), Column("ssn", "text", "text"),
        Column("active", "boolean", "boolean")), ("id",))
    published = policy.published_schema(schema)
    assert [c.name for c in published.columns] == ["id", "email", "phone", "active"]
    email = published.column("email")
    assert (email.type, email.kind, email.nullable) == ("text", "text", False)
    assert published.column("phone").default == "***0000"  # old rows' value, masked like the rows
    assert published.key == ("id",)


# ---- row filters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, row, expected", [
    ("active is not false", {"active": None}, True),
    ("active is not false", {"active": False}, False),
    ("active", {"active": None}, False),  # NULL drops the row, as in a publication
    ("score > 1.5", {"score": "1.50"}, False),
    ("score >= '1.5'", {"score": "1.50"}, True),
    ("score > 100", {"score": "NaN"}, True),  # NaN sorts above every number in PostgreSQL
    ("score <> 1", {"score": None}, False),
    ("id in (1, 2, null)", {"id": 3}, False),
    ("not id in (1, 2, null)", {"id": 3}, False),  # NULL, not true
    ("id in (1, 2)", {"id": "2"}, True),  # bigint beyond 2^53 travels as a string
    ("id between 1 and 3 and email like 'a%'", {"id": 2, "email": "ab"}, True),
    ("email like 'a\\_%'", {"email": "ab"}, False),
    ("email = 'x' or active", {"email": None, "active": True}, True),
    ("email = 'x' or active", {"email": None, "active": False}, False),
    ("level in (1, 2.5)", {"level": 2}, False),  # a domain compares as its base type
    ("email is not null", {"email": None}, False),
    ("email not like 'a%'", {"email": "ab"}, False),
])
def test_filter_semantics(text, row, expected):
    assert RowFilter.parse(text).bind(TYPES)(row) is expected


@pytest.mark.parametrize("text, message", [
    ("lower(email) = 'a'", "a function call"),
    ("id > ", "does not parse"),
    ("id = 1; drop table c", "without ';'"),
    ("email > 'a'", "collation"),
    ("id = (select 1)", "subquery"),
    ("nope = 1", "names column nope"),
    ("id = 'abc'", "'abc' is not a bigint value"),
    ("email = 1", "compares text with integer"),
    ("t.id = 1", "bare column name"),
    ("active = 1", "compares boolean with integer"),
    ("mood = 'happy'", "names column mood of type mood"),
    ("email like 'a\\'", "must not end with the escape character"),
    ("score = ratio", "names column ratio"),
])
def test_filter_refusals(text, message):
    with pytest.raises(FilterError, match=message) as exc:
        RowFilter.parse(text).bind(TYPES)
    assert "\n" not in str(exc.value)


def test_filter_sql_for_a_publication_folds_and_quotes_names():
    assert RowFilter.parse('Active IS NOT FALSE and "Line No" > 2').sql() == 'NOT "active" IS FALSE AND "Line No" > 2'


def test_missing_column_error_names_column_not_values():
    policy = compiled(RULES)
    with pytest.raises(FilterError, match="needs column active") as exc:
        policy.matches({"id": 1, "email": "secret-value"})
    assert "secret-value" not in str(exc.value)


# ---- updates under a filter ------------------------------------------------------------------------

def test_update_transitions():
    assert update_transition(True, True) == "u"
    assert update_transition(False, True) == "c"
    assert update_transition(True, False) == "d"
    assert update_transition(False, False) is None


def test_apply_follows_publication_semantics_and_keeps_one_entry_per_event():
    policy = compiled(RULES)
    old = {"id": 1, "email": "e", "phone": "1234", "ssn": "s", "active": False, "score": None, "mood": None}
    new = {**old, "active": True}
    moved_in = policy.apply(update_events(dict(new), dict(old), ("id",)))
    assert [(e.op, e.before) for e in moved_in] == [("c", None)]
    assert "ssn" not in moved_in[0].after
    moved_out = policy.apply(update_events(dict(old), dict(new), ("id",)))
    assert [(e.op, e.after, e.key) for e in moved_out] == [("d", None, {"id": 1})]
    assert policy.apply(update_events(dict(old), dict(old), ("id",))) == [None]
    # A key change out of the filter: the delete of the old key stays, the create is dropped.
    rekeyed = policy.apply(update_events({**old, "id": 2}, dict(new), ("id",)))
    assert [e.op if e else None for e in rekeyed] == ["d", None]


def test_hashed_key_is_masked_in_key_before_and_after():
    rules = TableRules(include=None, exclude=(), masks={"email": Mask("hash")}, rows=None)
    policy = compiled(rules, key=("email",))
    events = policy.apply([RowEvent("d", {"email": "k@x"}, None, {"email": "k@x"})])
    digest = Hasher(KEY, "k1")("k@x")
    assert events[0].key == {"email": digest} and events[0].before == {"email": digest}


# ---- compilation and pushdown ------------------------------------------------------------------------

def test_compile_reports_every_problem_with_its_place():
    rules = TableRules(include=None, exclude=("sn", "id"), masks={"id": Mask("redact"), "active": Mask("keep_first", 1)},
                       rows="score > 1")
    policy, problems = compile_policy("public.c", rules, COLUMNS, ("id",), "d", None, where)
    assert policy is None
    text = "\n".join(problems)
    assert "p.yaml:9/exclude: column sn does not exist in public.c; did you mean 'ssn'?" in text
    assert "key column id cannot be excluded" in text
    assert "key column id can only be masked with hash" in text
    assert "keep_first applies to text columns; active is boolean" in text
    assert "p.yaml:9/rows: public.c: the row filter names column(s) score outside the primary key" in text


def test_pushdown_never_breaks_application_writes():
    policy = compiled(RULES)
    full = plan_pushdown(policy, COLUMNS, ("id",), "f", 160000)
    assert full.columns is None and "REPLICA IDENTITY FULL" in full.columns_reason
    assert full.where == 'NOT "active" IS FALSE'
    key_only = compiled(TableRules(include=None, exclude=("ssn",), masks={}, rows="id > 0"), identity="d")
    default = plan_pushdown(key_only, COLUMNS, ("id",), "d", 160000)
    assert default.columns == ("id", "email", "phone", "active", "score", "mood", "level") and default.where == '"id" > 0'
    old = plan_pushdown(policy, COLUMNS, ("id",), "f", 140000)
    assert old.columns is None and old.where is None and "15+" in old.rows_reason
    user_type = compiled(TableRules(include=None, exclude=(), masks={}, rows="level > 2"))  # a domain over integer
    assert "user-defined" in plan_pushdown(user_type, COLUMNS, ("id",), "f", 160000).rows_reason
    blocked = plan_pushdown(policy, COLUMNS, ("id",), "f", 160000, "publication p is FOR ALL TABLES, ...")
    assert blocked.where is None and "FOR ALL TABLES" in blocked.rows_reason


# ---- configuration ---------------------------------------------------------------------------------

BASE = """\
version: 1
pipeline: shop
source:
  postgres: postgresql://cdc@db/shop
  tables: [public.customers, public.orders]
kafka:
  bootstrap_servers: k:9092
"""


def problems_of(text: str, env=None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_pipeline_text(BASE + text, "shop.yaml", env=env or {})
    return exc.value.problems


def test_config_accepts_the_documented_form():
    config = load_pipeline_text(BASE + """\
privacy:
  hash_key: ${CDC_HASH_KEY}
  tables:
    public.customers:
      exclude: [ssn, avatar]
      mask:
        email: hash
        phone: {keep_last: 4}
        full_name: {keep_first: 1}
        notes: redact
        prefs: null
      rows: "active is not false"
    public.orders:
      include: [id, customer_id, total, created_at]
""", "shop.yaml", env={"CDC_HASH_KEY": KEY})
    from cdc.config import TableRef

    rules = config.privacy.tables[TableRef("public", "customers")].rules()
    assert rules.masks["prefs"] == Mask("null") and rules.masks["phone"] == Mask("keep_last", 4)
    assert config.privacy_where(TableRef("public", "customers"), "mask", "email") == "shop.yaml:14"
    assert KEY not in repr(config)


def test_config_errors_name_file_and_line_and_never_the_key():
    problems = problems_of("""\
privacy:
  hash_key: short-key
  tables:
    public.customers:
      include: [id]
      exclude: [ssn]
    public.orders:
      exclude: [a]
      mask: {a: hash, b: {keep: 2}}
      rows: "lower(x) = 'a'"
    public.missing:
      exclude: [a]
""")
    text = "\n".join(problems)
    assert "shop.yaml:12: privacy.tables[public.customers]: a table takes include or exclude, not both" in text
    assert "shop.yaml:16: privacy.tables[public.orders].mask.b: a mask is hash, redact, null" in text
    assert "shop.yaml:17: privacy.tables[public.orders].rows: row filter uses a function call" in text
    assert "shop.yaml:18: privacy.tables: unknown table public.missing: not in source.tables" in text
    assert "shop.yaml:9: privacy.hash_key: must have at least 16 characters" in text
    assert "short-key" not in text


def test_config_requires_a_hash_key_when_hashing():
    problems = problems_of("privacy:\n  tables:\n    public.orders:\n      mask: {a: hash}\n")
    assert problems == ["shop.yaml:9: privacy: hash_key is required: public.orders hash columns (e.g. hash_key: ${CDC_HASH_KEY})"]
    problems = problems_of("privacy:\n  hash_key: abc\n  tables: {}\n")
    assert "at least 16 characters" in problems[0] and "abc" not in problems[0]


def test_config_refuses_a_column_excluded_and_masked():
    problems = problems_of("privacy:\n  tables:\n    public.orders:\n      exclude: [a]\n      mask: {a: redact}\n")
    assert problems == ["shop.yaml:11: privacy.tables[public.orders]: column(s) a both excluded and masked"]


def test_a_stored_publication_filter_is_compared_as_a_tree():
    from cdc.source.postgres.publication import _same_filter

    assert _same_filter("(active IS NOT FALSE)", RowFilter.parse("active is not false").sql())
    assert _same_filter("((email)::text = 'x'::text)", RowFilter.parse("email = 'x'").sql())
    assert not _same_filter("(id > 1)", RowFilter.parse("id > 0").sql())
    assert not _same_filter("(((a > 1) OR (b = 2)) AND c)", RowFilter.parse("a > 1 or b = 2 and c").sql())
    assert not _same_filter(None, '"id" > 0') and _same_filter(None, None)


def test_a_partial_update_lists_only_published_unchanged_columns():
    from cdc.events.build import UNCHANGED

    policy = compiled(TableRules(include=None, exclude=("ssn",), masks={"email": Mask("redact")}, rows=None), identity="d")
    built = update_events({"id": 1, "email": UNCHANGED, "ssn": UNCHANGED, "phone": "p"}, None, ("id",))
    (event,) = policy.apply(built)
    assert event.op == "u" and event.unchanged == ("email",)
    assert event.after == {"id": 1, "phone": "p"}
