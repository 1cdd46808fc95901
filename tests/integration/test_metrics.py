"""Operations as a monitoring system sees them: `--metrics-port` serves Prometheus metrics with the
contract names and sensible values, /health while the process lives, and /ready that flips to 503
with the reason while the source is away and back to 200 when it returns."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdc.dev.postgres import LocalPostgres, embedded_bindir, free_port
from tests.conftest import SOURCE_BINDIRS
from tests.integration.harness import CdcProcess, sqlite_rows, wait_until, write_pipeline

CANARY = "narwhal-5521"  # a row value: never in a label or anywhere in the metrics


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    _, text = _get(port, "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(params=sorted(SOURCE_BINDIRS))
def own_source(request):
    """A source cluster of this test's own: the test stops and starts it."""
    with LocalPostgres(SOURCE_BINDIRS[request.param] or embedded_bindir()) as cluster:
        yield cluster


def test_metrics_health_and_ready_of_a_running_pipeline(tmp_path, own_source, broker, monkeypatch):
    dsn = own_source.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, note text)")
        conn.execute("ALTER TABLE customers REPLICA IDENTITY FULL")
    name = f"m{uuid.uuid4().hex[:8]}"
    path = write_pipeline(tmp_path / "p.yaml", pipeline=name, source_dsn=dsn, tables=["public.customers"],
                          bootstrap=broker.bootstrap_servers, sinks={"replica": {"url": "sqlite:///replica.db"}})
    port = free_port()
    replica = tmp_path / "replica.db"
    monkeypatch.setenv("CDC_METRICS_PORT", str(port))  # as --metrics-port
    with CdcProcess(path) as proc:
        wait_until(lambda: _get(port, "/health")[0] == 200, process=proc, what="/health")
        wait_until(lambda: _get(port, "/ready")[0] == 200 or _get(port, "/ready")[1], process=proc, what="/ready")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO customers SELECT i, '{CANARY}' FROM generate_series(1, 250) i")
            conn.execute("UPDATE customers SET note = 'x' WHERE id <= 50")
        wait_until(lambda: replica.exists() and len(sqlite_rows(replica, "customers", "id")) == 250,
                   process=proc, what="250 rows in the replica")

        def settled():
            s = _samples(port)
            applied = _value(s, "cdc_sink_events_applied_total", sink="replica", table="public.customers")
            return s if applied == 300 else f"applied {applied}"

        samples = wait_until(settled, process=proc, what="the sink's counter to reach 300")
        assert _value(samples, "cdc_events_published_total", table="public.customers") == 300
        assert _value(samples, "cdc_bytes_published_total", table="public.customers") > 300 * 50
        topic = f"{name}.public.customers"
        assert _value(samples, "cdc_sink_lag_events", sink="replica", topic=topic, partition="0") == 0
        assert _value(samples, "cdc_sink_applied_offset", sink="replica", topic=topic, partition="0") == 299
        assert _value(samples, "cdc_produce_latency_seconds_count") >= 1
        assert _value(samples, "cdc_sink_batch_events_sum", sink="replica") == 300
        wait_until(lambda: _value(_samples(port), "cdc_slot_wal_status", status="reserved") == 1, process=proc,
                   what="the slot to be polled")
        assert 0 <= _value(_samples(port), "cdc_slot_lag_bytes") < 10_000_000
        assert _value(samples, "process_resident_memory_bytes") > 0
        assert CANARY not in _get(port, "/metrics")[1]

        # The source goes away: the process keeps running, /ready says why; back: ready again.
        own_source.stop("fast")
        status, reason = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(_get(port, "/ready")),
                                    process=proc, what="/ready to answer 503")
        assert "connector: the source unreachable for" in reason, reason
        assert _get(port, "/health")[0] == 200
        own_source.start()
        wait_until(lambda: _get(port, "/ready")[0] == 200, process=proc, timeout=120, what="/ready after the source returned")
        assert _value(_samples(port), "cdc_outages_total", component="connector", sink="") >= 1
        assert proc.stop() == 0, proc.log()
