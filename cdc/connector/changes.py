"""Build and filter: a decoded row change (or a snapshot row) of a TableStream -> the events to
publish, each with its position; the privacy policy applied after positions are taken, so that
positions do not depend on the policy. Fed by the stream and snapshot stages; feeds the publish stage.
"""

from __future__ import annotations

from typing import Any

from cdc.connector.positions import Positions
from cdc.connector.tables import TableStream
from cdc.errors import DecodeError
from cdc.events import build
from cdc.events.envelope import ChangeEvent
from cdc.lsn import format_lsn
from cdc.source.postgres import pgoutput
from cdc.transform.rowfilter import FilterError

RowChange = pgoutput.Insert | pgoutput.Update | pgoutput.Delete


def row_events(positions: Positions, stream: TableStream, msg: RowChange, lsn: int) -> list[ChangeEvent]:
    keys = stream.key_names
    if isinstance(msg, pgoutput.Insert):
        built = build.insert_events(stream.row(msg.new, lsn), keys)
    elif isinstance(msg, pgoutput.Delete):
        full = msg.old is not None  # 'O': full before-image (REPLICA IDENTITY FULL); else 'K': the key
        built = build.delete_events(stream.row(msg.old if full else msg.key, lsn), full, keys)
    else:
        # 'O' (full before-image) or 'K' (old key, sent when the key changed), or neither.
        if msg.old is not None:
            old = stream.row(msg.old, lsn)
        else:
            old = build.key_of(stream.row(msg.key, lsn), keys) if msg.key is not None else None
        try:
            built = build.update_events(stream.row(msg.new, lsn), old, keys)
        except build.KeyNotSent as exc:
            raise DecodeError(
                f"UPDATE of {stream.ref} at LSN {format_lsn(lsn)} did not resend key column(s) {exc} and no "
                f"before-image holds them; skip it with: cdc connector FILE --skip-to-lsn (see the README)"
            ) from None
        if built[-1].unchanged:
            stream.partial_updates += 1
    events = [positions.event(e.op, e.before, e.after, e.key, lsn, e.unchanged) for e in built]
    if stream.policy is not None:
        # After positions are taken: an event the filter drops keeps its seq, so positions do
        # not depend on the policy.
        try:
            events = [e for e in stream.policy.apply(events) if e is not None]
        except FilterError as exc:
            raise DecodeError(f"{exc} (at LSN {format_lsn(lsn)})") from None
    return events


def truncate_event(positions: Positions, lsn: int) -> ChangeEvent:
    positions.restart_seq()  # one TRUNCATE record, one event per table: each is seq 0 in its own topic
    return positions.event("t", None, None, None, lsn)


def snapshot_row(stream: TableStream, raw: tuple, lsn: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A chunk's row as published (masked as streamed rows are; PostgreSQL applied the row filter)
    and its key, as published like the keys noted from the stream."""
    after = stream.row(raw, lsn)
    if stream.policy is not None:
        after = stream.policy.map_row(after)
    return after, build.key_of(after, stream.key_names)


def keys_touched(stream: TableStream, events: list[ChangeEvent]) -> list[Any]:
    """The keys the events change (an update that changes its key: both): what a snapshot chunk
    open around them must not publish an older state of."""
    keys = []
    for event in events:
        keys.append(event.key)
        if event.before is not None:
            keys.append(build.key_of(event.before, stream.key_names))
    return keys
