"""ChangeEvent: the Kafka key and value of one row change, as the event contract in DESIGN.md fixes them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

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
        value = {
            "op": self.op,
            "before": self.before,
            "after": self.after,
            "source": {
                "pipeline": pipeline, "db": db, "schema": schema, "table": table,
                "commit_lsn": self.txn.commit_lsn_text, "lsn": self.lsn_text, "seq": self.position.seq,
                "txid": self.txn.xid, "commit_ts": self.txn.commit_ts_text, "snapshot": self.snapshot,
            },
            "ts_ms": time.time_ns() // 1_000_000,
        }
        if self.unchanged:  # only then: every other event carries its full row
            value["unchanged"] = list(self.unchanged)
        return orjson.dumps(value)

    def encode_key(self) -> bytes | None:
        return None if self.key is None else orjson.dumps(self.key)
