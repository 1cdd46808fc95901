"""The sink's side of `cdc verify`: at a verification control record (cdc.verify.records), after
every change before it is applied and before any after it, the target's rows of the record's key
range are read back into their published form (cdc.sink.backends.readback), digested like the
connector digested the source's rows, and compared: the result goes to ``{pipeline}.verify``,
keyed by request, sink, table and chunk (a compacted topic: a repeat replaces it).

Rows whose key the stream changed while the source side was read are left out on both sides.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from cdc import metrics
from cdc.config import KafkaConfig
from cdc.events.schema import TableSchema
from cdc.sink.apply import Applier
from cdc.sink.assemble import BatchBuilder
from cdc.sink.backends.base import TableChanges, Target
from cdc.sink.backends.readback import read_range
from cdc.verify import records
from cdc.verify.digests import key_digest, row_digest

log = logging.getLogger(__name__)


def split_at_controls(released: list[tuple[Any, Any]]) -> list[tuple[list[tuple[Any, Any]], Any]]:
    """Released (message, parsed) pairs -> runs each ended by a control record (None: the last run)."""
    runs: list[tuple[list[tuple[Any, Any]], Any]] = []
    start = 0
    is_control = records.is_control
    for i in [i for i, (message, _) in enumerate(released) if is_control(message)]:  # (none, mostly)
        runs.append((released[start:i], released[i][0]))
        start = i + 1
    runs.append((released[start:], None))
    return runs


def compare(source_rows: dict[str, str], excluded: set[str], target_rows: list[dict[str, Any]],
            key: tuple[str, ...]) -> dict[str, Any]:
    """Counts of missing (in the source only), extra (in the target only) and different rows."""
    target: dict[str, str] = {}
    for row in target_rows:
        digest = key_digest([row[k] for k in key])
        if digest not in excluded:
            target[digest] = row_digest(row)
    missing = sum(1 for k in source_rows if k not in target)
    extra = sum(1 for k in target if k not in source_rows)
    different = sum(1 for k, d in target.items() if k in source_rows and source_rows[k] != d)
    return {"rows": len(source_rows), "target_rows": len(target), "missing": missing, "extra": extra,
            "different": different, "equal": not (missing or extra or different)}


class Verifier:
    """Answers the control records of one sink attempt (one target connection)."""

    def __init__(self, kafka: KafkaConfig, pipeline: str, sink: str, target: Target):
        self.kafka = kafka
        self.topic = records.results_topic(pipeline)
        self.sink = sink
        self.target = target
        self._producer: AIOKafkaProducer | None = None
        self.deleted = 0  # rows the last repaired range deleted

    @staticmethod
    async def stop(verifier: "Verifier | None") -> None:
        """Close a verifier's producer (if there is one); None, for the attempt's next verifier."""
        if verifier is not None and verifier._producer is not None:
            await verifier._producer.stop()
            verifier._producer = None

    async def reached(self, applier: Applier, builder: BatchBuilder, taken: list, message,
                      topic_tables: dict[str, str]) -> list:
        """A control record in the stream: the changes before it applied, its range compared before
        anything after it, then its position stored. Returns the (empty) list of taken records."""
        taken = await applier.apply_taken(builder, taken)
        schema = builder.schema_of(message)
        if not builder.add_marker(message, BatchBuilder.parse(message)[1]):
            return taken  # a repeat: answered before
        await self.answer(message, topic_tables[message.topic], schema)
        return await applier.apply_taken(builder, taken)

    async def answer(self, message, table: str, schema: TableSchema) -> None:
        verify = records.decode(message.value)["verify"]
        rows = await asyncio.to_thread(read_range, self.target, table, schema, verify.get("lo"), verify.get("hi"))
        excluded = set(verify.get("excluded") or ())
        if verify.get("repair"):  # the range's rows were just applied as r events: delete the others
            rows = await self._delete_extra(rows, verify.get("rows") or {}, excluded, table, schema)
        result = compare(verify.get("rows") or {}, excluded, rows, schema.key)
        result["repair"] = bool(verify.get("repair"))
        result["deleted"] = self.deleted if result["repair"] else 0
        result.update(request=verify["request"], chunk=verify["chunk"], table=verify["table"], sink=self.sink,
                      lo=verify.get("lo"), hi=verify.get("hi"), target_table=table)
        metrics_result = "equal" if result["equal"] else "different"
        metrics.VERIFY_RANGES.labels(sink=self.sink, table=verify["table"], result=metrics_result).inc()
        if not result["equal"]:
            log.warning("sink %s: verification %s: %s rows %s..%s differ from the source: %d missing, %d extra, "
                        "%d different", self.sink, verify["request"], verify["table"], verify.get("lo"),
                        verify.get("hi"), result["missing"], result["extra"], result["different"])
        await self._send(records.result_key(verify["request"], self.sink, verify["table"], verify["chunk"]),
                         orjson.dumps(result))

    async def _delete_extra(self, rows: list[dict[str, Any]], source_rows: dict[str, str], excluded: set[str],
                            table: str, schema: TableSchema) -> list[dict[str, Any]]:
        """Delete the target's rows of the range that the source no longer has; the rows left."""
        extra, kept = [], []
        for row in rows:
            digest = key_digest([row[k] for k in schema.key])
            (extra if digest not in source_rows and digest not in excluded else kept).append(row)
        if extra:
            deletes = [{k: row[k] for k in schema.key} for row in extra]
            await asyncio.to_thread(self.target.apply, f"{self.sink}.verify", [TableChanges(table, schema, False, deletes, [])], [])
            log.info("sink %s: repair: deleted %d rows of %s the source does not have", self.sink, len(extra), table)
        self.deleted = len(extra)
        return kept

    async def _send(self, key: bytes, value: bytes) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(**self.kafka.client_options(), client_id=f"cdc-{self.topic}", acks="all")
            await self._producer.start()
        await self._producer.send_and_wait(self.topic, value, key=key)
