"""The fault suite's figures: each scenario records what it did; with CDC_FAULT_RESULTS set (a
directory, as `make test-faults` sets it) the session writes them as results.json and results.md,
the figures docs/reliability.md publishes.

Scenarios marked `faults_full` (long outages, every crash point, the large transaction) run only
with CDC_FAULTS_FULL=1 (`make test-faults`); `make test` runs the fast part."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from tests.faults.checker import Report

FULL = os.environ.get("CDC_FAULTS_FULL") == "1"


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    fast, full = [], []
    for item in items:
        (full if item.get_closest_marker("faults_full") else fast).append(item)
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = fast


@dataclass
class Outcome:
    scenario: str
    iterations: int = 0
    faults_injected: int = 0
    violations: list[str] = field(default_factory=list)
    duplicates_absorbed: int = 0
    events_checked: int = 0
    recoveries_without_restart: int = 0
    process_restarts: int = 0  # deliberate: after a crash point killed the process
    seconds: float = 0.0


class Results:
    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}

    def record(self, scenario: str, report: Report, *, faults: int, recoveries: int, restarts: int = 0,
               seconds: float = 0.0) -> None:
        outcome = self.outcomes.setdefault(scenario, Outcome(scenario))
        outcome.iterations += 1
        outcome.faults_injected += faults
        outcome.violations += report.violations
        outcome.duplicates_absorbed += report.duplicates
        outcome.events_checked += report.events
        outcome.recoveries_without_restart += recoveries
        outcome.process_restarts += restarts
        outcome.seconds += seconds

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.outcomes.values(), key=lambda o: o.scenario)
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
        except OSError:
            commit = ""
        meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                "part": "full" if FULL else "fast", "machine": f"{platform.system()} {platform.machine()}, "
                f"{os.cpu_count()} cores", "python": platform.python_version()}
        (directory / "results.json").write_text(json.dumps(
            {**meta, "scenarios": [asdict(o) for o in rows]}, indent=2) + "\n")
        totals = Outcome("total")
        for o in rows:
            for name in ("iterations", "faults_injected", "duplicates_absorbed", "events_checked",
                         "recoveries_without_restart", "process_restarts"):
                setattr(totals, name, getattr(totals, name) + getattr(o, name))
            totals.violations += o.violations
        lines = [f"Run {meta['when']} at commit {meta['commit']} ({meta['part']} part; {meta['machine']}).", "",
                 "| Scenario | Iterations | Faults injected | Violations | Duplicates absorbed | Events checked | "
                 "Recoveries without restart | Restarts after a crash point |",
                 "|---|---|---|---|---|---|---|---|"]
        for o in [*rows, totals]:
            name = f"**{o.scenario}**" if o is totals else f"`{o.scenario}`"
            lines.append(f"| {name} | {o.iterations} | {o.faults_injected} | {len(o.violations)} | "
                         f"{o.duplicates_absorbed} | {o.events_checked} | {o.recoveries_without_restart} | "
                         f"{o.process_restarts} |")
        (directory / "results.md").write_text("\n".join(lines) + "\n")


_results = Results()


@pytest.fixture(scope="session")
def fault_results():
    yield _results
    where = os.environ.get("CDC_FAULT_RESULTS")
    if where and _results.outcomes:
        _results.write(Path(where))
