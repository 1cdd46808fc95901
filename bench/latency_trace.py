"""`cdc` with timestamps along a row's way, for the latency leg of bench/run.py (`--trace`).

Runs the cdc CLI (the checkout on PYTHONPATH) with a few functions wrapped to time each stage a
change passes between its source commit and the sink's target transaction, all on this machine's
wall clock:

    receive      source commit (the transaction's commit time) -> the connector reads its COMMIT,
                 split into walsender (commit -> the server's send time of the frame) and read
                 (that send time -> the connector handles the frame)
    linger       an event appended to a record batch -> the batch handed to the producer
    handoff      how long handing a batch to the producer waited (aiokafka holds one undrained batch
                 per partition; the connector's read loop waits while it does)
    produce      the batch handed to the producer -> Kafka acknowledged it
    fetch        the record's timestamp (its append in the connector) -> the sink's fetch returned it
    fetch_to_apply  the sink's fetch returned -> the target transaction of its batch began
    apply        the target transaction of a batch (rows + positions, commit included)
    applied      the oldest record of a fetch (its timestamp) -> its batch committed in the target
    fetch_records, applied_rows  records per non-empty fetch, rows per applied batch (counts, not ms)
    loop_lag     how late a 10 ms timer of the event loop fires (GIL and long callbacks delay all stages)

Every 2 seconds the percentiles (ms) of each stage since start are written as JSON to the file named
by $CDC_TRACE_OUT. Nothing of cdc changes; this only wraps. Usage: python bench/latency_trace.py run FILE
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import defaultdict

SAMPLES: dict[str, list[float]] = defaultdict(list)
COUNTS: dict[str, int] = defaultdict(int)


def note(stage: str, seconds: float, weight: int = 1) -> None:
    samples = SAMPLES[stage]
    if len(samples) < 2_000_000:
        samples.extend([seconds * 1000] * weight)


def summary() -> dict:
    out = {}
    for stage, samples in list(SAMPLES.items()):
        ordered = sorted(samples)
        if not ordered:
            continue
        pct = lambda p: round(ordered[min(len(ordered) - 1, len(ordered) * p // 100)], 2)  # noqa: E731
        out[stage] = {"n": len(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": round(ordered[-1], 2),
                      "mean": round(sum(ordered) / len(ordered), 2)}
    out["counts"] = dict(COUNTS)
    return out


def dump_forever(path: str) -> None:
    while True:
        time.sleep(2)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary(), f, indent=1)
        os.replace(tmp, path)


def install() -> None:
    from aiokafka import AIOKafkaProducer

    from cdc.connector.stream import Stream
    from cdc.source.postgres.frames import PG_EPOCH, XLOGDATA_PAYLOAD
    from cdc.source.postgres.replication import ReplicationConnection

    PG_EPOCH_S = PG_EPOCH.timestamp()
    from cdc.publish.kafka import Publisher
    from cdc.sink.apply import Applier
    from cdc.sink.consume import PartitionReader
    from cdc.sink.runner import Sink

    poll_data = ReplicationConnection.poll_data
    sent: dict[str, float] = {}

    def traced_poll_data(self):
        data = poll_data(self)
        if data is not None and data[:1] == b"w" and len(data) >= XLOGDATA_PAYLOAD:
            sent["last"] = PG_EPOCH_S + int.from_bytes(data[17:25], "big", signed=True) / 1e6  # send time
        return data

    ReplicationConnection.poll_data = traced_poll_data
    commit_now = Stream._commit_now

    def traced_commit_now(self, end_lsn):
        now = time.time()
        note("receive", now - self.positions.commit_epoch)
        if "last" in sent:
            note("walsender", sent["last"] - self.positions.commit_epoch)
            note("read", now - sent["last"])
        return commit_now(self, end_lsn)

    Stream._commit_now = traced_commit_now

    send = Publisher._send

    async def traced_send(self, tp):
        batch = self._open.get(tp)
        if batch is not None:
            note("linger", time.monotonic() - batch.opened_at)
            COUNTS[f"batches {tp[0].rsplit('.', 1)[-1]}"] += 1
            COUNTS[f"records {tp[0].rsplit('.', 1)[-1]}"] += sum(batch.owners.values())
        await send(self, tp)

    Publisher._send = traced_send

    send_batch = AIOKafkaProducer.send_batch

    async def traced_send_batch(self, batch, topic, *, partition):
        called = time.time()
        future = await send_batch(self, batch, topic, partition=partition)
        handed = time.time()
        note("handoff", handed - called)
        future.add_done_callback(lambda f: note("produce", time.time() - handed))
        return future

    AIOKafkaProducer.send_batch = traced_send_batch

    fetch = PartitionReader.fetch
    fetched_at: dict[str, float] = {}

    async def traced_fetch(self, max_records):
        fetched = await fetch(self, max_records)
        now = time.time()
        COUNTS["fetches"] += 1
        if fetched:
            COUNTS["fetches with records"] += 1
            fetched_at["last"] = now
            stamps = [m.timestamp / 1000 for messages in fetched.values() for m in messages]
            for stamp in stamps:
                note("fetch", now - stamp)
            fetched_at["oldest"] = min(stamps)
            note("fetch_records", len(stamps) / 1000)  # records per non-empty fetch (x1000 undone by ms)
        return fetched

    PartitionReader.fetch = traced_fetch

    apply = Applier.apply

    async def traced_apply(self, builder, ahead=None):
        began = time.time()
        if "last" in fetched_at:
            note("fetch_to_apply", began - fetched_at["last"])
        before = self.events_applied
        await apply(self, builder, ahead)
        done = time.time()
        applied = self.events_applied - before
        if applied:
            note("apply", done - began)
            note("applied_rows", applied / 1000)
            if "oldest" in fetched_at:
                note("applied", done - fetched_at.pop("oldest"), 1)

    Applier.apply = traced_apply

    run = Sink.run

    async def traced_run(self):
        async def lag():
            loop = asyncio.get_running_loop()
            while True:
                due = loop.time() + 0.01
                await asyncio.sleep(0.01)
                note("loop_lag", loop.time() - due)

        task = asyncio.ensure_future(lag())
        try:
            await run(self)
        finally:
            task.cancel()

    Sink.run = traced_run


if __name__ == "__main__":
    out = os.environ["CDC_TRACE_OUT"]
    install()
    threading.Thread(target=dump_forever, args=(out,), daemon=True).start()
    from cdc.cli import main

    main(prog_name="cdc")
