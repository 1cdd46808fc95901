"""ChangeEvent: one row change as the connector built it; cdc.events.codec encodes its Kafka key and value."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cdc.events.codec import encode_event, encode_key
from cdc.lsn import Position

OPS = ("c", "u", "d", "r", "t")


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    """What every event of one transaction shares; formatted once per transaction."""

    commit_lsn: int
    commit_lsn_text: str
    xid: int
    commit_ts_text: str


@dataclass(slots=True)
class ChangeEvent:
    op: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    key: dict[str, Any] | None  # primary key values; None for truncate
    position: Position
    lsn_text: str  # LSN of the change record itself
    txn: TransactionInfo
    unchanged: tuple[str, ...] = ()  # columns `after` lacks: values the source did not resend
    snapshot: bool = False  # an existing row read by a snapshot (op "r")

    def encode_value(self, pipeline: str, db: str, schema: str, table: str) -> bytes:
        return encode_event(self, pipeline, db, schema, table, time.time_ns() // 1_000_000)

    def encode_key(self) -> bytes | None:
        return encode_key(self)
