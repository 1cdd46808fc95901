"""Which LSN the connector may confirm to PostgreSQL.

PostgreSQL forgets WAL up to the confirmed flush LSN, so we confirm a transaction's end LSN only
once Kafka has acknowledged every event of it and of every transaction before it. A crash then
repeats events (the sink absorbs repeats) and never loses one.
"""

from __future__ import annotations

from collections import deque
from cdc import failpoints


class Transaction:
    __slots__ = ("end_lsn", "outstanding", "committed")

    def __init__(self) -> None:
        self.end_lsn = 0
        self.outstanding = 0
        self.committed = False


class AckTracker:
    def __init__(self, confirmed_lsn: int):
        self.confirmed_lsn = confirmed_lsn
        self._open: deque[Transaction] = deque()  # in commit order
        self.error: BaseException | None = None

    def begin(self) -> Transaction:
        txn = Transaction()
        self._open.append(txn)
        return txn

    def sent(self, txn: Transaction) -> None:
        txn.outstanding += 1

    def acked(self, txn: Transaction, error: BaseException | None = None) -> None:
        self.delivered({txn: 1}, error)

    def delivered(self, counts: dict[Transaction, int], error: BaseException | None = None) -> None:
        """Kafka answered for a batch holding `counts[txn]` events of each transaction."""
        if error is not None:
            # Never confirm past a lost event: remember the failure; the connector stops on it.
            self.error = self.error or error
            return
        for txn, count in counts.items():
            txn.outstanding -= count
        self._advance()
        failpoints.reached("connector.acknowledged")

    def commit(self, txn: Transaction, end_lsn: int) -> None:
        txn.end_lsn = end_lsn
        txn.committed = True
        if txn.outstanding == 0 and len(self._open) > 1 and self._open[-1] is txn:
            # Nothing of it awaits Kafka: fold it into the transaction before, so a stalled broker
            # with a stream of such transactions (all filtered out, say) cannot grow this queue.
            self._open.pop()
            self._open[-1].end_lsn = end_lsn
        self._advance()

    def idle(self, wal_end: int) -> None:
        """A keepalive says the server has sent everything before `wal_end`. With no transaction in
        flight there is nothing of ours below it, so it may be confirmed: this keeps the slot from
        pinning WAL on an idle database or one whose changes are all in other tables."""
        if not self._open and self.error is None and wal_end > self.confirmed_lsn:
            self.confirmed_lsn = wal_end

    @property
    def in_flight(self) -> int:
        return sum(t.outstanding for t in self._open)

    def _advance(self) -> None:
        if self.error is not None:
            return
        while self._open and self._open[0].committed and self._open[0].outstanding == 0:
            self.confirmed_lsn = max(self.confirmed_lsn, self._open.popleft().end_lsn)
