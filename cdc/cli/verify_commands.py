"""`cdc verify`: compare a sink's target with the source at one point of the stream (cdc.verify)."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
import orjson

from cdc.cli.group import execute, load_file, log_format_option, main, setup_logs, source_errors
from cdc.logs import LogFormat

log = logging.getLogger(__name__)

# Exit code when the target differs from the source: a result, not an error (docs/cli.md).
DIFFERS = 6
RECHECKS = 2  # times a differing range is read again before it is reported
MAX_RECHECKED_RANGES = 100  # more differing ranges than this: a real divergence, reported as found


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--sink", "sink_name", required=True, help="The sink whose target is compared.")
@click.option("--table", "tables", multiple=True, metavar="TABLE",
              help="Table to verify (repeatable), as written in source.tables; default: every table the sink reads.")
@click.option("--rate", type=click.IntRange(min=1), metavar="ROWS",
              help="Read at most this many source rows per second (default: as fast as the chunks go).")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True, metavar="SECONDS",
              help="How long to wait for every result (the connector and the sink must be running).")
@click.option("--repair", is_flag=True,
              help="Repair the ranges that differ: re-publish their source rows and delete the target's rows the "
                   "source does not have, in stream order; then report the ranges as repaired.")
@click.option("--json", "as_json", is_flag=True, help="The result as one JSON object on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@log_format_option
def verify(file: str, sink_name: str, tables: tuple[str, ...], rate: int | None, timeout: float, repair: bool,
           as_json: bool, verbose: bool, log_format: LogFormat) -> None:
    """Prove that a sink's target holds what the source holds, while the pipeline streams.

    The source is read in key ranges between watermarks, like a snapshot; the sink compares each
    range in its target when it reaches the range's place in the stream. Exit 0 when every table is
    equal, 6 when a table differs (see docs/verify.md).
    """
    from cdc.config import TableRef
    from cdc.verify.requests import Collected, collect, request_verify
    from cdc.verify.results import lines, summarize

    config = load_file(file)
    if sink_name not in config.sinks:
        click.echo(f"{file}: no sink named {sink_name} (sinks: {', '.join(config.sinks) or 'none'})", err=True)
        sys.exit(2)
    sink_config = config.sinks[sink_name]
    refs = []
    for text in tables or [str(t) for t in config.source.tables if sink_config.subscribes(t)]:
        try:
            ref = TableRef.parse(text)
        except ValueError as exc:
            click.echo(f"error: --table {text}: {exc}", err=True)
            sys.exit(2)
        if ref not in config.source.tables or not sink_config.subscribes(ref):
            click.echo(f"error: --table {text}: not a table of source.tables that sink {sink_name} reads", err=True)
            sys.exit(2)
        refs.append(ref)
    setup_logs(verbose, log_format, config)
    names = [str(r) for r in refs]
    with source_errors(config):
        request, running = request_verify(config.source.conninfo, config.source.slot, refs, rate)
    if not running:
        click.echo(f"error: no connector is running for slot {config.source.slot}: start `cdc run` or `cdc connector` "
                   "(and the sink) and verify again", err=True)
        sys.exit(1)
    log.info("verification request %s handed to the running connector; waiting for sink %s", request, sink_name)
    outcome: dict = {}

    async def run(stop: asyncio.Event) -> None:
        collected = Collected(request, sink_name, [(name, 0) for name in names])
        if not await collect(config, collected, timeout, stop):
            outcome["missing"] = (request, collected.missing())
            return
        results = list(collected.results.values())
        rechecked = repaired = 0
        for _ in range(RECHECKS):
            differing = [r for r in results if not r["equal"]]
            fix = repair
            if not differing or (len(differing) > MAX_RECHECKED_RANGES and not repair):
                break
            # A range that differs is read again: a real difference stays, one seen in passing does
            # not. With --repair it is repaired instead (harmless for a range that was equal after all).
            ranges = [{"table": r["table"], "lo": r["lo"], "hi": r["hi"]} for r in differing]
            again, _ = await asyncio.to_thread(request_verify, config.source.conninfo, config.source.slot, [], rate,
                                               ranges, fix)
            log.info("verification %s: %d ranges differ; %s them (request %s)", request, len(ranges),
                     "repairing" if fix else "checking again", again)
            collected = Collected(again, sink_name, [(r["table"], part) for part, r in enumerate(ranges)])
            if not await collect(config, collected, timeout, stop):
                outcome["missing"] = (again, collected.missing())
                return
            rechecked += 0 if fix else len(ranges)
            repaired += len(ranges) if fix else 0
            results = [r for r in results if r["equal"]] + list(collected.results.values())
        outcome["summary"] = summarize(request, sink_name, names, results, rechecked, repaired)

    execute_and_return(lambda stop: [run(stop)])
    if "summary" not in outcome:
        waited_for, missing = outcome.get("missing", (request, ["stopped"]))
        click.echo(f"error: verification {waited_for}: no complete result after {timeout:g} s: {'; '.join(missing)} "
                   f"(is sink {sink_name} running?)", err=True)
        sys.exit(1)
    summary = outcome["summary"]
    if as_json:
        click.echo(orjson.dumps(summary).decode())
    else:
        for line in lines(summary):
            click.echo(line)
    sys.exit(0 if summary["equal"] else DIFFERS)


def execute_and_return(make_tasks) -> None:
    """execute() exits the process; here the result is printed afterwards, so a clean end returns."""
    try:
        execute(make_tasks)
    except SystemExit as exc:
        if exc.code:
            raise
