"""The connector's side of `cdc verify`: a verification chunk's rows, read between watermarks like a
snapshot chunk and built and masked like ``r`` events, become one control record with per-row
digests at the high watermark's place in the table's topic (cdc.verify.records); and a finished
table's list of chunks goes to ``{pipeline}.verify``, so the CLI knows which results to wait for.

Fed by cdc.connector.snapshots (the chunk at its high watermark); the record goes out through the
same Publisher and AckTracker as events, counted in the transaction's END record like them.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from cdc.config import PipelineConfig
from cdc.connector.changes import snapshot_row
from cdc.connector.positions import Positions
from cdc.connector.publishing import EventPublishing
from cdc.connector.tables import TableStream
from cdc.events.codec import event_source
from cdc.events.keys import hashable_key
from cdc.publish.kafka import Publisher
from cdc.snapshots.jobs import Chunk, Job
from cdc.verify import records
from cdc.verify.digests import key_digest, row_digest


class VerifyPublishing:
    def __init__(self, config: PipelineConfig, publisher: Publisher, positions: Positions, publishing: EventPublishing):
        self.config = config
        self.publisher = publisher
        self.positions = positions
        self.db_name = publishing.db_name
        self.shapes = publishing.shapes

    async def publish_chunk(self, stream: TableStream, chunk: Chunk, lsn: int) -> None:
        """The chunk's digests as a control record at this place of the stream (the high watermark)."""
        assert chunk.read is not None
        digests: dict[str, str] = {}
        changed = chunk.changed
        # Keys changed inside the window, read or not (inserted, or moved into the range): neither
        # side compares them; the stream brings their state, to be compared by a later verification.
        excluded = sorted({key_digest([dict(key).get(k) for k in stream.key_names]) for key in changed})
        key_names = stream.key_names
        if not chunk.truncated:
            for raw in chunk.read.rows:
                after, key = snapshot_row(stream, raw, lsn)
                key_values = [key[k] for k in key_names]
                if changed and hashable_key(key) in changed:
                    continue
                digests[key_digest(key_values)] = row_digest(after)
                chunk.emitted += 1
        verify: dict[str, Any] = {
            "request": chunk.job.request, "chunk": chunk.id, "table": str(chunk.job.table),
            "lo": self._key_of_texts(stream, chunk.after_key),
            # The last chunk's range has no end but the job's: a re-read one that now holds fewer
            # rows than a chunk's size is still not the last (cdc.snapshots.jobs, Chunk.last).
            "hi": self._key_of_texts(stream, chunk.job.until_key if chunk.last else chunk.read.last_key),
            "part": chunk.job.part, "repair": chunk.job.repair,
            "excluded": excluded, "rows": digests, "truncated": chunk.truncated,
        }
        event = self.positions.event(records.CONTROL_OP, None, None, None, lsn, snapshot=True)
        source = event_source(event, self.config.pipeline, self.db_name, stream.ref.schema, stream.ref.name)
        value = records.control_value(source, time.time_ns() // 1_000_000, verify)
        txn = self.positions.txn
        assert txn is not None
        if not stream.schema_sent:  # the record names the table's schema by id, as events do
            await self.shapes.publish_schema(stream)
        # Topics have one partition (see KafkaConfig.partitions): the record goes where every event of the table goes.
        await self.publisher.publish(stream.topic, 0, records.control_key(chunk.id), value, stream.headers, txn)
        self.positions.tracker.sent(txn)
        self.positions.counts[stream.topic] = self.positions.counts.get(stream.topic, 0) + 1
        chunk.job.chunk_ids.append(chunk.id)

    async def publish_summary(self, job: Job) -> None:
        """Which chunks the sinks answer for this table: the CLI waits for each."""
        value = orjson.dumps({"request": job.request, "table": str(job.table), "part": job.part,
                              "chunks": job.chunk_ids, "rows": job.rows})
        await self.publisher.send_and_wait(records.results_topic(self.config.pipeline),
                                           records.summary_key(job.request, str(job.table), job.part), value)

    @staticmethod
    def _key_of_texts(stream: TableStream, texts: list[str] | None) -> list[Any] | None:
        """Key texts as the source printed them -> the key's values as published."""
        if texts is None:
            return None
        values = []
        for name, text in zip(stream.key_names, texts):
            convert = stream.converters[stream.names.index(name)]
            assert convert is not None, "a key column is never dropped"
            values.append(convert(text.encode()))
        return values


def ranges_of(payload: dict[str, Any]) -> list[tuple[str, list[str] | None, list[str] | None]]:
    """The key ranges a request verifies again: (table, key texts after which, key texts up to which)."""
    out = []
    for item in payload.get("ranges") or ():
        if isinstance(item, dict) and isinstance(item.get("table"), str):
            out.append((item["table"], _texts(item.get("lo")), _texts(item.get("hi"))))
    return out


def _texts(values: list[Any] | None) -> list[str] | None:
    """Published key values -> texts PostgreSQL casts back to the key's types (chunks compare keys as texts)."""
    if values is None:
        return None
    return [("true" if v else "false") if isinstance(v, bool) else str(v) for v in values]
