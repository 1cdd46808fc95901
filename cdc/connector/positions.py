"""The stream's place: the transaction being read and the position of each event in it.

Fed by the stream's Begin and Commit messages (cdc.connector.stream); hands positions to the events
built from row changes and snapshot chunks, and owns the AckTracker (cdc.connector.confirm) that
turns Kafka's acknowledgements into the LSN confirmed to PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from cdc.connector.confirm import AckTracker, Transaction
from cdc.events.envelope import ChangeEvent, TransactionInfo
from cdc.lsn import Position, format_lsn
from cdc.source.postgres import pgoutput


class Positions:
    def __init__(self) -> None:
        self.tracker = AckTracker(0)
        self.txn: Transaction | None = None  # the transaction being read, as the tracker counts it
        self.info: TransactionInfo | None = None  # ... and as its events describe it
        self.counts: dict[str, int] = {}  # events of the current transaction per topic (its END record)
        self.commit_epoch = 0.0  # source commit time of the transaction being read, seconds since the epoch
        self.received_lsn = 0  # how far the server has sent the stream (standby status updates)
        self._seq_lsn = -1  # LSN of the change record the last event came from
        self._seq = 0  # next index among the events of changes at _seq_lsn
        self._seq_lsn_text = ""

    def start_at(self, confirmed_lsn: int) -> None:
        """Streaming starts at the slot's confirmed LSN."""
        self.tracker = AckTracker(confirmed_lsn)
        self.received_lsn = confirmed_lsn

    def begin(self, msg: pgoutput.Begin) -> None:
        self.txn = self.tracker.begin()
        self._seq_lsn = -1
        commit_ts = msg.commit_time.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        self.info = TransactionInfo(msg.final_lsn, format_lsn(msg.final_lsn), msg.xid, commit_ts)
        self.commit_epoch = msg.commit_time.timestamp()
        self.counts = {}

    def commit(self, msg: pgoutput.Commit) -> None:
        assert self.txn is not None, "Commit without Begin"
        self.tracker.commit(self.txn, msg.end_lsn)
        self.txn = None

    def restart_seq(self) -> None:
        """The next event starts a new run of seq even at the same LSN (one event per table of a TRUNCATE)."""
        self._seq_lsn = -1

    def event(self, op: str, before: Any, after: Any, key: Any, lsn: int, unchanged: tuple[str, ...] = (), *,
              snapshot: bool = False) -> ChangeEvent:
        assert self.info is not None, "row change outside a transaction"
        # The position depends on the WAL alone: changes sharing one record (the rows of a
        # COPY) all belong to one table, so their order among the events of that LSN does not
        # depend on which tables the pipeline captures.
        if lsn != self._seq_lsn:
            self._seq_lsn, self._seq, self._seq_lsn_text = lsn, 0, format_lsn(lsn)
        position = Position._make((self.info.commit_lsn, lsn, self._seq))  # half the time of Position(...)
        self._seq += 1
        return ChangeEvent(op, before, after, key, position, self._seq_lsn_text, self.info, unchanged, snapshot)

    def next_at(self, lsn: int) -> tuple[str, int]:
        """The (LSN text, seq) the next event of the change at `lsn` takes, without taking it: the
        path that builds no ChangeEvent calls `took_next` once Kafka's batch has its record."""
        if lsn != self._seq_lsn:
            self._seq_lsn, self._seq, self._seq_lsn_text = lsn, 0, format_lsn(lsn)
        return self._seq_lsn_text, self._seq

    def took_next(self) -> None:
        self._seq += 1

    def took(self, events: int) -> None:
        """`took_next` for that many events of the change at the same LSN."""
        self._seq += events

    def skip_hint(self) -> str:
        """How to get past a transaction that cannot be published (README: Skipping a transaction)."""
        if self.info is None or self.txn is None:
            return ""
        # Logical decoding skips a transaction whose commit record starts before the confirmed LSN.
        past = format_lsn(self.info.commit_lsn + 1)
        return (f". To publish nothing of transaction {self.info.xid} (commit at {self.info.commit_lsn_text}) "
                f"and go on, stop cdc and run: cdc connector FILE --skip-to-lsn {past}")
