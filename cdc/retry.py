"""Transient faults: how long to wait them out.

Which errors are worth waiting out is decided in one place, :func:`cdc.errors.is_transient`. A
component (the connector's source, its Kafka producer, a sink's target) keeps an `Outage`: it logs once when an outage starts and once when it ends, with its duration, waits with exponential
backoff and full jitter between attempts, and gives up (re-raising the last error, whose exit code
then stands) once the outage lasted longer than the configured ceiling.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cdc import metrics
from cdc.config.common import RetryConfig
from cdc.errors import is_transient
from cdc.redact import one_line

log = logging.getLogger(__name__)
T = TypeVar("T")


class Outage:
    """The state of one component's connection: up, or down since when. Read `down`, `since` and
    `last_error` for status; `wait(exc)` waits before the next attempt or re-raises past the ceiling."""

    def __init__(self, what: str, policy: RetryConfig, stop: asyncio.Event, *, component: str = "connector",
                 sink: str = ""):
        self.what = what
        self._labels = {"component": component, "sink": sink}  # of the outage metrics
        self.policy = policy
        self.stop = stop
        self.since: float | None = None  # time.monotonic() when the outage started
        self.attempts = 0
        self.last_error = ""

    @property
    def down(self) -> bool:
        return self.since is not None

    @property
    def state(self) -> str:
        return "retrying" if self.down else "ok"

    async def wait(self, exc: BaseException) -> None:
        """Wait before the next attempt after `exc`; raises `exc` when it is fatal or when the outage
        has lasted past `give_up_after_s`. Returns early when a stop is asked for."""
        if not is_transient(exc) or self.policy.give_up_after_s == 0:  # 0: retries off
            raise exc
        now = time.monotonic()
        self.last_error = one_line(exc)
        if self.since is None:
            self.since = now
            metrics.OUTAGES.labels(**self._labels).inc()
            metrics.OUTAGE_ACTIVE.labels(**self._labels).set(1)
            log.warning("%s unavailable: %s; retrying (giving up after %.0f s)", self.what, self.last_error,
                        self.policy.give_up_after_s)
        elapsed = now - self.since
        if elapsed >= self.policy.give_up_after_s:
            log.error("%s still unavailable after %.0f s (%d attempts): giving up", self.what, elapsed, self.attempts)
            raise exc
        delay = backoff_delay(self.policy, self.attempts)
        delay = min(delay, self.policy.give_up_after_s - elapsed + 0.05)  # the last attempt lands at the ceiling
        self.attempts += 1
        metrics.RETRIES.labels(**self._labels).inc()
        try:
            await asyncio.wait_for(self.stop.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def recovered(self) -> None:
        """The component works again: log the end of the outage, once."""
        if self.since is not None:
            log.warning("%s available again after %.1f s (%d retries)", self.what, time.monotonic() - self.since,
                        self.attempts)
        self.since, self.attempts, self.last_error = None, 0, ""
        metrics.OUTAGE_ACTIVE.labels(**self._labels).set(0)


async def run_healing(attempt: Callable[[], Awaitable[None]], outage_of: Callable[[BaseException], Outage], *,
                      started: Callable[[], bool], stop: asyncio.Event, start_over: Callable[[], None]) -> None:
    """Run `attempt` until it returns. Once `started()` (a fault before is a start-up error, reported at
    once), a transient fault is waited out on its component's outage, `start_over()` resets what
    the failed attempt held, and the next attempt begins."""
    while True:
        try:
            await attempt()
            return
        except Exception as exc:
            if not started() or stop.is_set():
                raise
            await outage_of(exc).wait(exc)
        if stop.is_set():
            return  # a signal during an outage is a clean stop: the next start re-reads what was not confirmed
        start_over()


async def wait_out_start(attempt: Callable[[], Awaitable[T]], outage_of: Callable[[BaseException], Outage], *,
                         stop: asyncio.Event) -> T:
    """Run a start-up check until it passes. A transient fault (the source still starting up or
    refusing connections, a broker or target not up yet) is waited out on its component's outage,
    under the same ceiling as a fault while running; bad input (a refused login, a missing table, a
    failed up-front check) is raised at once. The outage's end is logged when the component runs."""
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if stop.is_set():
                raise
            await outage_of(exc).wait(exc)


def backoff_delay(policy: RetryConfig, attempt: int) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2^attempt)], never
    below a tenth of the initial delay (so a busy loop cannot hammer a server that is coming back)."""
    ceiling = min(policy.max_delay_s, policy.initial_delay_s * (2 ** min(attempt, 30)))
    return max(policy.initial_delay_s / 10, random.uniform(0, ceiling))
