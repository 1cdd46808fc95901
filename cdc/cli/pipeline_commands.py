"""Verbs that run the connector: `cdc run` (connector and sinks), `cdc connector` (and its
--skip-to-lsn), `cdc snapshot` (a request in the source's WAL, followed or run to its end)."""

from __future__ import annotations

import asyncio
import functools
import sys

import click
import psycopg

from cdc.cli.checks import check_connector, check_targets
from cdc.cli.group import (
    Workers, execute, load_file, log, log_format_option, main, metrics_port_option, observe, setup_logs, source_errors,
)
from cdc.config import PipelineConfig
from cdc.errors import AlreadyRunningError, SourceError
from cdc.logs import LogFormat, log_context
from cdc.lsn import format_lsn, parse_lsn


_CREATE_SLOT_HELP = (
    "Create the replication slot even though the pipeline's topics already hold events (the slot was "
    "dropped: changes made while it was missing are not published)."
)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--create-slot", is_flag=True, help=_CREATE_SLOT_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@log_format_option
@metrics_port_option
def run(file: str, create_slot: bool, verbose: bool, log_format: LogFormat, metrics_port: int | None) -> None:
    """Run the connector and every sink of the pipeline in one process, until SIGINT/SIGTERM."""
    from cdc.connector import Connector
    from cdc.sink.runner import Sink

    config = load_file(file)
    setup_logs(verbose, log_format, config)

    async def start(stop: asyncio.Event) -> Workers:
        # Source, Kafka, then every target; nothing is created (slot, publication, topics, SQLite
        # files, positions tables, locks) until all of them passed.
        connector = Connector(config, stop, create_missing_slot=create_slot)
        sinks = [Sink(config, name, stop, config_file=file) for name in config.sinks]
        observe(metrics_port, config, connector=connector, sinks=sinks)  # /health and /ready during the checks too
        await check_connector(connector, stop)
        await check_targets(config, sinks, stop)
        return [log_context(connector.run(), component="connector", slot=config.source.slot),
                *(log_context(sink.run(), component="sink", sink=sink.name) for sink in sinks)]

    execute(start)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--create-slot", is_flag=True, help=_CREATE_SLOT_HELP)
@click.option("--skip-to-lsn", "skip_to", metavar="LSN",
              help="Do not stream: confirm the slot up to LSN, so that nothing before it is ever published, and exit.")
@click.option("--yes", is_flag=True, help="With --skip-to-lsn: do not ask for confirmation.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@log_format_option
@metrics_port_option
def connector(file: str, create_slot: bool, skip_to: str | None, yes: bool, verbose: bool, log_format: LogFormat,
              metrics_port: int | None) -> None:
    """Run only the connector: PostgreSQL -> Kafka."""
    from cdc.connector import Connector

    config = load_file(file)
    setup_logs(verbose, log_format, config)
    if skip_to is not None:
        _skip_to_lsn(config, skip_to, yes)
        return

    async def start(stop: asyncio.Event) -> Workers:
        connector = Connector(config, stop, create_missing_slot=create_slot)
        observe(metrics_port, config, connector=connector)
        await check_connector(connector, stop)
        return [log_context(connector.run(), component="connector", slot=config.source.slot)]

    execute(start)


def _skip_to_lsn(config: PipelineConfig, text: str, yes: bool) -> None:
    try:
        lsn = parse_lsn(text)
    except ValueError as exc:
        click.echo(f"error: --skip-to-lsn: {exc}", err=True)
        sys.exit(2)
    with source_errors(config):
        confirmed = slot_position(config)
        if not yes:
            question = (f"Confirm slot {config.source.slot} from {format_lsn(confirmed)} to {format_lsn(lsn)}? Changes "
                        "committed in between are never published")
            if not sys.stdin.isatty():
                click.echo(f"error: --skip-to-lsn loses the changes between {format_lsn(confirmed)} and "
                           f"{format_lsn(lsn)}; add --yes to confirm", err=True)
                sys.exit(2)
            if not click.confirm(question):
                sys.exit(1)
        moved = skip_slot_to(config, lsn)
    click.echo(f"slot {config.source.slot} confirmed up to {format_lsn(moved)} (was {format_lsn(confirmed)})")


def slot_position(config: PipelineConfig) -> int:
    """The slot's confirmed LSN; refuses a missing slot or one a running connector holds."""
    with psycopg.connect(config.source.conninfo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (config.source.slot,),
        ).fetchone()
    if row is None:
        raise SourceError(f"{config.where('source', 'slot')}: replication slot {config.source.slot} does not exist")
    if row[1] is not None:
        raise AlreadyRunningError(f"pipeline {config.pipeline} is running: slot {config.source.slot} is held by PID {row[1]}; stop it first")
    return parse_lsn(row[0])


def skip_slot_to(config: PipelineConfig, lsn: int) -> int:
    """Confirm the slot up to `lsn` without publishing what lies before it: the deliberate way past a
    transaction that cannot be published. Refuses to move the slot backwards (PostgreSQL cannot)."""
    confirmed = slot_position(config)
    if lsn < confirmed:
        raise SourceError(
            f"--skip-to-lsn {format_lsn(lsn)} is behind slot {config.source.slot}'s confirmed position "
            f"{format_lsn(confirmed)}: a slot cannot go back"
        )
    with psycopg.connect(config.source.conninfo, autocommit=True) as conn:
        (moved,) = conn.execute(
            "SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)", (config.source.slot, format_lsn(lsn))
        ).fetchone()
    return parse_lsn(moved)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--table", "tables", multiple=True, required=True, metavar="TABLE",
              help="Table to re-read (repeatable), as written in source.tables.")
@click.option("--where", metavar="SQL", help="Only the rows matching this SQL condition.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@log_format_option
def snapshot(file: str, tables: tuple[str, ...], where: str | None, verbose: bool, log_format: LogFormat) -> None:
    """Re-read tables (or the rows matching --where) while streaming goes on.

    The request travels in the source's WAL, so a running connector takes it up in order with the
    stream; with no connector running, this command runs one until the snapshot is done.
    """
    from cdc.config import TableRef
    from cdc.connector import Connector
    from cdc.source.postgres.snapshot import new_request_id, request_snapshot, write_request

    config = load_file(file)
    refs = []
    for text in tables:
        try:
            ref = TableRef.parse(text)
        except ValueError as exc:
            click.echo(f"error: --table {text}: {exc}", err=True)
            sys.exit(2)
        if ref not in config.source.tables:
            click.echo(f"error: --table {text}: not in source.tables of {file}", err=True)
            sys.exit(2)
        refs.append(ref)
    setup_logs(verbose, log_format, config)
    with source_errors(config):
        request, running = request_snapshot(config.source.conninfo, config.source.slot, refs, where,
                                            only_into_a_slot=True)
    if request is None:
        # A new pipeline: the request must follow the slot in the WAL, or no connector ever reads it.
        request = new_request_id()
        log.info("pipeline %s has no replication slot yet: running a connector, which creates it, until snapshot "
                 "request %s is done", config.pipeline, request)
        write = functools.partial(write_request, config.source.conninfo, config.source.slot, request, refs, where)
        execute(lambda stop: [Connector(config, stop, until_request=request, once_slot_exists=write).run()])
    elif running:
        log.info("snapshot request %s handed to the running connector; following its progress", request)
        execute(lambda stop: [_follow_snapshot(config, request, refs, stop)])
    else:
        log.info("no connector is running: running one until snapshot request %s is done", request)
        execute(lambda stop: [Connector(config, stop, until_request=request).run()])


async def _follow_snapshot(config: PipelineConfig, request: str, refs: list, stop: asyncio.Event) -> None:
    from cdc.snapshots.progress import load_progress

    last: dict[str, int] = {}
    while not stop.is_set():
        progress = await load_progress(config)
        records = [progress.get((request, str(ref))) for ref in refs]
        for ref, record in zip(refs, records):
            if record is not None and last.get(str(ref)) != record["rows"]:
                last[str(ref)] = record["rows"]
                log.info("snapshot of %s: %d rows%s", ref, record["rows"], ", done" if record["done"] else "")
        if all(r is not None and r["done"] for r in records):
            return
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


# `cdc dlq FILE --sink NAME list`: the group's option comes after its argument, and the
