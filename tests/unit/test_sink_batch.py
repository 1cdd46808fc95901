"""Pure sink logic: collapsing events per key (partial rows), source history, stored offsets."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.errors import SourceHistoryError
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events.schema import HEADER as SCHEMA_HEADER
from cdc.events.schema import Column, TableSchema
from cdc.lsn import Position, format_lsn
from cdc.sink.assemble import BatchBuilder, parse_ahead
from cdc.sink.consume import share_headers, stored_offset_problem
from cdc.sink.guards import history_problem
from cdc.sink.backends import PartitionProgress

ITEMS = TableSchema(
    "public", "items",
    (Column("id", "integer", "integer", nullable=False), Column("name", "text", "text"), Column("notes", "text", "text")),
    ("id",),
)
A1 = SourceOrigin("111", 1, 0)
offsets = iter(range(10**6))


def message(op: str, commit: int, row: dict, *, unchanged: list[str] | None = None, origin: SourceOrigin | None = A1):
    event = {"op": op, "before": row if op == "d" else None, "after": None if op in ("d", "t") else row,
             "source": {"commit_lsn": format_lsn(commit), "lsn": format_lsn(commit), "seq": 0}}
    if unchanged:
        event["unchanged"] = unchanged
    headers = [(SCHEMA_HEADER, ITEMS.to_json())] + ([(ORIGIN_HEADER, origin.to_json())] if origin else [])
    return SimpleNamespace(topic="t", partition=0, offset=next(offsets), value=json.dumps(event).encode(), headers=headers)


def collapse(*messages, positions=None, **kw):
    builder = BatchBuilder({"t": "items"}, positions or {}, {}, **kw)
    for m in messages:
        builder.add(m)
    (changes,), progress = builder.take()
    return changes, progress


def test_full_row_then_partial_is_the_full_row_with_the_partial_values():
    changes, _ = collapse(message("c", 1, {"id": 1, "name": "a", "notes": "long"}),
                          message("u", 2, {"id": 1, "name": "b"}, unchanged=["notes"]))
    assert changes.upserts == [{"id": 1, "name": "b", "notes": "long"}] and changes.updates == []


def test_partials_alone_merge_into_one_update_of_the_present_columns():
    changes, _ = collapse(message("u", 1, {"id": 1, "name": "a"}, unchanged=["notes"]),
                          message("u", 2, {"id": 1, "notes": "n"}, unchanged=["name"]))
    assert changes.upserts == [] and changes.updates == [{"id": 1, "name": "a", "notes": "n"}]


def test_partial_after_a_delete_keeps_the_delete_and_updates_no_invented_row():
    changes, _ = collapse(message("d", 1, {"id": 1}), message("u", 2, {"id": 1, "name": "b"}, unchanged=["notes"]))
    assert changes.deletes == [{"id": 1}] and changes.upserts == []
    assert changes.updates == [{"id": 1, "name": "b"}]  # finds no row after the delete: reported


def test_full_row_or_delete_or_truncate_after_a_partial_replaces_it():
    changes, _ = collapse(message("u", 1, {"id": 1, "name": "a"}, unchanged=["notes"]),
                          message("c", 2, {"id": 1, "name": "x", "notes": "y"}),
                          message("u", 3, {"id": 2, "name": "a"}, unchanged=["notes"]),
                          message("d", 4, {"id": 2}))
    assert changes.updates == [] and changes.upserts == [{"id": 1, "name": "x", "notes": "y"}]
    assert changes.deletes == [{"id": 2}]
    changes, _ = collapse(message("u", 5, {"id": 1, "name": "a"}, unchanged=["notes"]), message("t", 6, {}))
    assert changes.truncate and changes.updates == []


def stored(commit: int, origin=("111", 1), offset: int = 9) -> dict:
    return {("t", 0): PartitionProgress("t", 0, offset, Position(commit, commit, 0), origin)}


def test_history_a_later_timeline_that_branched_after_what_was_applied_continues():
    _, (p,) = collapse(message("c", 0x600, {"id": 1, "name": "a", "notes": None}, origin=SourceOrigin("111", 2, 0x500)),
                       positions=stored(0x400))
    assert p.origin == ("111", 2) and p.position.commit_lsn == 0x600


@pytest.mark.parametrize("origin, words", [
    (SourceOrigin("222", 1, 0), "another database cluster"),
    (SourceOrigin("111", 2, 0x400), "past the start of the new"),  # the commit at 0/400 is not in timeline 2
    (SourceOrigin("111", 2, 0x300), "past the start of the new"),
])
def test_history_other_cluster_or_a_fork_before_the_applied_position_is_refused(origin, words):
    with pytest.raises(SourceHistoryError, match=words):
        collapse(message("c", 0x900, {"id": 1, "name": "a", "notes": None}, origin=origin), positions=stored(0x400))
    with pytest.raises(SourceHistoryError, match="earlier timeline"):
        collapse(message("c", 0x900, {"id": 1, "name": "a", "notes": None}, origin=A1), positions=stored(0x400, ("111", 2)))


def test_history_accepted_deliberately_applies_even_positions_below_the_stored_one():
    changes, (p,) = collapse(message("c", 0x100, {"id": 1, "name": "a", "notes": None}, origin=SourceOrigin("222", 1, 0)),
                             positions=stored(0x400), accept_source_history=True)
    assert changes.upserts and p.origin == ("222", 1) and p.position.commit_lsn == 0x100


def test_history_unknown_before_is_recorded_and_events_without_origin_keep_it():
    _, (p,) = collapse(message("c", 0x500, {"id": 1, "name": "a", "notes": None}), positions=stored(0x400, None))
    assert p.origin == ("111", 1)
    _, (p,) = collapse(message("c", 0x500, {"id": 1, "name": "a", "notes": None}, origin=None), positions=stored(0x400))
    assert p.origin == ("111", 1)
    assert history_problem(stored(0x400)[("t", 0)], A1) is None


def test_stored_offset_checks():
    p = stored(0x400, offset=9)[("t", 0)]
    assert stored_offset_problem(p, 0, 10, (p.position, ("111", 1))) is None
    assert stored_offset_problem(p, 0, 20, (Position(0x300, 0x300, 0), ("111", 1))) is None  # a skipped repeat
    assert "partition ends at offset 4" in stored_offset_problem(p, 0, 5, None)
    assert "ends at offset none (empty)" in stored_offset_problem(p, 0, 0, None)
    assert "offsets 10 to 11 were deleted (retention)" in stored_offset_problem(p, 12, 30, None)
    assert stored_offset_problem(p, 10, 30, None) is None  # retention up to the stored offset: nothing unread lost
    assert "holds position" in stored_offset_problem(p, 0, 20, (Position(0x500, 0x500, 0), ("111", 1)))
    assert "holds position" in stored_offset_problem(p, 0, 20, (p.position, ("999", 1)))
    assert "holds no cdc event" in stored_offset_problem(p, 0, 20, "none")


def moving(commit: int, old_id: int, new_id: int, name: str):
    """A key change whose unchanged TOAST value no before-image supplied: the row moves in the target."""
    event = {"op": "u", "before": {"id": old_id}, "after": {"id": new_id, "name": name}, "unchanged": ["notes"],
             "source": {"commit_lsn": format_lsn(commit), "lsn": format_lsn(commit), "seq": 0}}
    headers = [(SCHEMA_HEADER, ITEMS.to_json()), (ORIGIN_HEADER, A1.to_json())]
    return SimpleNamespace(topic="t", partition=0, offset=next(offsets), value=json.dumps(event).encode(), headers=headers)


def test_a_partial_key_change_moves_the_row_in_a_batch_of_its_own():
    builder = BatchBuilder({"t": "items"}, {}, {})
    assert builder.add(message("c", 1, {"id": 5, "name": "x", "notes": "n"}))
    assert not builder.add(moving(2, 1, 2, "b"))  # not with other changes: they are applied first
    builder.take()
    assert builder.add(moving(2, 1, 2, "b"))
    assert not builder.add(message("c", 3, {"id": 6, "name": "y", "notes": None}))  # nothing after it either
    (changes,), (progress,) = builder.take()
    assert changes.moves == [({"id": 1}, {"id": 2, "name": "b"})]
    assert changes.deletes == [] and changes.upserts == [] and changes.updates == []
    assert progress.position.commit_lsn == 2


def test_a_cut_keeps_a_key_move_in_its_own_run_inside_the_same_batch():
    """A transactional sink applies a source transaction whole: the runs a key move needs stay in
    one target transaction, in order, and a repeat after the cut is still skipped."""
    builder = BatchBuilder({"t": "items"}, {}, {})
    first = message("c", 1, {"id": 5, "name": "x", "notes": "n"})
    assert builder.add(first)
    move = moving(2, 1, 2, "b")
    assert not builder.add(move)
    builder.cut()
    assert builder.add(move)
    after = message("c", 3, {"id": 6, "name": "y", "notes": None})
    assert not builder.add(after)
    builder.cut()
    assert builder.add(after)
    assert builder.add(first)  # a repeat: at or below what this batch already holds
    (before, moved, last), (progress,) = builder.take()
    assert before.upserts == [{"id": 5, "name": "x", "notes": "n"}] and before.moves == []
    assert moved.moves == [({"id": 1}, {"id": 2, "name": "b"})] and moved.upserts == []
    assert last.upserts == [{"id": 6, "name": "y", "notes": None}]
    assert (progress.position.commit_lsn, builder.skipped) == (3, 1)


# The fast run for plain changes (BatchBuilder.add_run) must give the batches add() gives, record by
# record, whatever comes: repeats, partial rows, key moves, truncates, schema changes, another source
# history, tombstones, records that are no events, rows without their key.
ITEMS_WIDER = TableSchema("public", "items", ITEMS.columns + (Column("extra", "text", "text"),), ("id",))
A2 = SourceOrigin("111", 2, 10**6)  # a later timeline of the same cluster, branched after everything here
B1 = SourceOrigin("222", 1, 0)  # another cluster


def _record(op, commit, key, *, moved_from=None, unchanged=False, schema=ITEMS, origin=A1, shape="event"):
    row = {"id": key, "name": f"n{commit}", "notes": "x"}
    if schema is ITEMS_WIDER:
        row["extra"] = "e"
    if shape == "keyless":
        row.pop("id")
    event = {"op": op, "before": ({"id": moved_from, "name": "old"} if moved_from is not None else None)
             if op != "d" else row, "after": None if op in ("d", "t") else row,
             "source": {"commit_lsn": format_lsn(commit), "lsn": format_lsn(commit), "seq": 0}}
    if unchanged:
        event["unchanged"] = ["notes"]
        row.pop("notes")
    value = None if shape == "tombstone" else b"[1]" if shape == "garbage" else json.dumps(event).encode()
    headers = [(SCHEMA_HEADER, schema.to_json())] + ([(ORIGIN_HEADER, origin.to_json())] if origin else [])
    return SimpleNamespace(topic="t", partition=0, offset=next(offsets), key=None, value=value, headers=headers)


_records = st.lists(st.builds(
    _record, op=st.sampled_from(["c", "r", "u", "u", "d", "t"]), commit=st.integers(1, 30), key=st.integers(1, 4),
    moved_from=st.none() | st.integers(1, 4), unchanged=st.booleans(), schema=st.sampled_from([ITEMS, ITEMS, ITEMS_WIDER]),
    origin=st.sampled_from([A1, A1, A1, None, A2, B1]),
    shape=st.sampled_from(["event"] * 12 + ["tombstone", "garbage", "keyless"])), max_size=25)


def _batches(records, fast, ahead=False):
    """The batches of `records`: by add() alone, or by add_run() first (fast); `ahead`: with the
    events parsed beforehand, as the sink's runner hands them over (parse_ahead)."""
    builder, out = BatchBuilder({"t": "items"}, {}, {}, shapes={}), []
    items = parse_ahead({"tp": records}, None, builder)["tp"] if ahead else [(m, None) for m in records]
    i = 0
    try:
        while i < len(items):
            if fast:
                i = builder.add_run(items, i)
                if i == len(items):
                    break
            message, parsed = items[i]
            i += 1
            if builder.needs_flush_before(message):
                out.append(builder.take())
            if not builder.add(message, parsed):
                out.append(builder.take())
                builder.add(message, parsed)
        out.append(builder.take())
    except Exception as exc:  # the same error at the same record
        out.append(f"{type(exc).__name__}: {exc}")
    return out, builder.applied, builder.applied_by_topic


@settings(max_examples=400, deadline=None)
@given(records=_records)
def test_the_fast_run_gives_the_batches_add_gives(records):
    assert _batches(records, fast=True) == _batches(records, fast=False)
    # Parsed ahead (a sink's reading, without source): the same batches, by add_run and by add alone.
    assert _batches(records, fast=True, ahead=True) == _batches(records, fast=False, ahead=True) == _batches(
        records, fast=False)


def test_one_record_per_distinct_headers_of_a_fetch_and_one_headers_object_per_run():
    def rec(headers, value=b"{}"):
        return SimpleNamespace(headers=headers, value=value)
    h1, h2 = (("cdc.schema_id", b"a"),), (("cdc.schema_id", b"b"),)
    fetched = {0: [rec(h1), rec((("cdc.schema_id", b"a"),)), rec(h2), rec(h1), rec(None), rec(None)],
               1: [rec(h2, None), rec(h2), rec(())]}
    got = share_headers(fetched)
    assert sorted(map(repr, (r.headers for r in got))) == sorted(map(repr, [h1, h2, None, ()]))
    assert all(r.value is not None for r in got) and share_headers({0: [rec(h1, None)]}) == []
    first = fetched[0]
    assert first[1].headers is first[0].headers and [r.headers for r in first] == [h1, h1, h2, h1, None, None]
