"""Prometheus metrics, and the /health and /ready endpoints, on `--metrics-port PORT`.

Every metric cdc exposes is defined here, with its unit in its name (README: Metrics). Labels name
tables, topics, partitions, sinks and components: never a row value, a key or a secret. Components
record into these objects whether or not a port is served; serving is one HTTP thread.

Readiness: each running component registers a check that returns None when it works (streaming,
consuming) or the reason it does not ("source unreachable for 12 s"); /ready answers 503 with the
reasons while any check has one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# ---- connector -------------------------------------------------------------------------------------
EVENTS_PUBLISHED = Counter("cdc_events_published", "Events handed to Kafka and acknowledged, per table.",
                           ["table"], registry=REGISTRY)
BYTES_PUBLISHED = Counter("cdc_bytes_published", "Bytes of acknowledged events (key, value and headers), per table.",
                          ["table"], registry=REGISTRY)
PRODUCE_LATENCY = Histogram("cdc_produce_latency_seconds", "From handing an event to the producer to Kafka's acknowledgement.",
                            registry=REGISTRY, buckets=_LATENCY_BUCKETS)
COMMIT_TO_PUBLISH = Gauge("cdc_commit_to_publish_lag_seconds",
                          "Age of the last published change: now minus its source commit time.", registry=REGISTRY)
SLOT_LAG = Gauge("cdc_slot_lag_bytes", "WAL written on the source that the slot has not confirmed: "
                 "pg_current_wal_lsn() - confirmed_flush_lsn (polled).", registry=REGISTRY)
SLOT_RETAINED = Gauge("cdc_slot_retained_wal_bytes", "WAL the source keeps for the slot: "
                      "pg_current_wal_lsn() - restart_lsn (polled).", registry=REGISTRY)
SLOT_WAL_STATUS = Gauge("cdc_slot_wal_status", "1 for the slot's wal_status (reserved, extended, unreserved, lost).",
                        ["status"], registry=REGISTRY)
CONFIRMED_LSN = Gauge("cdc_confirmed_lsn", "The LSN the connector last confirmed to the source, as a number.",
                      registry=REGISTRY)
SNAPSHOT_ROWS = Gauge("cdc_snapshot_rows", "Rows a running snapshot has published, per table.", ["table"], registry=REGISTRY)
SNAPSHOT_ESTIMATE = Gauge("cdc_snapshot_rows_estimate", "The planner's row estimate of a table being snapshotted.",
                          ["table"], registry=REGISTRY)

# ---- sinks ---------------------------------------------------------------------------------------
SINK_APPLIED = Counter("cdc_sink_events_applied", "Events applied to the target, per sink and source table.",
                       ["sink", "table"], registry=REGISTRY)
SINK_OFFSET = Gauge("cdc_sink_applied_offset", "The Kafka offset of the last event applied (and stored), per partition.",
                    ["sink", "topic", "partition"], registry=REGISTRY)
SINK_LAG = Gauge("cdc_sink_lag_events", "Events in a partition not applied yet: its end offset minus the next "
                 "offset to apply.", ["sink", "topic", "partition"], registry=REGISTRY)
SINK_APPLY_LATENCY = Histogram("cdc_sink_apply_latency_seconds", "Time to apply and commit one target transaction.",
                               ["sink"], registry=REGISTRY, buckets=_LATENCY_BUCKETS)
SINK_BATCH = Histogram("cdc_sink_batch_events", "Events per target transaction.", ["sink"], registry=REGISTRY,
                       buckets=_BATCH_BUCKETS)
DEAD_LETTERS = Counter("cdc_sink_dead_letters", "Events sent to the sink's dead-letter topic, per table.",
                       ["sink", "table"], registry=REGISTRY)
VERIFY_RANGES = Counter("cdc_sink_verify_ranges", "Key ranges compared by `cdc verify`, per sink, table and result "
                        "(equal, different).", ["sink", "table", "result"], registry=REGISTRY)

# ---- faults --------------------------------------------------------------------------------------
# component: connector or sink (with the sink's name; "" for the connector).
RETRIES = Counter("cdc_retries", "Attempts made again after a transient fault.", ["component", "sink"],
                  registry=REGISTRY)
OUTAGES = Counter("cdc_outages", "Outages (a run of transient faults) that started.", ["component", "sink"],
                  registry=REGISTRY)
OUTAGE_ACTIVE = Gauge("cdc_outage_active", "1 while the component is in an outage (waiting to retry), else 0.",
                      ["component", "sink"], registry=REGISTRY)


# ---- readiness -----------------------------------------------------------------------------------

ReadyCheck = Callable[[], "str | None"]
_checks: dict[str, ReadyCheck] = {}
_lock = threading.Lock()


def register_ready(component: str, check: ReadyCheck) -> None:
    """`check()` returns None when the component works, else why not (read from the HTTP thread)."""
    with _lock:
        _checks[component] = check


def unregister_ready(component: str) -> None:
    with _lock:
        _checks.pop(component, None)


def not_ready() -> list[str]:
    with _lock:
        checks = list(_checks.items())
    if not checks:
        return ["starting"]
    reasons = []
    for name, check in checks:
        try:
            reason = check()
        except Exception as exc:  # a check must never take the endpoint down
            reason = f"cannot tell ({type(exc).__name__})"
        if reason:
            reasons.append(f"{name}: {reason}")
    return reasons


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/health":
            self._reply(200, b"ok\n")
        elif path == "/ready":
            reasons = not_ready()
            self._reply(503 if reasons else 200, ("\n".join(reasons) if reasons else "ready").encode() + b"\n")
        else:
            self._reply(404, b"not found: /metrics, /health and /ready are served\n")

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes are not worth a log line
        pass


def serve(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics, /health and /ready on a daemon thread until the process ends."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="cdc-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /health and /ready", host, server.server_address[1])
    return server


def watch_connector(connector: Any) -> None:
    """/ready follows the connector: streaming, and neither the source nor Kafka in an outage."""

    def check() -> str | None:
        for outage in (connector.source_outage, connector.kafka_outage):
            if outage.down:
                return f"{outage.what} unreachable for {time.monotonic() - outage.since:.0f} s ({outage.last_error})"
        return None if connector.repl.streaming else "not streaming yet"

    register_ready("connector", check)


def watch_sink(sink: Any) -> None:
    """/ready follows a sink: consuming, and its target and Kafka reachable."""

    def check() -> str | None:
        outage = sink.outage
        if outage.down:
            return f"{outage.what} unreachable for {time.monotonic() - outage.since:.0f} s ({outage.last_error})"
        return None if sink.started else "not consuming yet"

    register_ready(f"sink {sink.name}", check)
