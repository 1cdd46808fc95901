"""The publish stage: events of a TableStream -> Kafka records (value, key, headers, tombstones on
compacted topics), each counted against its transaction in the AckTracker; and the END record on
{pipeline}.transactions that closes a transaction. Fed by the stream and snapshot stages; Kafka's
acknowledgements flow back through the Publisher's callbacks into cdc.connector.confirm.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from cdc import failpoints, metrics
from cdc.config import PipelineConfig
from cdc.connector.positions import Positions
from cdc.connector.shapes import PublishedShapes
from cdc.connector.tables import TableStream
from cdc.errors import DecodeError
from cdc.events.codec import EventSources, encode_change, event_sources
from cdc.events.envelope import ChangeEvent
from cdc.events.origin import HEADER as ORIGIN_HEADER
from cdc.events.origin import SourceOrigin
from cdc.events.transaction import encode_end
from cdc.events.transaction import topic_of as transactions_topic
from cdc.publish.kafka import Publisher

# The key of truncate events on a compacted topic. Row keys are JSON objects, so it never collides.
TRUNCATE_KEY = b'"truncate"'
# Snapshot rows encoded in one call of the compiled core: few enough that their records, held until
# they are in batches, weigh little beside the chunk (about 0.5 MiB of the usual rows).
SNAPSHOT_ROWS_AT_ONCE = 1_000


class EventPublishing:
    def __init__(self, config: PipelineConfig, publisher: Publisher, positions: Positions, shapes: PublishedShapes,
                 db_name: str, origin: SourceOrigin):
        self.config = config
        self.publisher = publisher
        self.positions = positions
        self.shapes = shapes
        self.db_name = db_name
        self.transactions_topic = transactions_topic(config.pipeline)
        self._end_headers = [(ORIGIN_HEADER, origin.to_json())]
        self.events_published = 0
        self._last_sources: tuple[TableStream, Any, EventSources] | None = None

    def publish_now(self, stream: TableStream, event: ChangeEvent) -> bool:
        """`publish` without waiting, for the usual event: False, having published nothing, when
        something must be awaited first (the table's schema or shape not on Kafka yet, a full batch,
        a tombstone to follow); then `publish` it."""
        if not (stream.schema_sent and stream.shape_recorded) or (event.op == "d" and stream.compacted):
            return False
        positions = self.positions
        txn = positions.txn
        assert txn is not None
        value = self._value(stream, event)
        key = event.encode_key()
        if key is None and stream.compacted:
            key = TRUNCATE_KEY
        if not self.publisher.append(stream.topic, 0, key, value, stream.headers, txn):
            return False
        self._appended(stream)
        return True

    def publish_insert_now(self, stream: TableStream, after: dict[str, Any], lsn: int) -> bool:
        """`publish_now` for the usual change, an INSERT into a table the privacy policy leaves whole:
        its key and value straight from the row, without the ChangeEvent that `row_events` builds
        (the same bytes; tests/unit/test_event_encoding.py). False, having published nothing and
        taken no position, where `publish_now` would be False."""
        if not (stream.schema_sent and stream.shape_recorded):
            return False
        lsn_text, seq = self.positions.next_at(lsn)
        try:
            value = encode_change("c", None, after, self._source(stream).at(lsn_text, seq), time.time_ns() // 1_000_000)
            key = orjson.dumps({name: after[name] for name in stream.key_names})
        except orjson.JSONEncodeError:
            raise self._unencodable(stream, lsn_text, after) from None
        if not self.publisher.append(stream.topic, 0, key, value, stream.headers, self.positions.txn):
            return False
        self.positions.took_next()
        self._appended(stream)
        return True

    def publish_insert_message(self, stream: TableStream, message: bytes, lsn: int) -> bool | Awaitable[None]:
        """The same for the compiled core, from the pgoutput Insert message itself
        (stream.insert_encoder): False, having done nothing, where the general path must decide;
        True once published; else what is left to await (a full batch to ship first)."""
        if not (stream.schema_sent and stream.shape_recorded):
            return False
        lsn_text, seq = self.positions.next_at(lsn)
        sources = self._source(stream)
        record = stream.insert_encoder.encode(message, sources.head, lsn_text, seq, sources.tail, time.time_ns() // 1_000_000)
        if record is None:
            return False
        if failpoints.armed:
            failpoints.reached("connector.received")
        return self._publish_next(stream, *record)

    async def publish_snapshot_rows(self, stream: TableStream, rows: list[tuple], start: int, lsn: int) -> int:
        """`publish_insert_message` for a snapshot chunk's rows (their columns' texts) from
        `rows[start]` on: their `r` events, as `publish` would publish the ChangeEvents of
        `snapshot_row`, encoded by the compiled core SNAPSHOT_ROWS_AT_ONCE at a time. Returns how
        many it published: it stops before the first row the general path must decide."""
        if not (stream.schema_sent and stream.shape_recorded):
            return 0
        positions, publisher, encoder = self.positions, self.publisher, stream.insert_encoder
        published = 0
        while start + published < len(rows):
            lsn_text, seq = positions.next_at(lsn)
            sources = self._source(stream, snapshot=True)
            first = start + published
            records = encoder.encode_rows(rows, first, first + SNAPSHOT_ROWS_AT_ONCE, sources.head, lsn_text, seq,
                                          sources.tail, time.time_ns() // 1_000_000)
            done = 0
            while done < len(records):
                added = publisher.append_many(stream.topic, 0, records, done, stream.headers, positions.txn)
                if added:
                    positions.took(added)
                    self._appended(stream, added)
                    done += added
                if done < len(records):  # the open batch is full: ship it (may wait for room), then go on
                    positions.took_next()
                    await self._publish_record(stream, *records[done])
                    done += 1
            published += done
            if done < min(SNAPSHOT_ROWS_AT_ONCE, len(rows) - first):
                break  # the next row is the general path's
        return published

    def _publish_next(self, stream: TableStream, key: bytes, value: bytes) -> bool | Awaitable[None]:
        """The one-step paths' record at the position `next_at` gave, which it takes, into its
        partition's batch: True, or what is left to await (a full batch to ship first)."""
        positions = self.positions
        positions.took_next()
        if self.publisher.append(stream.topic, 0, key, value, stream.headers, positions.txn):
            self._appended(stream)
            return True
        return self._publish_record(stream, key, value)

    async def _publish_record(self, stream: TableStream, key: bytes, value: bytes) -> None:
        await self.publisher.publish(stream.topic, 0, key, value, stream.headers, self.positions.txn)
        self._appended(stream)

    def _appended(self, stream: TableStream, events: int = 1) -> None:
        """Events of the transaction being read are in a batch."""
        positions = self.positions
        positions.txn.outstanding += events  # positions.tracker.sent(txn), inline
        self.events_published += events
        if failpoints.armed:
            for _ in range(events):
                failpoints.reached("connector.published")
        counts = positions.counts
        counts[stream.topic] = counts.get(stream.topic, 0) + events

    def _source(self, stream: TableStream, snapshot: bool = False) -> EventSources:
        """The sources of the stream's events in the transaction being read (kept for a run of them)."""
        last = self._last_sources
        if last is not None and last[0] is stream and last[1] is self.positions.info and last[2].snapshot is snapshot:
            return last[2]
        ref = stream.ref
        sources = event_sources(self.config.pipeline, self.db_name, ref.schema, ref.name, self.positions.info, snapshot)
        self._last_sources = (stream, self.positions.info, sources)
        return sources

    async def publish(self, stream: TableStream, event: ChangeEvent, partition: int = 0) -> None:
        # Topics have one partition (see KafkaConfig.partitions): every event of a table, in order.
        positions = self.positions
        txn = positions.txn
        assert txn is not None
        value = self._value(stream, event)
        if not stream.schema_sent:
            await self.shapes.publish_schema(stream)
        if not stream.shape_recorded:
            await self.shapes.record(stream, event)
        key = event.encode_key()
        if key is None and stream.compacted:
            key = TRUNCATE_KEY  # a compacted topic refuses records without a key
        await self.publisher.publish(stream.topic, partition, key, value, stream.headers, txn)
        positions.tracker.sent(txn)
        self.events_published += 1
        failpoints.reached("connector.published")
        if event.op == "d" and stream.compacted:
            # A tombstone lets compaction drop the key for good; sinks skip it (no value).
            await self.publisher.publish(stream.topic, partition, key, None, [], txn)
            positions.tracker.sent(txn)
        positions.counts[stream.topic] = positions.counts.get(stream.topic, 0) + 1

    def _value(self, stream: TableStream, event: ChangeEvent) -> bytes:
        try:
            return event.encode_value(self.config.pipeline, self.db_name, stream.ref.schema, stream.ref.name)
        except orjson.JSONEncodeError:  # converters return JSON values; this names the place if one did not
            raise self._unencodable(stream, event.lsn_text, event.after or event.before or {}) from None

    @staticmethod
    def _unencodable(stream: TableStream, lsn_text: str, row: dict[str, Any]) -> DecodeError:
        return DecodeError(
            f"cannot encode an event of {stream.ref} at LSN {lsn_text} as JSON: column(s) "
            f"{', '.join(_unencodable(row))} (please report this type)"
        )

    def publish_end(self) -> bool | Awaitable[None]:
        """Close the transaction on the transactions topic: what it published, per topic. Owned by the
        transaction like its events, so its commit LSN is confirmed only once Kafka has this too.
        True once in its batch, else what is left to await (a full batch to ship first)."""
        positions = self.positions
        assert positions.txn is not None and positions.info is not None
        key, value = encode_end(self.config.pipeline, self.db_name, positions.info, positions.counts)
        if not self.publisher.append(self.transactions_topic, 0, key, value, self._end_headers, positions.txn):
            return self._publish_end_record(key, value)
        positions.tracker.sent(positions.txn)
        return True

    async def _publish_end_record(self, key: bytes, value: bytes) -> None:
        positions = self.positions
        await self.publisher.publish(self.transactions_topic, 0, key, value, self._end_headers, positions.txn)
        positions.tracker.sent(positions.txn)


def acknowledged_metrics(config: PipelineConfig) -> Callable[[str, int, int, float], None]:
    """The Publisher's on_acknowledged: the published-events metrics (a table's tombstones count as its records)."""
    table_of_topic = {config.topic_for(t): str(t) for t in config.source.tables}  # metrics labels

    def acknowledged(topic: str, records: int, size: int, seconds: float) -> None:
        metrics.PRODUCE_LATENCY.observe(seconds)
        table = table_of_topic.get(topic)
        if table is not None:
            metrics.EVENTS_PUBLISHED.labels(table=table).inc(records)
            metrics.BYTES_PUBLISHED.labels(table=table).inc(size)

    return acknowledged


def _unencodable(row: dict[str, Any]) -> list[str]:
    bad = []
    for name, value in row.items():
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            bad.append(name)
    return bad
