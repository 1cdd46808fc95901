"""`cdc verify`'s pure parts: the comparison's counts, the runs a control record ends, and the
summary per table (the read-back through each backend is tests/integration/test_verify_values.py)."""

from __future__ import annotations

import orjson

from cdc.events.schema import HEADER, Column, TableSchema
from cdc.sink.verification import compare
from cdc.verify.digests import key_digest, row_digest


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
