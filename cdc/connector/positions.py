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
from cdc.source.postgres.frames import PG_EPOCH, pg_time, to_pg_time

# PostgreSQL's epoch (2000-01-01 UTC) in microseconds since the Unix epoch.
_PG_EPOCH_UNIX_US = int(PG_EPOCH.timestamp()) * 1_000_000


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
        self._commit_second: int | None = None  # the second (since 2000) whose text _commit_second_text is
        self._commit_second_text = ""

    def start_at(self, confirmed_lsn: int) -> None:
        """Streaming starts at the slot's confirmed LSN."""
        self.tracker = AckTracker(confirmed_lsn)
        self.received_lsn = confirmed_lsn

    def begin(self, msg: pgoutput.Begin) -> None:
        self.begin_at(msg.final_lsn, to_pg_time(msg.commit_time), msg.xid)

    def begin_at(self, final_lsn: int, commit_time_us: int, xid: int) -> None:
        """A transaction begins: its commit LSN, commit time (microseconds since 2000-01-01 UTC, as
        the Begin message carries it) and xid. ValueError if the time is past what a datetime holds."""
        # The commit time's text: the date and time to the second are formatted once per second of
        # commits, not once per transaction (a stream of small transactions has thousands a second).
        second, micros = divmod(commit_time_us, 1_000_000)
        if second != self._commit_second:
            self._commit_second_text = pg_time(second * 1_000_000).replace(tzinfo=None).isoformat()
            self._commit_second = second
        self.txn = self.tracker.begin()
        self._seq_lsn = -1
        self.info = TransactionInfo(final_lsn, format_lsn(final_lsn), xid,
                                    f"{self._commit_second_text}.{micros:06d}Z")
        self.commit_epoch = (commit_time_us + _PG_EPOCH_UNIX_US) / 1_000_000
        self.counts = {}

    def commit(self, end_lsn: int) -> None:
        """The transaction being read commits; the stream goes on at `end_lsn` (the Commit message's)."""
        assert self.txn is not None, "Commit without Begin"
        self.tracker.commit(self.txn, end_lsn)
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
