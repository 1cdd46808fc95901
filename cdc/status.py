"""`cdc status`: where a pipeline stands, from the source, Kafka and each sink's target.

Every part is asked on its own, so one that cannot be reached is reported (with what failed) while
the others are still shown.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import PipelineConfig
from cdc.events.codec import NotAnEvent, decode_source
from cdc.kafka_admin import partition_counts
from cdc.lsn import format_lsn, parse_lsn
from cdc.redact import one_line, redact, scrub
from cdc.snapshot import INITIAL, load_progress


def source_status(config: PipelineConfig) -> dict[str, Any]:
    dsn = config.source.postgres
    try:
        with psycopg.connect(config.source.conninfo, autocommit=True) as conn:
            (current,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            row = conn.execute(
                """SELECT active, active_pid, confirmed_flush_lsn::text, restart_lsn::text, wal_status,
                          pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
                   FROM pg_replication_slots WHERE slot_name = %s""",
                (config.source.slot,),
            ).fetchone()
    except psycopg.Error as exc:
        return {"reachable": False, "error": f"source {redact(dsn)}: {scrub(one_line(exc), dsn)}"}
    slot = None
    if row is not None:
        active, pid, confirmed, restart, wal_status, retained = row
        slot = {"name": config.source.slot, "active": bool(active), "pid": pid, "confirmed_flush_lsn": confirmed,
                "restart_lsn": restart, "retained_wal_bytes": retained, "wal_status": wal_status}
    return {"reachable": True, "current_wal_lsn": current, "slot": slot}


async def kafka_status(config: PipelineConfig) -> dict[str, Any]:
    """Per topic partition: the end offset and the position of the last event published."""
    consumer = AIOKafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers, enable_auto_commit=False,
                                request_timeout_ms=config.kafka.request_timeout_ms)
    try:
        await consumer.start()
    except Exception as exc:
        await consumer.stop()
        return {"reachable": False, "error": f"Kafka at {config.kafka.bootstrap_servers}: {one_line(exc)}"}
    try:
        existing = set(await consumer.topics())
        counts = await partition_counts(config.kafka, sorted(existing & {config.topic_for(t) for t in config.source.tables}))
        topics: dict[str, Any] = {}
        for table in config.source.tables:
            topic = config.topic_for(table)
            if topic not in existing:
                topics[topic] = {"table": str(table), "exists": False, "partitions": {}}
                continue
            parts = [TopicPartition(topic, p) for p in range(counts.get(topic, 0))]
            ends = await consumer.end_offsets(parts)
            partitions = {}
            for tp in parts:
                end, last = await _tail(consumer, tp, ends[tp])
                partitions[tp.partition] = {"end_offset": end, "last_position": last}
            topics[topic] = {"table": str(table), "exists": True, "partitions": partitions}
    finally:
        await consumer.stop()
    try:
        progress = await load_progress(config)
    except Exception as exc:  # the topics above were read: the broker is there
        progress, error = {}, one_line(exc)
    else:
        error = None
    snapshots = {}
    for table in config.source.tables:
        record = progress.get((INITIAL, str(table)))
        state = "never" if config.source.snapshot == "never" and record is None else (
            "done" if record and record["done"] else ("running" if record else "pending"))
        snapshots[str(table)] = {"state": state, "rows": record["rows"] if record else 0}
    others = sorted({r for r, _ in progress if r != INITIAL})
    result = {"reachable": True, "topics": topics, "snapshots": snapshots, "on_demand_requests": others}
    if error:
        result["snapshot_progress_error"] = error
    return result


async def _tail(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> tuple[int, dict | None]:
    """(end offset, position of the last event) of a partition, read from its last records: some
    brokers report end offsets below the records they hold, so the records have the last word."""
    consumer.assign([tp])
    consumer.seek(tp, max(end - 1, 0))
    last = None
    while True:
        fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=500)
        messages = fetched.get(tp, [])
        if not messages:
            break
        last = messages[-1]
    if last is None:
        return end, None
    try:
        source = decode_source(last.value)
        position = {"commit_lsn": source["commit_lsn"], "lsn": source["lsn"], "seq": source["seq"]}
    except NotAnEvent:
        position = None
    return max(end, last.offset + 1), position


def sink_status(config: PipelineConfig, name: str, kafka: dict[str, Any], current_wal: str | None) -> dict[str, Any]:
    from cdc.sink.target import open_target

    sink = config.sinks[name]
    consumer = f"{config.pipeline}.{name}"
    try:
        target = open_target(sink.connect_url, sqlite_path=sink.sqlite_path)
    except Exception as exc:
        return {"reachable": False, "error": str(exc)}
    try:
        stored = target.load_positions(consumer)
    finally:
        target.close()
    partitions = []
    for table in config.source.tables:
        if not sink.subscribes(table):
            continue
        topic = config.topic_for(table)
        info = (kafka.get("topics") or {}).get(topic, {})
        for partition, part in (info.get("partitions") or {0: {}}).items():
            p = stored.get((topic, int(partition)))
            end = part.get("end_offset")
            applied = format_lsn(p.position.commit_lsn) if p else None
            lag_events = None if end is None else end - (p.offset + 1 if p else 0)
            lag_bytes = None
            if current_wal is not None:
                lag_bytes = max(parse_lsn(current_wal) - (p.position.commit_lsn if p else 0), 0) if p else None
            partitions.append({"topic": topic, "partition": int(partition), "target_table": sink.target_table(table),
                               "applied_commit_lsn": applied, "applied_offset": p.offset if p else None,
                               "lag_events": lag_events, "lag_wal_bytes": lag_bytes})
    return {"reachable": True, "target": redact(sink.url), "partitions": partitions}


def pipeline_status(config: PipelineConfig) -> dict[str, Any]:
    source = source_status(config)
    kafka = asyncio.run(kafka_status(config))
    current = source.get("current_wal_lsn")
    sinks = {name: sink_status(config, name, kafka, current) for name in config.sinks}
    return {"pipeline": config.pipeline, "source": source, "kafka": kafka, "sinks": sinks}


def unreachable(status: dict[str, Any]) -> list[str]:
    parts = [status["source"], status["kafka"], *status["sinks"].values()]
    return [p["error"] for p in parts if not p.get("reachable")]


def render(status: dict[str, Any]) -> str:
    """The status for a person: one line per fact."""
    lines = [f"pipeline {status['pipeline']}"]
    source = status["source"]
    if not source["reachable"]:
        lines.append(f"  source: UNREACHABLE: {source['error']}")
    elif source["slot"] is None:
        lines.append("  slot: does not exist")
    else:
        slot = source["slot"]
        lines.append(f"  slot {slot['name']}: {'active (PID ' + str(slot['pid']) + ')' if slot['active'] else 'inactive'}, "
                     f"confirmed {slot['confirmed_flush_lsn']}, restart {slot['restart_lsn']}, "
                     f"retains {slot['retained_wal_bytes']} WAL bytes, wal_status {slot['wal_status']} "
                     f"(server at {source['current_wal_lsn']})")
    kafka = status["kafka"]
    if not kafka["reachable"]:
        lines.append(f"  kafka: UNREACHABLE: {kafka['error']}")
    else:
        for topic, info in kafka["topics"].items():
            snap = kafka["snapshots"].get(info["table"], {})
            if not info["exists"]:
                lines.append(f"  topic {topic}: does not exist yet; snapshot {snap.get('state')}")
                continue
            for partition, part in info["partitions"].items():
                last = part["last_position"]
                where = f"last event at {last['commit_lsn']}:{last['lsn']}#{last['seq']}" if last else "no events"
                lines.append(f"  topic {topic}[{partition}]: {part['end_offset']} records, {where}; "
                             f"snapshot {snap.get('state')} ({snap.get('rows', 0)} rows)")
    for name, sink in status["sinks"].items():
        if not sink["reachable"]:
            lines.append(f"  sink {name}: UNREACHABLE: {sink['error']}")
            continue
        for p in sink["partitions"]:
            lines.append(f"  sink {name} {p['topic']}[{p['partition']}] -> {p['target_table']}: applied up to "
                         f"{p['applied_commit_lsn'] or 'nothing'}, lag {p['lag_events']} events, "
                         f"{p['lag_wal_bytes'] if p['lag_wal_bytes'] is not None else '?'} WAL bytes")
    return "\n".join(lines)
