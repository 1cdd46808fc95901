"""`cdc verify`'s pure parts and its read-back. Read-back, differential: every value of the type
cases, as the connector publishes it, written by a sink into each backend, read back and digested,
gives the connector's digest (cdc.verify.digests). Then the comparison's counts, the runs a control
record ends, and the summary per table."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import orjson
import pytest

from cdc.events.codec import decode_event
from cdc.events.schema import HEADER, Column, TableSchema
from cdc.sink.backends import open_target
from cdc.sink.backends.base import TableChanges
from cdc.sink.backends.readback import read_range
from cdc.sink.verification import compare
from cdc.verify.digests import key_digest, row_digest
from tests.integration.types_cases import CASES

NOT_BUILTIN = {"mood", "pair", "citext", "hstore"}
DOMAINS = {"positive_int": "integer", "positive_int[]": "integer[]", "int_list": "integer[]"}


def column_of(type_: str, kind: str) -> Column:
    type_ = DOMAINS.get(type_, type_)
    base = type_.removesuffix("[]")
    return Column("v", type_, kind, array=type_.endswith("[]"), builtin=base not in NOT_BUILTIN)


def as_published(value, kind: str, array: bool):
    """A case's JSON form as the connector holds it when it digests a row: floats for real/double
    (the psycopg loader's), json/jsonb values as the text PostgreSQL printed (a Fragment)."""
    if kind in ("json", "jsonb"):
        def fragment(v):
            return None if v is None else orjson.Fragment(json.dumps(v, default=str).encode())
        return [fragment(v) for v in value] if array else fragment(value)
    if kind in ("real", "double"):
        return _map(value, lambda v: float(v) if isinstance(v, Decimal) else v)
    return value


def _map(value, f):
    return [_map(v, f) for v in value] if isinstance(value, list) else f(value)


def sink_receives(row: dict, schema: TableSchema) -> dict:
    """The row as the sink's codec hands it to the backend (exact numbers, json values as their text)."""
    event = orjson.dumps({"op": "c", "before": None, "after": row, "source": {
        "commit_lsn": "0/10", "lsn": "0/10", "seq": 0}})
    parsed, _ = decode_event(event, [(HEADER, schema.to_json())])
    return parsed["after"]


def round_trip(target, case_index: int, type_: str, expected, kind: str) -> tuple[str, str]:
    column = column_of(type_, kind)
    published_value = as_published(expected, kind, column.array)
    schema = TableSchema("public", "t", (Column("id", "integer", "integer", nullable=False), column), ("id",))
    table = f"case_{case_index}"
    published = {"id": case_index, "v": published_value}
    target.apply("verify-test", [TableChanges(table, schema, False, [], [sink_receives(published, schema)])], [])
    (back,) = read_range(target, table, schema, None, None)
    # Equal digests, and the texts digested for a failure's message.
    return (row_digest(back), orjson.dumps(back, option=orjson.OPT_SORT_KEYS)), (
        row_digest(published), orjson.dumps(published, option=orjson.OPT_SORT_KEYS))


def cases_for(backend: str):
    for i, (type_, _, expected, kind) in enumerate(CASES):
        if backend == "sqlite" and kind in ("real", "double") and "NaN" in json.dumps(expected, default=str):
            continue  # SQLite stores NaN as NULL (documented in its dialect): not a value it keeps
        yield pytest.param(i, type_, expected, kind, id=f"{i}-{re.sub(r'[^a-z0-9]+', '_', type_)}")


@pytest.mark.parametrize("index, type_, expected, kind", list(cases_for("sqlite")))
def test_every_value_reads_back_from_sqlite_as_published(tmp_path, index, type_, expected, kind):
    with open_target("sqlite:///x", sqlite_path=tmp_path / "t.db") as target:
        back, published = round_trip(target, index, type_, expected, kind)
    assert back == published


@pytest.mark.parametrize("index, type_, expected, kind", list(cases_for("postgres")))
def test_every_value_reads_back_from_postgres_as_published(target_pg, index, type_, expected, kind):
    if kind in ("json", "jsonb"):
        pytest.skip("json/jsonb text is PostgreSQL's own print (jsonb normalizes it): covered end to end")
    with open_target(target_pg) as target:
        back, published = round_trip(target, index, type_, expected, kind)
    assert back == published


def test_compare_counts_missing_extra_and_different_rows_and_leaves_out_excluded_keys():
    rows = [{"id": i, "v": f"row {i}"} for i in range(1, 6)]
    source = {key_digest([r["id"]]): row_digest(r) for r in rows}
    target = [r for r in rows if r["id"] != 2] + [{"id": 9, "v": "extra"}, {"id": 8, "v": "excluded"}]
    target[0] = {"id": 1, "v": "changed"}
    result = compare(source, {key_digest([8])}, target, ("id",))
    assert (result["missing"], result["extra"], result["different"], result["equal"]) == (1, 1, 1, False)
    assert compare(source, set(), rows, ("id",))["equal"]


class _Record:
    def __init__(self, key: bytes | None):
        self.key = key


def test_control_records_end_runs_of_released_events_in_order():
    from cdc.sink.verification import split_at_controls
    from cdc.verify.records import control_key

    rows = [(_Record(b'{"id":1}'), "a"), (_Record(control_key("c1")), "v1"), (_Record(b'{"id":2}'), "b"),
            (_Record(None), "end"), (_Record(control_key("c2")), "v2")]
    runs = split_at_controls(rows)
    assert [([p for _, p in run], control and control.key) for run, control in runs] == [
        (["a"], control_key("c1")), (["b", "end"], control_key("c2")), ([], None)]
    assert split_at_controls(rows[:1]) == [(rows[:1], None)]


def test_a_summary_counts_per_table_and_lists_the_differing_ranges_in_key_order():
    from cdc.verify.results import lines, summarize

    def result(table, lo, hi, missing=0, extra=0, different=0):
        return {"table": table, "lo": lo, "hi": hi, "rows": 10, "target_rows": 10 - missing + extra,
                "missing": missing, "extra": extra, "different": different,
                "equal": not (missing or extra or different)}

    summary = summarize("r1", "pg", ["public.a", "public.b"], [
        result("public.a", [20], None, extra=1), result("public.a", None, [10], missing=2),
        result("public.a", [10], [20]), result("public.b", None, None)])
    a, b = summary["tables"]
    assert (a["ranges"], a["rows"], a["missing"], a["extra"], a["equal"], b["equal"]) == (3, 30, 2, 1, False, True)
    assert [(r["lo"], r["hi"]) for r in a["differing_ranges"]] == [(None, [10]), ([20], None)]
    assert not summary["equal"]
    assert lines(summary)[1:3] == ["  range start up to [10]: 2 missing, 0 extra, 0 different",
                                   "  range after [20] end: 0 missing, 1 extra, 0 different"]


def test_a_reader_that_does_not_compare_passes_a_control_record_moving_only_the_position():
    """A replay, or a transactional sink with dead letters: the record applies no row, and its
    position is stored like an END record's."""
    from types import SimpleNamespace

    from cdc.lsn import format_lsn
    from cdc.sink.assemble import BatchBuilder
    from cdc.verify.records import control_key, control_value

    schema = TableSchema("public", "items", (Column("id", "integer", "integer", nullable=False),), ("id",))

    def record(value: bytes, offset: int, key: bytes) -> SimpleNamespace:
        return SimpleNamespace(topic="t", partition=0, offset=offset, key=key, value=value,
                               headers=[(HEADER, schema.to_json())])

    def source(commit: int) -> dict:
        return {"commit_lsn": format_lsn(commit), "lsn": format_lsn(commit), "seq": 0}

    row = orjson.dumps({"op": "c", "before": None, "after": {"id": 1}, "source": source(100)})
    control = control_value(source(200), 0, {"request": "r", "chunk": "c", "rows": {}})
    builder = BatchBuilder({"t": "items"}, {}, {})
    assert builder.add(record(row, 0, b'{"id":1}')) and builder.add(record(control, 1, control_key("c")))
    (changes,), (progress,) = builder.take()
    assert changes.upserts == [{"id": 1}] and progress.offset == 1 and progress.position.commit_lsn == 200
