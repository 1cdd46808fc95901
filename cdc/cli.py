"""The `cdc` command: validate a pipeline, run its connector and sinks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import click
import psycopg
from aiokafka.errors import KafkaError

from cdc.config import PipelineConfig, load_pipeline
from cdc.errors import CdcError, ConfigError

log = logging.getLogger("cdc")


def _load(path: str) -> PipelineConfig:
    try:
        return load_pipeline(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(exc.exit_code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


async def _run_until_stopped(make_tasks: Callable[[asyncio.Event], list[Awaitable[None]]]) -> None:
    """Run the given workers until SIGINT/SIGTERM, or until one of them fails (then stop the rest)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: the user does not want to wait for a clean stop
            os._exit(130)
        log.info("stopping: finishing in-flight work (signal again to exit at once)")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    tasks = [asyncio.ensure_future(t) for t in make_tasks(stop)]
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stop.set()  # a worker that returned or failed stops the others
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if errors:
            raise errors[0]
    finally:
        stopper.cancel()
        for task in tasks:
            task.cancel()


def _execute(make_tasks: Callable[[asyncio.Event], list[Awaitable[None]]]) -> None:
    try:
        asyncio.run(_run_until_stopped(make_tasks))
    except CdcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (psycopg.OperationalError, KafkaError, OSError) as exc:
        # An unreachable or failing service: the message is the useful part, not our traceback.
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cdc")
def main() -> None:
    """Change data capture from PostgreSQL to Kafka and downstream databases.

    A pipeline YAML names the source tables, the Kafka cluster and the sinks; see the README.
    """


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check a pipeline YAML. Prints every problem as FILE:LINE: message and exits 2, or exits 0."""
    config = _load(file)
    click.echo(f"{file}: pipeline {config.pipeline} is valid: {len(config.source.tables)} tables, {len(config.sinks)} sinks")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(file: str, verbose: bool) -> None:
    """Run the connector and every sink of the pipeline in one process, until SIGINT/SIGTERM."""
    from cdc.connector import Connector
    from cdc.sink.runner import Sink

    config = _load(file)
    _setup_logging(verbose)
    _execute(lambda stop: [Connector(config, stop).run(),
                           *(Sink(config, name, stop, config_file=file).run() for name in config.sinks)])


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def connector(file: str, verbose: bool) -> None:
    """Run only the connector: PostgreSQL -> Kafka."""
    from cdc.connector import Connector

    config = _load(file)
    _setup_logging(verbose)
    _execute(lambda stop: [Connector(config, stop).run()])


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", "names", multiple=True, help="Sink to run (repeatable); default: every sink of the pipeline.")
@click.option("--accept-source-history", is_flag=True,
              help="Continue with events of another source history (a failover that forked before what the "
                   "sink applied, another cluster); changes of the old history stay in the target. Needs --name.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def sink(file: str, names: tuple[str, ...], accept_source_history: bool, verbose: bool) -> None:
    """Run sinks only: Kafka -> target databases."""
    from cdc.sink.runner import Sink

    config = _load(file)
    unknown = [n for n in names if n not in config.sinks]
    if unknown:
        click.echo(f"{file}: no sink named {', '.join(unknown)} (sinks: {', '.join(config.sinks) or 'none'})", err=True)
        sys.exit(2)
    if accept_source_history and not names:
        # A deliberate decision about one target: never for every sink of a file at once by accident.
        click.echo("--accept-source-history needs --name: the sink whose target keeps the old history", err=True)
        sys.exit(2)
    _setup_logging(verbose)
    selected = names or tuple(config.sinks)
    _execute(lambda stop: [
        Sink(config, name, stop, accept_source_history=accept_source_history, config_file=file).run()
        for name in selected
    ])


if __name__ == "__main__":
    main()
