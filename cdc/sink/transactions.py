"""Whole source transactions for a sink (`apply: transactional`).

Events of one source transaction are spread over several topics, and Kafka orders nothing across
topics. The connector closes each transaction with an END record on the pipeline's transactions
topic that counts its events per topic (cdc.events.transaction). The assembler holds consumed
events by commit LSN and releases a transaction only when its END record has been read and, for
every topic the sink reads, that many distinct events of it. END records come in commit order, so
transactions are released in commit order, and the sink applies each released run in one target
transaction: the target never shows part of a source transaction.

Memory stays bounded: when more than `max_held` events are held, the oldest held transaction is
released in pieces, in commit order, as its events arrive (the one case where a reader can see part
of a source transaction). Counting what arrived needs no memory per event: positions increase along
a partition, except where a restarted connector repeats what it had sent, so an event counts when
its position is past the highest one seen in its partition.

Whether a transaction is complete is decided from one source of truth: its END record's count per
topic against the events of its commit applied before this process read any (stored with each
partition's position, `commit_events`: a piece applied before a crash, or a replay that stopped
half-way) plus the distinct ones read since. Whether the END record itself was applied is decided by
the transactions topic's own stored position, never by how far a table topic got: a table topic
stored at the transaction's commit may hold only its first pieces.

Pure bookkeeping, no I/O. It holds (message, what was parsed of it) pairs; a message is anything
with .topic, .partition and .offset.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cdc.events.transaction import End
from cdc.lsn import Position, format_lsn

# Events of a commit that a topic's partitions applied before this process read any of them.
ALL = float("inf")  # every partition is stored past the commit: all of its events there were applied
AppliedBefore = Callable[[str, int], float]  # (topic, commit LSN) -> a count, or ALL


class _Stored(Protocol):
    position: Position
    commit_events: int | None


def commit_events_after(done: _Stored | None, position: Position) -> int | None:
    """`commit_events` to store with `position`, the next event applied after `done` in its
    partition: one more than `done` within the same commit, 1 for the first of a commit. None when
    the count so far is not known (a position stored by an earlier release)."""
    if done is None or done.position.commit_lsn != position.commit_lsn:
        return 1
    return None if done.commit_events is None else done.commit_events + 1


def applied_before(stored: Iterable[_Stored], commit_lsn: int) -> float:
    """How many events of `commit_lsn` the partitions of one topic (their stored positions, as
    loaded at start) had applied: ALL when each is stored past the commit, or where the count is
    not known (a row of an earlier release), as sinks did before counts were stored."""
    stored = list(stored)
    if not stored:
        return 0
    if all(p.position.commit_lsn > commit_lsn for p in stored):
        return ALL
    count = 0
    for p in stored:
        if p.position.commit_lsn == commit_lsn:
            if p.commit_events is None:
                return ALL
            count += p.commit_events
    return count


@dataclass
class _Held:
    items: list[tuple[Any, Any]] = field(default_factory=list)  # in the order consumed: offset order per partition
    seen: dict[str, int] = field(default_factory=dict)  # topic -> distinct events read (a repeat counts once)
    highest: dict[tuple[str, int], Position] = field(default_factory=dict)  # partition -> highest position read
    first: dict[tuple[str, int], int] = field(default_factory=dict)  # partition -> offset of its first event here
    in_pieces: bool = False  # part of it was released before it was complete (too large to hold)


class TransactionAssembler:
    def __init__(self, topics: Iterable[str], max_held: int = 100_000):
        self.topics = set(topics)  # the table topics this sink reads
        self.max_held = max_held  # held events past which the oldest transaction is applied in pieces
        self.pieces: list[int] = []  # commit LSNs released in pieces since the caller last looked
        self._held: dict[int, _Held] = {}  # commit LSN -> its events read so far
        self._order: list[int] = []  # the commit LSNs of _held as a heap: releases go in commit order
        self._ends: deque[tuple[Any, End]] = deque()  # END records not released yet, in commit order
        self._passing: list[tuple[Any, Any]] = []  # records applied before (repeats): only their offsets move on
        self._last_end: Position | None = None  # the greatest END held or released: END records come in commit order
        self.held = 0  # events held

    def add_event(self, message: Any, event: Any, position: Position, *, applied: bool) -> None:
        """A table event (`event`: as parsed); `applied`: at or below the position stored for its partition."""
        if applied:
            self._passing.append((message, event))
            return
        txn = self._held.get(position.commit_lsn)
        if txn is None:
            txn = self._held[position.commit_lsn] = _Held()
            heapq.heappush(self._order, position.commit_lsn)
        tp = (message.topic, message.partition)
        if tp not in txn.highest or position > txn.highest[tp]:
            txn.highest[tp] = position
            txn.seen[message.topic] = txn.seen.get(message.topic, 0) + 1
        txn.items.append((message, event))
        txn.first.setdefault(tp, message.offset)
        self.held += 1

    def add_run(self, items: list[tuple[Any, Any]], start: int, stored: Position | None,
                skip_offset: int | None = None) -> int:
        """:meth:`add_event` for items[start:] ((record, (event, position)), of one table topic
        partition) while each is a parsed event and not `skip_offset` (--skip-record): returns the
        index of the first item not taken (len(items): all), for the caller's checks. `stored`: the
        partition's stored position (an event at or below it is applied). The per-record work of
        add_event, its transaction looked up once per run of the same commit."""
        n = len(items)
        if start >= n:
            return start
        first = items[start][0]
        tp, topic = (first.topic, first.partition), first.topic
        passing, held = self._passing, self._held
        txn_lsn = txn = None
        i, added = start, 0
        while i < n:
            item = items[i]
            message, parsed = item
            if parsed is None or type(parsed) is not tuple or message.offset == skip_offset:
                break  # a tombstone, a record that did not parse, an END record, a skipped record
            position = parsed[1]
            if stored is not None and position <= stored:
                passing.append(item)
                i += 1
                continue
            commit_lsn = position.commit_lsn
            if commit_lsn != txn_lsn:
                txn = held.get(commit_lsn)
                if txn is None:
                    txn = held[commit_lsn] = _Held()
                    heapq.heappush(self._order, commit_lsn)
                txn_lsn = commit_lsn
                txn.first.setdefault(tp, message.offset)
            highest = txn.highest.get(tp)
            if highest is None or position > highest:
                txn.highest[tp] = position
                txn.seen[topic] = txn.seen.get(topic, 0) + 1
            txn.items.append(item)
            added += 1
            i += 1
        self.held += added
        return i

    def add_end(self, message: Any, end: End, *, applied: bool) -> None:
        if applied:
            self._passing.append((message, end))
            return
        if self._last_end is not None and end.position <= self._last_end:
            # A restarted connector's repeat of an END this process already holds or released, read
            # before the stored position caught up with it (one fetch can hold both copies). The
            # first copy closes the transaction; this one is dropped, and its offset moves on with
            # the next record released (a restart before that reads it again as applied).
            return
        self._last_end = end.position
        self._ends.append((message, end))

    def release(self, applied_before: AppliedBefore, limit: int) -> list[tuple[Any, Any]]:
        """(message, parsed) pairs to apply now, in order: repeats, then the complete transactions at the head of
        the END records, each followed by its END record, until `limit` events are released.

        `applied_before(topic, commit_lsn)`: how many events of the commit the topic's partitions
        had applied before this process read any (see the module's `applied_before`). Events
        released here in pieces are counted as read, not by this.
        """
        out, self._passing = self._passing, []
        released = 0
        while self._ends and released < limit:
            message, end = self._ends[0]
            if not self._complete(end, applied_before):
                break
            self._ends.popleft()
            # Earlier commits without an END record (published by a connector before boundaries
            # existed) go first, in commit order, so no partition's events are reordered.
            while self._order and self._order[0] <= end.commit_lsn:
                txn = self._held.pop(heapq.heappop(self._order))
                out.extend(txn.items)
                released += len(txn.items)
                self.held -= len(txn.items)
            out.append((message, end))
        while self.held > self.max_held:  # too much held: the oldest transaction goes in pieces (rare)
            commit_lsn = min(lsn for lsn, txn in self._held.items() if txn.items)
            txn = self._held[commit_lsn]
            out.extend(txn.items)
            self.held -= len(txn.items)
            txn.items, txn.first = [], {}
            if not txn.in_pieces:
                txn.in_pieces = True
                self.pieces.append(commit_lsn)
        return out

    def _complete(self, end: End, applied_before: AppliedBefore) -> bool:
        txn = self._held.get(end.commit_lsn)
        for topic, count in end.counts.items():
            if topic not in self.topics:
                continue  # a table this pipeline no longer captures
            seen = txn.seen.get(topic, 0) if txn is not None else 0
            if seen < count and seen + applied_before(topic, end.commit_lsn) < count:
                return False
        return True

    def waiting_for(self, applied_before: AppliedBefore) -> str:
        """What keeps the held events from being applied, for a log line."""
        if not self._ends:
            commit_lsn = min(self._order) if self._order else None
            return ("no END record has been read for the oldest held transaction"
                    + (f" (commit {format_lsn(commit_lsn)})" if commit_lsn is not None else ""))
        end = self._ends[0][1]
        txn = self._held.get(end.commit_lsn)
        missing = {topic: count - (txn.seen.get(topic, 0) if txn else 0) - applied_before(topic, end.commit_lsn)
                   for topic, count in end.counts.items() if topic in self.topics}
        return (f"the END record of the transaction committed at {format_lsn(end.commit_lsn)} was read; still to read: "
                + ", ".join(f"{int(n)} events of {topic}" for topic, n in sorted(missing.items()) if n > 0))

    def first_held_offsets(self) -> dict[tuple[str, int], int]:
        """Per partition, the lowest offset of a record still held: a stored offset must stay below
        it, or a restart would seek past events that were never applied."""
        first: dict[tuple[str, int], int] = {}
        for txn in self._held.values():
            for tp, offset in txn.first.items():
                if offset < first.get(tp, offset + 1):
                    first[tp] = offset
        if self._ends:  # END records are held in offset order
            message = self._ends[0][0]
            first[(message.topic, message.partition)] = message.offset
        return first
