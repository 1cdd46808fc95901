"""Grouping consumed events into whole source transactions (cdc.sink.transactions)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.events.codec import transaction_source
from cdc.events.envelope import TransactionInfo
from cdc.events.transaction import End, decode_end, encode_end
from cdc.lsn import Position, format_lsn
from cdc.sink.transactions import ALL, TransactionAssembler, applied_before, commit_events_after

A, B, TXNS = "shop.public.a", "shop.public.b", "shop.transactions"
NONE_APPLIED = lambda topic, commit_lsn: 0  # noqa: E731


@dataclass(frozen=True)
class Msg:
    topic: str
    partition: int
    offset: int


class Stream:
    """Records as a consumer reads them: offsets per partition, in order."""

    def __init__(self) -> None:
        self.assembler = TransactionAssembler([A, B])
        self.next: dict[str, int] = {}

    def _msg(self, topic: str) -> Msg:
        offset = self.next.get(topic, 0)
        self.next[topic] = offset + 1
        return Msg(topic, 0, offset)

    def event(self, topic: str, commit: int, seq: int = 0, applied: bool = False) -> Msg:
        msg = self._msg(topic)
        self.assembler.add_event(msg, f"event {commit}/{seq}", Position(commit, commit - 1, seq), applied=applied)
        return msg

    def end(self, commit: int, applied: bool = False, **counts: int) -> Msg:
        msg = self._msg(TXNS)
        topics = {f"shop.public.{t}": n for t, n in counts.items()}
        self.assembler.add_end(msg, End(Position(commit, commit, 0), topics), applied=applied)
        return msg

    def release(self, applied=NONE_APPLIED, limit: int = 1000) -> list[Msg]:
        return [m for m, _ in self.assembler.release(applied, limit)]


def test_a_transaction_is_released_only_when_its_end_and_all_its_events_are_read() -> None:
    s = Stream()
    a1 = s.event(A, 100)
    end = s.end(100, a=2, b=1)  # the END record can arrive before events of other topics
    assert s.release() == []
    b1 = s.event(B, 100)
    assert s.release() == []  # still one event of topic a missing
    a2 = s.event(A, 100, 1)
    assert s.release() == [a1, b1, a2, end]  # as consumed: offset order per partition
    assert s.assembler.held == 0 and s.release() == []


def test_events_without_their_end_record_wait() -> None:
    s = Stream()
    s.event(A, 100)
    s.event(B, 100)
    assert s.release() == [] and s.assembler.held == 2


def test_transactions_are_released_in_commit_order_and_a_later_one_waits_for_an_earlier_one() -> None:
    s = Stream()
    first_end = s.end(100, a=1, b=1)
    second_end = s.end(200, a=1)
    a2 = s.event(A, 200)  # complete, but 100 is not yet
    assert s.release() == []
    a1 = s.event(A, 100)
    assert s.release() == []
    b1 = s.event(B, 100)
    assert s.release() == [a1, b1, first_end, a2, second_end]


def test_release_order_keeps_each_partitions_offsets_increasing() -> None:
    s = Stream()
    a1 = s.event(A, 100)
    a2 = s.event(A, 200)
    b2 = s.event(B, 200)
    e1, e2 = s.end(100, a=1), s.end(200, a=1, b=1)
    assert s.release() == [a1, e1, a2, b2, e2]


def test_a_repeated_event_counts_once() -> None:
    """A restarted connector publishes a transaction again: the first copy must not complete it."""
    s = Stream()
    a1 = s.event(A, 100)
    a1_again = s.event(A, 100)  # the same position again
    end = s.end(100, a=2)
    assert s.release() == []
    a2 = s.event(A, 100, 1)
    assert s.release() == [a1, a1_again, a2, end]


def test_a_repeated_end_record_read_before_its_first_copy_was_applied_does_not_hold_the_sink() -> None:
    """A restarted connector publishes a transaction again: one fetch can hold both copies of its
    records, all judged against the same stored positions. The transaction goes once; nothing
    waits afterwards (before: the second END waited forever for events already applied)."""
    s = Stream()
    a1, end1 = s.event(A, 100), s.end(100, a=1)
    a1_again = s.event(A, 100)
    s.end(100, a=1)
    a2, end2 = s.event(A, 200), s.end(200, a=1)
    assert s.release() == [a1, a1_again, end1, a2, end2]
    assert s.assembler.held == 0 and s.assembler.waiting_for(NONE_APPLIED).startswith("no END record")


def test_records_applied_before_pass_through_at_once() -> None:
    s = Stream()
    old = s.event(A, 50, applied=True)
    old_end = s.end(50, applied=True, a=1)
    held = s.event(A, 100)
    assert s.release() == [old, old_end]
    assert s.assembler.first_held_offsets() == {(A, 0): held.offset}


def test_a_topic_stored_past_the_commit_needs_none_of_its_events() -> None:
    """Switched to whole transactions mid-stream: what the sink applied before does not come again."""
    s = Stream()
    end = s.end(100, a=1, b=1)
    b1 = s.event(B, 100)
    assert s.release(lambda topic, commit_lsn: ALL if topic == A else 0) == [b1, end]


def test_topics_the_sink_does_not_read_are_not_waited_for() -> None:
    s = Stream()
    a1 = s.event(A, 100)
    end = s.end(100, a=1, gone=5)
    assert s.release() == [a1, end]


def test_events_of_commits_without_an_end_record_go_before_the_next_end() -> None:
    """Events published before the connector wrote END records: released in commit order."""
    s = Stream()
    legacy = s.event(A, 50)
    a1 = s.event(A, 100)
    end = s.end(100, a=1)
    assert s.release() == [legacy, a1, end]


def test_release_stops_after_the_limit_at_a_transaction_boundary() -> None:
    s = Stream()
    a1, a2, a3 = s.event(A, 100), s.event(A, 100, 1), s.event(A, 200)
    e1, e2 = s.end(100, a=2), s.end(200, a=1)
    assert s.release(limit=1) == [a1, a2, e1]  # never half a transaction
    assert s.release(limit=1) == [a3, e2]


def test_first_held_offsets_name_the_lowest_held_record_per_partition() -> None:
    s = Stream()
    s.event(A, 100)
    s.event(A, 200)
    s.event(B, 200)
    end = s.end(200, a=1, b=1)
    assert s.assembler.first_held_offsets() == {(A, 0): 0, (B, 0): 0, (TXNS, 0): end.offset}


def test_end_record_round_trip() -> None:
    txn = TransactionInfo(0x1948130, format_lsn(0x1948130), 731, "2026-11-26T20:19:10.994151Z")
    key, value = encode_end("shop", "shopdb", txn, {A: 3, B: 1})
    end = decode_end(value)
    assert key == b'{"txid":731}'
    assert end.position == Position(0x1948130, 0x1948130, 0)
    assert end.counts == {A: 3, B: 1}


def test_a_transaction_larger_than_the_limit_is_applied_in_pieces_in_commit_order() -> None:
    s = Stream()
    s.assembler.max_held = 3
    first = [s.event(A, 100, i) for i in range(3)]
    assert s.release() == []  # 3 held: at the limit, still whole
    fourth = s.event(A, 100, 3)
    assert s.release() == [*first, fourth] and s.assembler.pieces == [100]  # a piece, in order
    s.assembler.pieces.clear()
    rest = s.event(B, 100)
    end = s.end(100, a=4, b=1)
    assert s.release() == [rest, end]  # the remainder once complete; counted events were not forgotten
    assert s.assembler.held == 0 and s.assembler.pieces == []


def test_a_repeated_event_counts_once_without_remembering_every_position() -> None:
    s = Stream()
    a1, a2 = s.event(A, 100, 0), s.event(A, 100, 1)
    again = s.event(A, 100, 0)  # a restarted connector sends the transaction again
    end = s.end(100, a=3)
    assert s.release() == []  # 2 distinct events of 3
    a3 = s.event(A, 100, 2)
    assert s.release() == [a1, a2, again, a3, end]


# -- transactions larger than max_transaction_events, with crashes between pieces -------------------

@dataclass(frozen=True)
class Stored:
    """A partition's row in the positions table."""

    offset: int
    position: Position
    commit_events: int | None


class Sink:
    """The sink's loop over the assembler, as cdc.sink.runner drives it: records read from the topics
    a fetch at a time, released runs applied with their positions in one step (a target transaction),
    stored offsets kept below held records. `run` stops after `crash_after` applies, as a SIGKILL
    would: what was applied stays, the assembler's memory is gone."""

    def __init__(self, log: dict[str, list[tuple[Position, object]]], max_held: int, batch_size: int):
        self.log, self.max_held, self.batch_size = log, max_held, batch_size
        self.stored: dict[str, Stored] = {}
        self.applied: list[tuple[str, Position]] = []  # table events in the order applied

    def run(self, fetch: int, crash_after: int | None = None) -> None:
        assembler = TransactionAssembler([A, B], self.max_held)
        loaded = dict(self.stored)
        next_offset = {t: self.stored[t].offset + 1 if t in self.stored else 0 for t in self.log}
        applies = 0
        while True:
            read = False
            for topic in (B, TXNS, A):  # one fetch of each topic in turn
                for offset in range(next_offset[topic], min(next_offset[topic] + fetch, len(self.log[topic]))):
                    position, record = self.log[topic][offset]
                    done = self.stored.get(topic)
                    applied = done is not None and position <= done.position
                    if topic == TXNS:
                        assembler.add_end(Msg(topic, 0, offset), record, applied=applied)
                    else:
                        assembler.add_event(Msg(topic, 0, offset), record, position, applied=applied)
                    next_offset[topic] = offset + 1
                    read = True
                released = assembler.release(
                    lambda t, commit: applied_before([loaded[t]] if t in loaded else [], commit), self.batch_size)
                if released:
                    self._apply(released, assembler.first_held_offsets())
                    applies += 1
                    if applies == crash_after:
                        return
            if not read and not released:
                assert assembler.held == 0, f"{assembler.held} events held after every record was read"
                return

    def _apply(self, released: list, held: dict[tuple[str, int], int]) -> None:
        for message, _ in released:
            position = self.log[message.topic][message.offset][0]
            done = self.stored.get(message.topic)
            if done is not None and position <= done.position:  # a repeat: only the offset moves on
                self.stored[message.topic] = Stored(message.offset, done.position, done.commit_events)
                continue
            if message.topic != TXNS:
                self.applied.append((message.topic, position))
            else:  # an END record is applied with, or after, the last of its transaction's events
                commit = position.commit_lsn
                missing = {(t, p) for t in (A, B) for p, _ in self.log[t] if p.commit_lsn == commit} - set(self.applied)
                assert not missing, f"END of {commit} applied without {len(missing)} of its events"
            self.stored[message.topic] = Stored(message.offset, position, commit_events_after(done, position))
        for (topic, _), first in held.items():
            if topic in self.stored and self.stored[topic].offset >= first:
                self.stored[topic] = Stored(first - 1, self.stored[topic].position, self.stored[topic].commit_events)


def transactions_log(*txns: dict[str, int], repeat: int | None = None) -> dict[str, list[tuple[Position, object]]]:
    """Topics holding `txns` (events per table topic each), committed in that order; with `repeat`,
    a connector restart re-published that transaction's events before its END record."""
    log: dict[str, list] = {A: [], B: [], TXNS: []}
    for number, counts in enumerate(txns, start=1):
        commit = number * 100_000
        copies = 2 if number == repeat else 1
        for _ in range(copies):
            for topic, n in counts.items():
                log[topic].extend((Position(commit, commit - 50_000 + i, 0), f"{topic} {commit}/{i}") for i in range(n))
        log[TXNS].append((Position(commit, commit, 0), End(Position(commit, commit, 0), dict(counts))))
    return log


def expected(log) -> list[tuple[str, Position]]:
    return sorted({(t, p) for t in (A, B) for p, _ in log[t]})


LIMIT = 20


@pytest.mark.parametrize("size", [LIMIT, LIMIT * 3 // 2, LIMIT * 2, LIMIT * 10])
@pytest.mark.parametrize("fetch", [7, 50])
def test_a_transaction_larger_than_the_limit_completes_when_its_end_arrives(size: int, fetch: int) -> None:
    """A two-table sink, a transaction of `size` events on one table, then a small one on the other:
    every event is applied once, and nothing stays held (the tail of a transaction applied in pieces
    waited for an END record that had already been released)."""
    log = transactions_log({A: size}, {B: 1})
    sink = Sink(log, max_held=LIMIT, batch_size=51)
    sink.run(fetch)
    assert sorted(sink.applied) == expected(log)
    assert sink.stored[TXNS].position == log[TXNS][-1][0]


@pytest.mark.parametrize("size", [LIMIT, LIMIT * 3 // 2, LIMIT * 2, LIMIT * 10])
@pytest.mark.parametrize("crash_after", [1, 2, 3, 5])
def test_a_crash_between_pieces_resumes_with_the_transactions_remaining_events(size: int, crash_after: int) -> None:
    log = transactions_log({B: 1}, {A: size, B: 3})  # nothing after it: no later commit releases its tail
    sink = Sink(log, max_held=LIMIT, batch_size=51)
    sink.run(fetch=7, crash_after=crash_after)
    sink.run(fetch=7, crash_after=crash_after)  # and again, further on
    sink.run(fetch=7)
    for topic in (A, B):  # per partition, in position order
        ours = [p for t, p in sink.applied if t == topic]
        assert ours == sorted(ours)
    assert sorted(sink.applied) == expected(log)  # each exactly once
    assert sink.stored[TXNS].position == log[TXNS][-1][0]


def test_the_issue_shape_1005_then_1_row_with_limit_20_and_batch_51() -> None:
    log = transactions_log({A: 1005}, {B: 1})
    sink = Sink(log, max_held=20, batch_size=51)
    sink.run(fetch=51)
    assert len(sink.applied) == 1006


def test_a_repeated_large_transaction_counts_each_event_once_across_a_crash() -> None:
    log = transactions_log({A: LIMIT * 2}, {A: 3, B: 1}, repeat=1)
    sink = Sink(log, max_held=LIMIT, batch_size=51)
    sink.run(fetch=11, crash_after=2)
    sink.run(fetch=11)
    assert sorted(sink.applied) == expected(log)


def test_applied_before_counts_a_commit_stored_part_way() -> None:
    at = lambda commit, n: Stored(0, Position(commit, commit - 1, 0), n)  # noqa: E731
    assert applied_before([], 100) == 0
    assert applied_before([at(50, 3)], 100) == 0
    assert applied_before([at(100, 3)], 100) == 3
    assert applied_before([at(150, 3)], 100) == ALL
    assert applied_before([at(100, None)], 100) == ALL  # a row of an earlier release: as before
    assert commit_events_after(None, Position(100, 1, 0)) == 1
    assert commit_events_after(at(100, 3), Position(100, 1, 0)) == 4
    assert commit_events_after(at(50, 3), Position(100, 1, 0)) == 1


def test_what_held_events_wait_for_is_said_as_it_is() -> None:
    s = Stream()
    s.event(A, 100)
    assert "no END record has been read" in s.assembler.waiting_for(NONE_APPLIED)
    s.end(100, a=3, b=1)
    assert s.assembler.waiting_for(NONE_APPLIED) == (
        f"the END record of the transaction committed at {format_lsn(100)} was read; still to read: "
        f"2 events of {A}, 1 events of {B}")


# Records of one partition of topic A: (commit, seq) positions, a repeat of a restarted connector now
# and then (positions going back), a tombstone or unreadable record (None) and the skipped offset.
_RUN_RECORDS = st.lists(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(0, 3))), max_size=30)


@given(records=_RUN_RECORDS, stored=st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(0, 3))),
       skip=st.one_of(st.none(), st.integers(0, 30)))
def test_a_run_of_events_is_held_as_event_by_event(records, stored, skip) -> None:
    """add_run takes what add_event would take, the same way, and stops where the caller must look."""
    items = [(Msg(A, 0, offset), None if r is None else (f"event {r}", Position(r[0] * 10, r[0] * 10 - 5, r[1])))
             for offset, r in enumerate(records)]
    stored_position = None if stored is None else Position(stored[0] * 10, stored[0] * 10 - 5, stored[1])
    one_by_one, in_runs = TransactionAssembler([A]), TransactionAssembler([A])
    for message, parsed in items:
        if parsed is not None and message.offset != skip:
            applied = stored_position is not None and parsed[1] <= stored_position
            one_by_one.add_event(message, parsed, parsed[1], applied=applied)
    i = 0
    while i < len(items):
        i = in_runs.add_run(items, i, stored_position, skip)
        if i < len(items):
            assert items[i][1] is None or items[i][0].offset == skip  # stops only where add_event is not for it
            i += 1
    for assembler in (one_by_one, in_runs):
        for commit in range(1, 5):
            assembler.add_end(Msg(TXNS, 0, commit), End(Position(commit * 10, commit * 10, 0), {A: 1}), applied=False)
    assert in_runs.held == one_by_one.held
    assert in_runs.first_held_offsets() == one_by_one.first_held_offsets()
    assert in_runs.release(NONE_APPLIED, 1000) == one_by_one.release(NONE_APPLIED, 1000)
    assert in_runs.held == one_by_one.held


@given(pipeline=st.text(max_size=10), db=st.text(max_size=10), lsn=st.integers(0, 2**64 - 1),
       xid=st.integers(0, 2**32 - 1), counts=st.dictionaries(st.text(max_size=10), st.integers(1, 10**6), min_size=1))
def test_an_end_record_is_orjsons_encoding_of_its_fields(pipeline, db, lsn, xid, counts) -> None:
    txn = TransactionInfo(lsn, format_lsn(lsn), xid, "2026-11-26T20:19:10.994151Z")
    before = time.time_ns() // 1_000_000
    key, value = encode_end(pipeline, db, txn, counts)
    ts_ms = orjson.loads(value)["ts_ms"]
    assert before <= ts_ms <= time.time_ns() // 1_000_000
    assert key == orjson.dumps({"txid": xid})
    assert value == orjson.dumps({"status": "END", "event_count": sum(counts.values()), "topics": counts,
                                  "source": transaction_source(pipeline, db, txn), "ts_ms": ts_ms})
