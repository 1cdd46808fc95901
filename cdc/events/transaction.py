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

import functools
import time
from dataclasses import dataclass

import orjson

from cdc.events.codec import loads, position_of
from cdc.events.envelope import TransactionInfo
from cdc.lsn import Position

STATUS_END = "END"


def topic_of(pipeline: str) -> str:
    """The pipeline's transactions topic (see also the snapshots topic, cdc.snapshots.progress.state_topic)."""
    return f"{pipeline}.transactions"


def encode_end(pipeline: str, db: str, txn: TransactionInfo, counts: dict[str, int]) -> tuple[bytes, bytes]:
    """Kafka key and value of the record that closes `txn`; `counts`: events published per topic.

    The value is orjson's encoding of {"status", "event_count", "topics", "source"
    (cdc.events.codec.transaction_source), "ts_ms"}, put together from its parts: one is written per
    source transaction, thousands a second for single-row ones."""
    xid, lsn = orjson.dumps(txn.xid), orjson.dumps(txn.commit_lsn_text)
    value = b'{"status":"%s","event_count":%d,"topics":%s,"source":%s,"commit_lsn":%s,"lsn":%s,"seq":0,' \
            b'"txid":%s,"commit_ts":%s},"ts_ms":%d}' % (
                _STATUS_END, sum(counts.values()), orjson.dumps(counts), _source_head(pipeline, db), lsn, lsn, xid,
                orjson.dumps(txn.commit_ts_text), time.time_ns() // 1_000_000)
    return b'{"txid":%s}' % xid, value


_STATUS_END = STATUS_END.encode()


@functools.lru_cache(maxsize=64)
def _source_head(pipeline: str, db: str) -> bytes:
    """The start of an END record's source: its pipeline and db, and no closing brace."""
    return orjson.dumps({"pipeline": pipeline, "db": db})[:-1]


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
