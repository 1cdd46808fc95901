"""Grouping consumed events into whole source transactions (cdc.sink.transactions)."""

from __future__ import annotations

from dataclasses import dataclass

from cdc.events.envelope import TransactionInfo
from cdc.events.transaction import End, decode_end, encode_end
from cdc.lsn import Position, format_lsn
from cdc.sink.transactions import TransactionAssembler

A, B, TXNS = "shop.public.a", "shop.public.b", "shop.transactions"
NONE_APPLIED = lambda topic: -1  # noqa: E731


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
    assert s.release(lambda topic: 150 if topic == A else -1) == [b1, end]


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
