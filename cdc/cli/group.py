"""The `cdc` command group and what every verb shares: loading the pipeline file, logging, the
metrics endpoints, running workers until a signal, and the one mapping from an error to an exit code
(README: exit codes). The verbs live beside it: pipeline_commands (run, connector, snapshot, skip),
sink_commands (sink, replay, dlq), inspect_commands (validate, setup, schema, explain, status)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import psycopg
from aiokafka.errors import KafkaError

from cdc.config import PipelineConfig, load_pipeline
from cdc.errors import CdcError, ConfigError, exit_code
from cdc.logs import LogFormat, setup_logging
from cdc.redact import one_line, redact, scrub

log = logging.getLogger("cdc")


def load_file(path: str) -> PipelineConfig:
    try:
        return load_pipeline(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(exit_code(exc))


def setup_logs(verbose: bool, log_format: LogFormat, config: PipelineConfig) -> None:
    for handler in setup_logging(verbose, log_format, pipeline=config.pipeline):
        handler.addFilter(_RateLimitedKafkaLog())  # logger filters do not apply to child loggers
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


metrics_port_option = click.option(
    "--metrics-port", type=click.IntRange(0, 65535), metavar="PORT", envvar="CDC_METRICS_PORT",
    help="Serve Prometheus metrics on /metrics, and /health and /ready, on this port (all interfaces).")


def observe(port: int | None, config: PipelineConfig, *, connector: Any = None, sinks: Iterable[Any] = ()) -> None:
    """With --metrics-port: serve the endpoints, watch the components for /ready, poll the slot."""
    if port is None:
        return
    from cdc import metrics

    metrics.serve(port)
    if connector is not None:
        from cdc.source.postgres.slot_monitor import SlotMonitor

        metrics.watch_connector(connector)
        SlotMonitor(config.source.conninfo, config.source.slot).start()
    for sink in sinks:
        metrics.watch_sink(sink)


log_format_option = click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", envvar="CDC_LOG_FORMAT", show_default=True,
    help="text: readable lines; json: one JSON object per line (pipeline, component, slot, lsn, table... as fields).")


# After a stop is asked for, workers get this long to finish in-flight work (the connector waits up
# to 15 s for Kafka's acknowledgements); then they are cancelled. README: Stopping.
STOP_GRACE_S = 25.0


class _RateLimitedKafkaLog(logging.Filter):
    """aiokafka logs every failed connection attempt (about 120 lines a second while a broker is
    down): let one line through per interval, with the count of those held back."""

    def __init__(self, interval_s: float = 10.0):
        super().__init__()
        self.interval_s = interval_s
        self._next = 0.0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return False
        if self._held:
            record.msg = f"{record.getMessage()} (and {self._held} more Kafka client messages in the last {self.interval_s:.0f} s)"
            record.args = ()
        self._next, self._held = now + self.interval_s, 0
        return True


Workers = list[Awaitable[None]]


async def run_until_stopped(make_tasks: Callable[[asyncio.Event], Workers | Awaitable[Workers]]) -> None:
    """Run the given workers until SIGINT/SIGTERM, or until one of them fails (then stop the rest).

    `make_tasks` may be a coroutine function: it checks everything first and returns the workers,
    which are started only when every check passed (a signal during the checks stops at once)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: the user does not want to wait for a clean stop
            os._exit(130)
        log.info("stopping: finishing in-flight work (signal again to exit at once)")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    stopper = asyncio.ensure_future(stop.wait())
    tasks: list[asyncio.Future] = []
    try:
        made = make_tasks(stop)
        if inspect.isawaitable(made):
            checking = asyncio.ensure_future(made)
            await asyncio.wait([checking, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not checking.done():  # stopped while checking: nothing was created yet, nothing to finish
                checking.cancel()
                return
            made = checking.result()  # a failed check raises here, before any worker started
            if stop.is_set():
                return
        tasks = [asyncio.ensure_future(t) for t in made]
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stop.set()  # a worker that returned or failed stops the others
        _, late = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        if late:
            log.warning("stopping: %d worker(s) did not finish within %.0f s; cancelling them", len(late), STOP_GRACE_S)
            for task in late:
                task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]
    finally:
        stopper.cancel()
        for task in tasks:
            task.cancel()


def execute(make_tasks: Callable[[asyncio.Event], list[Awaitable[None]]]) -> None:
    code = 0
    try:
        asyncio.run(run_until_stopped(make_tasks))
    except CdcError as exc:
        click.echo(f"error: {exc}", err=True)
        code = exit_code(exc)
    except (psycopg.OperationalError, KafkaError, OSError) as exc:
        # An unreachable or failing service: the message is the useful part, not our traceback.
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        code = exit_code(exc)
    if threading.active_count() > 1:
        # A worker thread still blocked in a driver call (a connect that has not timed out yet)
        # would keep the interpreter alive: the work is stopped, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cdc")
def main() -> None:
    """Change data capture from PostgreSQL to Kafka and downstream databases.

    A pipeline YAML names the source tables, the Kafka cluster and the sinks; see the README.
    """


@contextmanager
def source_errors(config: PipelineConfig) -> Iterator[None]:
    """A one-shot command against the source: its error on one line with its exit code, no password."""
    try:
        yield
    except CdcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exit_code(exc))
    except psycopg.Error as exc:
        dsn = config.source.postgres
        click.echo(f"error: {config.where('source', 'postgres')}: source {redact(dsn)}: {scrub(one_line(exc), dsn)}", err=True)
        sys.exit(exit_code(exc))
