"""`cdc status`: where a pipeline stands, from the source, Kafka and each sink's target.

Every part is asked on its own, so one that cannot be reached is reported (with what failed) while
the others are still shown.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from cdc.config import PipelineConfig
from cdc.events.codec import NotAnEvent, decode_position
from cdc.lsn import format_lsn, parse_lsn, parse_position
from cdc.publish.admin import partition_counts
from cdc.sink.backends.base import PartitionProgress
from cdc.sink.backends.sql import POSITIONS_TABLE
from cdc.redact import one_line, redact, scrub
from cdc.snapshots.jobs import INITIAL
from cdc.snapshots.progress import load_progress


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
    consumer = AIOKafkaConsumer(**config.kafka.client_options(), enable_auto_commit=False)
    try:
        await consumer.start()
    except Exception as exc:
        await consumer.stop()
        return {"reachable": False, "error": f"Kafka at {config.kafka.bootstrap_servers}: {one_line(exc)}"}
    try:
        existing = set(await consumer.topics())
        wanted = [config.topic_for(t) for t in config.source.tables]
        # The snapshot progress is read by its own consumer meanwhile.
        progress_task = asyncio.ensure_future(load_progress(config))
        counts = await partition_counts(config.kafka, sorted(existing & set(wanted)))
        parts = [TopicPartition(topic, p) for topic in wanted if topic in existing for p in range(counts.get(topic, 0))]
        ends = await consumer.end_offsets(parts) if parts else {}
        tails = await _tails(consumer, ends)
        topics: dict[str, Any] = {}
        for table, topic in zip(config.source.tables, wanted):
            if topic not in existing:
                topics[topic] = {"table": str(table), "exists": False, "partitions": {}}
                continue
            partitions = {tp.partition: {"end_offset": tails[tp][0], "last_position": tails[tp][1]}
                          for tp in parts if tp.topic == topic}
            topics[topic] = {"table": str(table), "exists": True, "partitions": partitions}
    finally:
        await consumer.stop()
    try:
        progress = await progress_task
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


# How long the tails of all partitions may take together. Fetches return as soon as records are
# there, so this bounds only a broker that reports an end offset it then does not serve.
_TAIL_TIMEOUT_S = 2.0


async def _tails(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> dict[TopicPartition, tuple[int, dict | None]]:
    """(end offset, position of the last event) per partition, read from its last record, every
    partition at once. Some brokers report end offsets below the records they hold, so what the
    fetch returns has the last word; reading stops once every partition reached its end offset."""
    last: dict[TopicPartition, Any] = {}
    waiting = {tp for tp, end in ends.items() if end > 0}
    if waiting:
        consumer.assign(sorted(waiting, key=lambda tp: (tp.topic, tp.partition)))
        for tp in waiting:
            consumer.seek(tp, ends[tp] - 1)
        deadline = asyncio.get_running_loop().time() + _TAIL_TIMEOUT_S
        while waiting and asyncio.get_running_loop().time() < deadline:
            fetched = await consumer.getmany(*waiting, timeout_ms=200, max_records=500)
            for tp, messages in fetched.items():
                if messages:
                    last[tp] = messages[-1]
                    if messages[-1].offset + 1 >= ends[tp]:
                        waiting.discard(tp)
    out = {}
    for tp, end in ends.items():
        message = last.get(tp)
        if message is None:
            out[tp] = (end, None)
            continue
        try:
            last_position = decode_position(message.value)
            position = {"commit_lsn": format_lsn(last_position.commit_lsn), "lsn": format_lsn(last_position.lsn),
                        "seq": last_position.seq}
        except NotAnEvent:
            position = None
        out[tp] = (max(end, message.offset + 1), position)
    return out


def _stored_positions(config: PipelineConfig, name: str) -> tuple[dict[tuple[str, int], PartitionProgress], bool | None]:
    """What the sink applied, per topic partition, and whether a process runs it now (None: cannot
    tell). Reads only: no SQLite file, positions table or lock file is created."""
    from cdc.sink.backends.postgres import PostgresDialect
    from cdc.sink.backends.sqlite import SqliteDialect
    from cdc.sink.backends.postgres import _lock_key

    sink = config.sinks[name]
    consumer = f"{config.pipeline}.{name}"
    if sink.dialect == "sqlite":
        path = sink.sqlite_path
        assert path is not None
        if not path.exists():
            return {}, False
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (POSITIONS_TABLE,)).fetchone()
            rows = conn.execute(SqliteDialect().select_positions(), (consumer,)).fetchall() if has_table else []
        finally:
            conn.close()
        return _progress(rows), _sqlite_sink_running(path.with_name(f"{path.name}.{consumer}.lock"))
    with psycopg.connect(sink.connect_url, autocommit=True) as conn:
        (has_table,) = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (POSITIONS_TABLE,)).fetchone()
        rows = conn.execute(PostgresDialect().select_positions(), (consumer,)).fetchall() if has_table else []
        key = _lock_key(consumer)  # the sink's session advisory lock (cdc.sink.backends)
        (running,) = conn.execute(
            "SELECT count(*) > 0 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())"
            " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        ).fetchone()
    return _progress(rows), bool(running)


def _progress(rows: list[tuple]) -> dict[tuple[str, int], PartitionProgress]:
    out = {}
    for topic, partition, offset, commit_lsn, lsn, seq, *_ in rows:
        out[(topic, int(partition))] = PartitionProgress(topic, int(partition), int(offset),
                                                         parse_position(commit_lsn, lsn, seq))
    return out


def _sqlite_sink_running(lock_path: Path) -> bool | None:
    """Whether the process named in the sink's lock file is alive. Taking the lock to find out would
    make a sink starting at that moment stop as 'already running', so the holder is looked up."""
    try:
        holder = lock_path.read_text().split()
    except FileNotFoundError:
        return False
    # "process PID on HOST", written by the sink that holds the lock
    if len(holder) != 4 or holder[0] != "process" or not holder[1].isdigit():
        return None
    if holder[3] != socket.gethostname():
        return None  # another machine: cannot tell from here
    try:
        os.kill(int(holder[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def sink_status(config: PipelineConfig, name: str) -> dict[str, Any]:
    sink = config.sinks[name]
    try:
        stored, running = _stored_positions(config, name)
    except (psycopg.Error, sqlite3.Error, OSError) as exc:
        where = redact(sink.url) if sink.dialect != "sqlite" else str(sink.sqlite_path)
        return {"reachable": False, "error": f"sink {config.pipeline}.{name}: target {where}: "
                                             f"{scrub(one_line(exc), sink.url)}"}
    return {"reachable": True, "target": redact(sink.url), "running": running, "stored": stored}


def _sink_lags(config: PipelineConfig, name: str, sink_result: dict[str, Any], kafka: dict[str, Any],
               source: dict[str, Any]) -> list[dict[str, Any]]:
    """Per partition: what the sink applied and how far behind it is, in events and in WAL bytes.

    A sink that applied every event of its topics is behind the source only by what the connector
    has not published yet: the slot's confirmed position, not its own last commit (which stays put
    while the source writes other tables)."""
    sink = config.sinks[name]
    stored = sink_result.pop("stored")
    current = parse_lsn(source["current_wal_lsn"]) if source.get("reachable") else None
    slot = source.get("slot")
    published_up_to = parse_lsn(slot["confirmed_flush_lsn"]) if slot and slot.get("confirmed_flush_lsn") else None
    partitions = []
    for table in config.source.tables:
        if not sink.subscribes(table):
            continue
        topic = config.topic_for(table)
        info = (kafka.get("topics") or {}).get(topic, {})
        for partition, part in (info.get("partitions") or {0: {}}).items():
            p = stored.get((topic, int(partition)))
            end = part.get("end_offset")
            lag_events = None if end is None else max(end - (p.offset + 1 if p else 0), 0)
            lag_bytes = None
            if current is not None and p is not None:
                applied = p.position.commit_lsn
                if lag_events == 0 and published_up_to is not None:
                    applied = max(applied, published_up_to)
                lag_bytes = max(current - applied, 0)
            partitions.append({"topic": topic, "partition": int(partition), "target_table": sink.target_table(table),
                               "applied_commit_lsn": format_lsn(p.position.commit_lsn) if p else None,
                               "applied_offset": p.offset if p else None,
                               "lag_events": lag_events, "lag_wal_bytes": lag_bytes})
    return partitions


async def _gather(config: PipelineConfig) -> tuple[dict, dict, dict]:
    # The source, Kafka and every target are asked at the same time: the answer takes as long as
    # the slowest of them, not their sum.
    source, kafka, *sinks = await asyncio.gather(
        asyncio.to_thread(source_status, config),
        kafka_status(config),
        *(asyncio.to_thread(sink_status, config, name) for name in config.sinks),
    )
    return source, kafka, dict(zip(config.sinks, sinks))


def pipeline_status(config: PipelineConfig, *, max_lag_events: int | None = None) -> dict[str, Any]:
    source, kafka, sinks = asyncio.run(_gather(config))
    for name, result in sinks.items():
        if result["reachable"]:
            result["partitions"] = _sink_lags(config, name, result, kafka, source)
    status = {"pipeline": config.pipeline, "source": source, "kafka": kafka, "sinks": sinks}
    status["problems"] = problems(status, max_lag_events)
    return status


def problems(status: dict[str, Any], max_lag_events: int | None = None) -> list[str]:
    """Why the pipeline is not healthy although everything answered (README: Status): no connector
    holds the slot, a sink with events to apply is not running, or a sink is too far behind."""
    out = []
    source = status["source"]
    if source["reachable"]:
        slot = source["slot"]
        if slot is None:
            out.append("the replication slot does not exist: the connector has never run (or the slot was dropped)")
        elif not slot["active"]:
            out.append(f"no connector is running: slot {slot['name']} is not held by any process")
    for name, sink in status["sinks"].items():
        if not sink["reachable"]:
            continue
        behind = sum(p["lag_events"] or 0 for p in sink["partitions"])
        if behind and sink["running"] is False:
            out.append(f"sink {name} is not running and has {behind} events to apply")
        if max_lag_events is not None and behind > max_lag_events:
            out.append(f"sink {name} is {behind} events behind (more than --max-lag-events {max_lag_events})")
    return out


def unreachable(status: dict[str, Any]) -> list[str]:
    parts = [status["source"], status["kafka"], *status["sinks"].values()]
    return [p["error"] for p in parts if not p.get("reachable")]


def _lag(p: dict[str, Any]) -> str:
    if p["lag_events"] is None:
        return "lag unknown (Kafka did not answer)"
    if p["lag_events"] == 0 and not p["lag_wal_bytes"]:
        return "caught up"
    wal = f", {_size(p['lag_wal_bytes'])} of WAL" if p["lag_wal_bytes"] is not None else ""
    return f"lag {p['lag_events']} events{wal}"


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


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
        running = {True: "running", False: "not running", None: "running: cannot tell from here"}[sink["running"]]
        lines.append(f"  sink {name} ({running}):")
        for p in sink["partitions"]:
            lines.append(f"    {p['topic']}[{p['partition']}] -> {p['target_table']}: applied up to "
                         f"{p['applied_commit_lsn'] or 'nothing'}, {_lag(p)}")
    for problem in status.get("problems", []):
        lines.append(f"  NOT HEALTHY: {problem}")
    return "\n".join(lines)
