"""Which LSN the connector may confirm to PostgreSQL, and confirming it.

PostgreSQL forgets WAL up to the confirmed flush LSN, so we confirm a transaction's end LSN only
once Kafka has acknowledged every event of it and of every transaction before it. A crash then
repeats events (the sink absorbs repeats) and never loses one. The publisher's delivery callbacks
feed the AckTracker; StatusUpdates sends its confirmed LSN back on the replication connection.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from cdc import failpoints, metrics

if TYPE_CHECKING:
    from cdc.connector.positions import Positions
    from cdc.source.postgres.replication import ReplicationConnection


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
    def awaiting_kafka(self) -> bool:
        """Whether a transaction read to its end waits for Kafka to acknowledge its events."""
        return bool(self._open) and self._open[0].committed

    @property
    def in_flight(self) -> int:
        return sum(t.outstanding for t in self._open)

    def _advance(self) -> None:
        if self.error is not None:
            return
        while self._open and self._open[0].committed and self._open[0].outstanding == 0:
            self.confirmed_lsn = max(self.confirmed_lsn, self._open.popleft().end_lsn)


class StatusUpdates:
    """Standby status updates: how far the stream was received, and what may be confirmed."""

    def __init__(self, repl: ReplicationConnection, positions: Positions, interval_s: float):
        self.repl = repl
        self.positions = positions
        self.interval_s = interval_s
        self.last_sent = 0.0  # time.monotonic() of the last update

    async def send(self) -> None:
        confirmed = self.positions.tracker.confirmed_lsn
        await self.repl.send_status(self.positions.received_lsn, confirmed)
        failpoints.reached("connector.confirmed")
        self.last_sent = time.monotonic()
        metrics.CONFIRMED_LSN.set(confirmed)

    async def keep_source_alive(self) -> None:
        """While the publisher waits for Kafka: a standby status update (the confirmed LSN unchanged)
        every status interval, so the walsender does not end the connection at wal_sender_timeout
        and a broker outage is never taken for a source failure."""
        if self.repl.streaming and time.monotonic() - self.last_sent >= self.interval_s:
            await self.send()
