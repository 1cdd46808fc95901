"""The source-history guard: may these events follow what the sink applied?

Every event carries its source history in the ``cdc.origin`` header (the cluster's system id and
timeline, cdc.events.origin), and every stored position the history it belongs to. An event of
another cluster, an earlier timeline, or a later timeline that forked before what the sink applied
stops the sink with SourceHistoryError (exit 4) unless the operator accepts the new history
(``--accept-source-history``, README "Source history"). The stored-offset (lost data) guard is in
:mod:`cdc.sink.consume`; a record that is no cdc event stops the sink with UnreadableRecordError.
"""

from __future__ import annotations

import logging

from cdc.errors import Failed, Kind, SinkError, SourceHistoryError
from cdc.events.codec import NotAnEvent
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.lsn import format_lsn
from cdc.redact import one_line
from cdc.sink.backends.base import HistoryId, PartitionProgress

log = logging.getLogger(__name__)


class SkipRefusedError(SinkError):
    """`--skip-record` names a record that cannot or must not be skipped: nothing was skipped."""

    kind = Kind.BAD_INPUT


class UnreadableRecordError(SinkError):
    """A record on a topic the sink reads is no cdc event (invalid JSON, `[]`, an END record that
    is not one): the sink stops before it, exit 4, naming the record and the deliberate way past it
    (`cdc sink --skip-record`); it never skips one by itself."""

    failed = Failed.DATA
    kind = Kind.WOULD_LOSE_DATA

    def __init__(self, message: str, record: tuple[str, int, int] | None = None):
        super().__init__(message)
        self.record = record  # (topic, partition, offset)


def unreadable(message, what: str, exc: Exception) -> UnreadableRecordError:
    where = f"{message.topic}[{message.partition}]@{message.offset}"
    detail = one_line(exc) if isinstance(exc, NotAnEvent) else f"{type(exc).__name__}: {one_line(exc)}"  # the codec names the cause
    return UnreadableRecordError(f"{where}: not {what} ({detail})",
                                 (message.topic, message.partition, message.offset))


def origin_of(message, cache: dict[bytes, SourceOrigin], where: str) -> SourceOrigin | None:
    """The message's cdc.origin header, parsed once per distinct header; None without one."""
    raw = next((v for k, v in (message.headers or ()) if k == ORIGIN_HEADER), None)
    if raw is None:
        return None  # events of connectors older than the header: accepted as before
    origin = cache.get(raw)
    if origin is None:
        try:
            origin = cache[raw] = SourceOrigin.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise SinkError(f"{where}: unreadable {ORIGIN_HEADER} header ({type(exc).__name__})") from None
    return origin


def history_problem(stored: PartitionProgress, origin: SourceOrigin) -> str | None:
    """Why events of `origin` cannot follow what the sink stored, or None if they can.

    A later timeline of the same cluster is fine when everything applied is part of it: the last
    applied commit record starts before the point where the new timeline branched off. (A commit at
    or after that point was written by the old primary after the fork.)
    """
    assert stored.origin is not None
    system_id, timeline = stored.origin
    applied = f"applied up to {format_lsn(stored.position.commit_lsn)} from system {system_id} timeline {timeline}"
    if origin.system_id != system_id:
        return f"the event comes from another database cluster ({origin}); the sink {applied}"
    if origin.timeline < timeline:
        return f"the event comes from an earlier timeline ({origin}) than the sink {applied}"
    if origin.timeline > timeline and stored.position.commit_lsn >= origin.timeline_start:
        return (
            f"the sink {applied}, past the start of the new {origin}: changes the old primary had "
            f"from {format_lsn(origin.timeline_start)} on are in the target but not in the new history"
        )
    return None


class SourceHistoryGuard:
    """Checks each event's source history against the partition's stored one (history_problem)."""

    def __init__(self, origins: dict[bytes, SourceOrigin] | None = None, *, accept: bool = False,
                 rerun_hint: str = "--accept-source-history"):
        self.origins = {} if origins is None else origins  # header bytes -> parsed origin, kept across batches
        self.accept = accept  # --accept-source-history: a new history is taken, with a warning
        self.rerun_hint = rerun_hint  # the command that accepts a new source history

    def origin_of(self, message, where: str) -> SourceOrigin | None:
        return origin_of(message, self.origins, where)

    def history(self, message, where: str, done: PartitionProgress | None) -> tuple[HistoryId | None, bool]:
        """The history to store with the message's position (`done`: the partition's last one), and
        whether it starts a new one; SourceHistoryError if it may not follow `done`."""
        origin = self.origin_of(message, where)
        if origin is None:
            return (done.origin if done else None), False
        new = (origin.system_id, origin.timeline)
        if done is None or done.origin is None or done.origin == new:
            return new, False
        problem = history_problem(done, origin)
        if problem is None:
            log.info("%s: continuing on %s", where, origin)
        elif self.accept:
            log.warning("%s: accepting a new source history as asked (--accept-source-history): %s", where, problem)
        else:
            raise SourceHistoryError(
                f"{where}: {problem}; nothing was applied. To keep the target as it is and continue with "
                f"the new history, run {self.rerun_hint} (see README, Source history)"
            )
        return new, True
