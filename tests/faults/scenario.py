"""What every fault scenario shares: the pipeline (two sinks: a PostgreSQL and a SQLite target), a
steady workload on the source, `cdc` processes that may carry a failpoint, and the final check."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import yaml

from tests.faults import checker
from tests.faults.checker import Report, Target, VersionWatch
from tests.faults.proxy import FaultProxy
from tests.integration.harness import CdcProcess, wait_until

# Short waits between attempts: the scenarios heal many outages each, the defaults are for production.
FAST_RETRY = {"initial_delay_s": 0.2, "max_delay_s": 2.0}


class FaultCdc(CdcProcess):
    """`cdc COMMAND FILE`, optionally with CDC_FAILPOINT armed; each start logs to its own file."""

    def __init__(self, pipeline_file: Path, command: str = "run", *, failpoint: str | None = None, label: str = "",
                 args: tuple[str, ...] = ()):
        super().__init__(pipeline_file, command)
        self.failpoint = failpoint
        self.args = args
        self.log_path = pipeline_file.with_suffix(f".{command}{label}.log")

    def start(self) -> "FaultCdc":
        env = {k: v for k, v in os.environ.items() if k != "CDC_FAILPOINT"}
        if self.failpoint:
            env["CDC_FAILPOINT"] = self.failpoint
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cdc.cli", self.command, str(self.pipeline_file), *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return self

    def __enter__(self) -> "FaultCdc":
        return self if self.proc is not None else self.start()  # started already: only stopped at the end

    def recoveries(self) -> int:
        """Outages this process healed without a restart (each logs 'available again after')."""
        return len(re.findall(r"available again after", self.log()))


class Workload:
    """Transactions on `items` until stopped: inserts, updates (a new version from the source's
    sequence) and deletes, one to five rows each. Rides out a source that is away."""

    def __init__(self, dsn: str, *, first_id: int, seed: int = 17, pause_s: float = 0.01):
        self.dsn = dsn
        self.random = random.Random(seed)
        self.next_id = first_id
        self.ids: list[int] = list(range(1, first_id))
        self.committed = 0
        self.pause_s = pause_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _transaction(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            for _ in range(self.random.choice((1, 1, 1, 2, 5))):
                roll = self.random.random()
                if roll < 0.5 or len(self.ids) < 10:
                    conn.execute("INSERT INTO items (id, pad) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
                                 (self.next_id, "x" * self.random.randrange(200)))
                    self.ids.append(self.next_id)
                    self.next_id += 1
                elif roll < 0.85:
                    conn.execute("UPDATE items SET v = nextval('item_versions'), pad = %s WHERE id = %s",
                                 ("y" * self.random.randrange(200), self.random.choice(self.ids)))
                else:
                    conn.execute("DELETE FROM items WHERE id = %s",
                                 (self.ids.pop(self.random.randrange(len(self.ids))),))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    while not self._stop.is_set():
                        self._transaction(conn)
                        self.committed += 1
                        self._stop.wait(self.pause_s)
            except psycopg.Error:
                self._stop.wait(0.2)  # the source is away: try again

    def __enter__(self) -> "Workload":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def wait_for(self, transactions: int, *processes: CdcProcess, timeout: float = 120) -> None:
        start = self.committed

        def done() -> bool:
            for proc in processes:
                proc.check_alive()
            return self.committed >= start + transactions

        wait_until(done, timeout=timeout, what=f"{transactions} more source transactions")


def via(url: str, proxy: FaultProxy) -> str:
    """The same PostgreSQL URL, through the proxy."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{credentials}@{proxy.address()}" if credentials else proxy.address()).geturl()


def upstream(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


class Scenario:
    """One pipeline over `items`: its file, its targets, and the checks at the end."""

    def __init__(self, tmp_path: Path, source_dsn: str, bootstrap: str, *, postgres_target: str,
                 source_via: str | None = None, target_via: str | None = None, preload: int = 0,
                 snapshot: str = "never",
                 sink_extra: dict[str, Any] | None = None, source_extra: dict[str, Any] | None = None,
                 kafka_extra: dict[str, Any] | None = None):
        self.tmp_path = tmp_path
        # The checks read the source and the targets directly; cdc may reach them through proxies.
        self.source_dsn = source_dsn
        self.bootstrap = bootstrap
        self.name = f"f_{uuid.uuid4().hex[:8]}"
        self.topic = f"{self.name}.public.items"
        self.slot = f"cdc_{self.name}"
        self.sqlite_path = tmp_path / "replica.db"
        self.targets: list[Target] = [("postgres", postgres_target), ("sqlite", str(self.sqlite_path))]
        checker.create_schema(source_dsn)
        if preload:
            with psycopg.connect(source_dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO items (id, pad) SELECT i, repeat('p', i %% 100) FROM generate_series(1, %s) i",
                             (preload,))
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            # The throwaway clusters commit asynchronously: an immediate stop would lose the schema.
            conn.execute("CHECKPOINT")
        self.first_id = preload + 1
        sink = {"retry": FAST_RETRY, "connect_timeout_s": 3, **(sink_extra or {})}
        doc = {
            "pipeline": self.name,
            "source": {"postgres": source_via or source_dsn, "tables": ["public.items"], "status_interval_s": 0.5,
                       "snapshot": snapshot, "connect_timeout_s": 3, "retry": FAST_RETRY, **(source_extra or {})},
            "kafka": {"bootstrap_servers": bootstrap, "request_timeout_ms": 5000, "retry": FAST_RETRY,
                      **(kafka_extra or {})},
            "sinks": {"copy": {"url": target_via or postgres_target, **sink}, "replica": {"url": "sqlite:///replica.db", **sink}},
        }
        self.path = tmp_path / "pipeline.yaml"
        self.path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def cdc(self, command: str = "run", **kwargs: Any) -> FaultCdc:
        return FaultCdc(self.path, command, **kwargs)

    def slot_state(self) -> tuple[bool, bool]:
        """(exists, active); (False, False) while the source cannot be asked."""
        try:
            with psycopg.connect(self.source_dsn, connect_timeout=3) as conn:
                row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)).fetchone()
        except psycopg.Error:
            return False, False
        return (row is not None, bool(row and row[0]))

    def wait_streaming(self, proc: CdcProcess, timeout: float = 120) -> None:
        wait_until(lambda: self.slot_state()[1], process=proc, timeout=timeout, what=f"slot {self.slot} streaming")

    def wait_slot_released(self, timeout: float = 60) -> None:
        """A crashed connector's walsender notices the lost connection: the slot is free to take again."""
        wait_until(lambda: not self.slot_state()[1], timeout=timeout, what=f"slot {self.slot} released")

    def workload(self, **kwargs: Any) -> Workload:
        """The workload, its changes recorded in the history from now on. Start it once the slot
        exists: changes before it are captured by no one (or by the snapshot, when it runs)."""
        checker.record_history(self.source_dsn)
        return Workload(self.source_dsn, first_id=self.first_id, **kwargs)

    def watch(self) -> VersionWatch:
        return VersionWatch(self.targets)

    def conclude(self, proc: FaultCdc, watch: VersionWatch, results: Any, label: str, *, faults: int, began: float,
                 restarts: int = 0, timeout: float = 300) -> Report:
        """finish(), then: the process still runs, no violation, and the scenario's figures recorded."""
        report = self.finish(proc, watch, timeout)
        proc.check_alive()
        assert report.violations == [], report.violations
        results.record(label, report, faults=faults, recoveries=proc.recoveries(), restarts=restarts,
                       seconds=time.monotonic() - began)
        return report

    def finish(self, proc: CdcProcess, watch: VersionWatch, timeout: float = 300) -> Report:
        """The workload has stopped: wait for both targets to equal the source, then check everything."""
        wait_until(lambda: checker.targets_equal_source(self.source_dsn, self.targets), process=proc, timeout=timeout,
                   what="both targets equal to the source")
        watch.sample()
        return checker.check_all(self.source_dsn, self.bootstrap, self.topic, self.targets, watch)
