"""The slot as the source sees it, polled for metrics: how much WAL it has not confirmed and how
much the source keeps for it. A plain connection of its own, in a thread, so a slow or unreachable
source never holds up streaming; a failed poll leaves the last values and is tried again."""

from __future__ import annotations

import logging
import threading

import psycopg

from cdc import metrics

log = logging.getLogger(__name__)

_STATUSES = ("reserved", "extended", "unreserved", "lost")
_QUERY = """SELECT pg_current_wal_lsn() - confirmed_flush_lsn, pg_current_wal_lsn() - restart_lsn, wal_status
            FROM pg_replication_slots WHERE slot_name = %s"""


class SlotMonitor:
    def __init__(self, conninfo: str, slot: str, interval_s: float = 10.0):
        self.conninfo, self.slot, self.interval_s = conninfo, slot, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdc-slot-monitor", daemon=True)

    def start(self) -> "SlotMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.conninfo, autocommit=True, application_name="cdc slot monitor")
                row = conn.execute(_QUERY, (self.slot,)).fetchone()
                if row is not None:
                    self.record(*row)
            except psycopg.Error as exc:
                log.debug("slot monitor: %s", exc)
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval_s)
        if conn is not None:
            conn.close()

    @staticmethod
    def record(lag: int | None, retained: int | None, status: str | None) -> None:
        if lag is not None:
            metrics.SLOT_LAG.set(int(lag))
        if retained is not None:
            metrics.SLOT_RETAINED.set(int(retained))
        for name in _STATUSES:
            metrics.SLOT_WAL_STATUS.labels(status=name).set(1 if name == status else 0)
