"""Transaction boundaries: one record per source transaction on the pipeline's transactions topic.

The connector publishes it after the transaction's last event, so the commit LSN is confirmed to
PostgreSQL only once Kafka holds it too. It says how many events the transaction published to
each topic: a consumer that has read that many events of this commit LSN from a topic has all of
the transaction's changes there, and can apply the transaction as a whole.

It carries a `source` with `commit_lsn`, `lsn` (= the commit LSN) and `seq` 0 like an event, so
the records of the topic have positions that increase along it and every position-based tool (the
sink's stored positions, replay's search) reads them the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from cdc.events.codec import loads, position_of, transaction_source
from cdc.events.envelope import TransactionInfo
from cdc.lsn import Position

STATUS_END = "END"


def topic_of(pipeline: str) -> str:
    """The pipeline's transactions topic (see also the snapshots topic, cdc.snapshots.progress.state_topic)."""
    return f"{pipeline}.transactions"


def encode_end(pipeline: str, db: str, txn: TransactionInfo, counts: dict[str, int]) -> tuple[bytes, bytes]:
    """Kafka key and value of the record that closes `txn`; `counts`: events published per topic."""
    value = {
        "status": STATUS_END,
        "event_count": sum(counts.values()),
        "topics": counts,
        "source": transaction_source(pipeline, db, txn),
        "ts_ms": time.time_ns() // 1_000_000,
    }
    return orjson.dumps({"txid": txn.xid}), orjson.dumps(value)


@dataclass(frozen=True, slots=True)
class End:
    position: Position
    counts: dict[str, int]  # topic -> events of the transaction published to it

    @property
    def commit_lsn(self) -> int:
        return self.position.commit_lsn


def decode_end(value: bytes) -> End:
    """Raises ValueError, KeyError or TypeError for anything that is not a transaction end record."""
    record = loads(value)
    if record["status"] != STATUS_END:
        raise ValueError(f"status {record['status']!r}")
    position = position_of(record["source"])
    counts = {str(topic): int(n) for topic, n in record["topics"].items()}
    return End(position, counts)
