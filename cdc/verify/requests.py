"""A verification request: written into the source's WAL for the connector (which reads the tables
in chunks between watermarks, see cdc.connector.verification), then its results collected from the
``{pipeline}.verify`` topic, where the connector lists each table's chunks and the sink answers each.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import PipelineConfig, TableRef
from cdc.events.codec import loads
from cdc.publish.admin import ensure_topics
from cdc.source.postgres.snapshot import message_prefix
from cdc.verify import records


def request_verify(conninfo: str, slot: str, tables: list[TableRef], rate: int | None,
                   ranges: list[dict[str, Any]] = (), repair: bool = False) -> tuple[str, bool]:
    """Write the request into the source's WAL: whole tables, or key `ranges` ({table, lo, hi} as a
    result has them) to check again, or to repair (`repair`: re-published as r events, and rows the
    source does not have deleted from the target). Returns its id and whether a connector holds the slot."""
    request = uuid.uuid4().hex[:12]
    payload = {"request": request, "verify": True, "tables": [str(t) for t in tables], "rate": rate,
               "ranges": list(ranges), "repair": repair}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s::text)",
                     (message_prefix(slot), orjson.dumps(payload).decode()))
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return request, row is not None and row[0] is not None


class Collected:
    """What has arrived for one request and one sink."""

    def __init__(self, request: str, sink: str, parts: list[tuple[str, int]]):
        self.request = request
        self.sink = sink
        self.parts = parts  # (table, part): a whole table is part 0; ranges checked again are 0, 1, ...
        self.summaries: dict[tuple[str, int], dict[str, Any]] = {}  # -> the connector's list of chunks
        self.results: dict[tuple[str, str], dict[str, Any]] = {}  # (table, chunk) -> the sink's result

    def take(self, key: bytes, value: bytes) -> None:
        try:
            parts = orjson.loads(key)
        except orjson.JSONDecodeError:
            return
        if not isinstance(parts, list) or not parts or parts[0] != self.request:
            return
        record = loads(value)
        if len(parts) == 4 and parts[1] == records.SOURCE_SIDE:
            self.summaries[(parts[2], parts[3])] = record
        elif len(parts) == 4 and parts[1] == self.sink:
            self.results[(parts[2], parts[3])] = record

    def missing(self) -> list[str]:
        """What is still awaited, for the message of a timeout."""
        out = []
        for table, part in self.parts:
            summary = self.summaries.get((table, part))
            if summary is None:
                out.append(f"{table}: the connector has not finished reading it")
                continue
            waiting = [c for c in summary["chunks"] if (table, c) not in self.results]
            if waiting:
                out.append(f"{table}: {len(waiting)} of {len(summary['chunks'])} ranges not answered by sink {self.sink}")
        return out


async def collect(config: PipelineConfig, collected: Collected, timeout: float, stop: asyncio.Event) -> bool:
    """Read the results topic until every result of the request is in (True) or `timeout` passes."""
    topic = records.results_topic(config.pipeline)
    counts = await ensure_topics(config.kafka, [topic], compact=True)
    consumer = AIOKafkaConsumer(**config.kafka.client_options(), client_id=f"cdc-verify-{collected.request}",
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(counts[topic])])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not stop.is_set() and loop.time() < deadline:
            fetched = await consumer.getmany(timeout_ms=500)
            for messages in fetched.values():
                for message in messages:
                    if message.key is not None and message.value is not None:
                        collected.take(message.key, message.value)
            if not collected.missing():
                return True
        return False
    finally:
        await consumer.stop()
