"""Snapshot progress shown to a person: a rich progress bar per table on a terminal, a log line every
few seconds otherwise, and the snapshot row metrics. Fed by :class:`cdc.snapshots.jobs.Snapshots`."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from cdc import metrics

if TYPE_CHECKING:
    from cdc.snapshots.jobs import Job

# The name snapshot log lines have always had (the `component` of a JSON line comes from it).
log = logging.getLogger("cdc.snapshot")

PROGRESS_EVERY_S = 5.0  # a log line per table this often when stderr is not a terminal


class ProgressDisplay:
    """A progress bar per table on a terminal (rich); a log line every few seconds otherwise."""

    def __init__(self) -> None:
        self._progress = None
        self._tasks: dict[tuple[str, str], Any] = {}
        self._logged: dict[tuple[str, str], float] = {}
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from cdc.logs import console  # the log lines' console: they print above the bars

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self._progress.start()

    def start(self, job: Job) -> None:
        if self._progress is not None:
            self._tasks[job.id] = self._progress.add_task(
                f"snapshot {job.table}", total=max(job.estimate, job.rows) or None, completed=job.rows, rate="-")
        else:
            log.info("snapshot of %s (%s): starting, about %d rows", job.table, job.request, job.estimate)

    def update(self, job: Job) -> None:
        metrics.SNAPSHOT_ROWS.labels(table=str(job.table)).set(job.rows)
        metrics.SNAPSHOT_ESTIMATE.labels(table=str(job.table)).set(max(job.estimate, job.rows))
        elapsed = max(time.monotonic() - job.started, 1e-6)
        rate = job.rows / elapsed
        if self._progress is not None:
            task = self._tasks[job.id]
            self._progress.update(task, completed=job.rows, total=max(job.estimate, job.rows) or None,
                                  rate=f"{rate:,.0f}")
            return
        now = time.monotonic()
        if job.done or now - self._logged.get(job.id, 0.0) >= PROGRESS_EVERY_S:
            self._logged[job.id] = now
            # The estimate is the planner's (pg_class.reltuples): it can be short, or 0 before ANALYZE.
            left = job.estimate - job.rows
            eta = f", about {left / rate:.0f} s left" if rate and left > 0 and not job.done else ""
            if job.done:
                log.info("snapshot of %s: done, %d rows, %.0f rows/s", job.table, job.rows, rate)
            elif left > 0:
                log.info("snapshot of %s: %d of about %d rows, %.0f rows/s%s", job.table, job.rows, job.estimate, rate, eta)
            else:
                log.info("snapshot of %s: %d rows so far, %.0f rows/s", job.table, job.rows, rate)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
