"""The fault suite's checker finds what it is there to find (tests/faults/checker.py)."""

from __future__ import annotations

from tests.faults.checker import judge_topic


def event(op: str, row_id: int, v: int, commit: int, seq: int = 0, pad: str = "") -> dict:
    row = {"id": row_id, "v": v, "pad": pad}
    source = {"commit_lsn": f"0/{commit:X}", "lsn": f"0/{commit - 1:X}", "seq": seq, "snapshot": False}
    return {"op": op, "before": row if op == "d" else None, "after": None if op == "d" else row, "source": source,
            "ts_ms": commit * 7}


HISTORY = [(1, 10, "i"), (2, 11, "i"), (1, 12, "u"), (2, 11, "d")]
STREAM = [event("c", 1, 10, 0x100), event("c", 2, 11, 0x200), event("u", 1, 12, 0x300), event("d", 2, 11, 0x400)]


def test_a_complete_stream_passes():
    report = judge_topic("t", STREAM, HISTORY)
    assert report.violations == [] and report.duplicates == 0 and report.events == 4


def test_identical_replays_are_counted_not_flagged():
    replayed = STREAM[:3] + [{**STREAM[1], "ts_ms": 1}, STREAM[2]] + STREAM[3:]  # a restart re-sent two
    report = judge_topic("t", replayed, HISTORY)
    assert report.violations == [] and report.duplicates == 2


def test_a_replay_that_differs_is_a_violation():
    changed = event("u", 1, 13, 0x300)
    report = judge_topic("t", [*STREAM, changed], HISTORY)
    assert len(report.violations) == 1 and "differs" in report.violations[0]


def test_a_change_never_published_is_a_violation():
    report = judge_topic("t", [STREAM[0], STREAM[1], STREAM[3]], HISTORY)
    assert len(report.violations) == 1 and "never published" in report.violations[0]


def test_a_change_filled_in_after_a_later_one_is_a_violation():
    report = judge_topic("t", [STREAM[0], STREAM[2], STREAM[1], STREAM[3]], HISTORY)
    assert any("filled late" in v for v in report.violations), report.violations
