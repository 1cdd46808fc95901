"""Verbs of the sinks: `cdc sink` (run sinks, --skip-record), `cdc replay` (re-apply retained events
from an LSN), `cdc dlq` (a sink's dead letters: list, retry, skip)."""

from __future__ import annotations

import asyncio
import sys

import click

from cdc.cli.checks import check_targets
from cdc.cli.group import Workers, execute, load_file, log_format_option, main, metrics_port_option, observe, setup_logs
from cdc.logs import LogFormat, log_context
from cdc.lsn import format_lsn, parse_lsn
from cdc.retry import Outage, wait_out_start


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", "names", multiple=True, help="Sink to run (repeatable); default: every sink of the pipeline.")
@click.option("--accept-source-history", is_flag=True,
              help="Continue with events of another source history (a failover that forked before what the "
                   "sink applied, another cluster); changes of the old history stay in the target. Needs --name.")
@click.option("--skip-record", "skip_text", metavar="TOPIC:PARTITION:OFFSET",
              help="Skip this one record, which is no cdc event, and go on (recorded in the log and the positions "
                   "table). Needs --name.")
@click.option("--yes", is_flag=True, help="With --skip-record: skip without asking.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@log_format_option
@metrics_port_option
def sink(file: str, names: tuple[str, ...], accept_source_history: bool, skip_text: str | None, yes: bool,
         verbose: bool, log_format: LogFormat, metrics_port: int | None) -> None:
    """Run sinks only: Kafka -> target databases."""
    from cdc.sink.runner import Sink

    config = load_file(file)
    unknown = [n for n in names if n not in config.sinks]
    if unknown:
        click.echo(f"{file}: no sink named {', '.join(unknown)} (sinks: {', '.join(config.sinks) or 'none'})", err=True)
        sys.exit(2)
    if accept_source_history and not names:
        # A deliberate decision about one target: never for every sink of a file at once by accident.
        click.echo("--accept-source-history needs --name: the sink whose target keeps the old history", err=True)
        sys.exit(2)
    skip_record = _skip_record(skip_text, names, yes) if skip_text is not None else None
    setup_logs(verbose, log_format, config)
    selected = names or tuple(config.sinks)

    async def start(stop: asyncio.Event) -> Workers:
        from cdc.publish.admin import end_offsets

        sinks = [Sink(config, name, stop, accept_source_history=accept_source_history, config_file=file,
                      skip_record=skip_record) for name in selected]
        observe(metrics_port, config, sinks=sinks)
        await check_targets(config, sinks, stop)
        # Kafka reachable: before a target gets its positions table
        kafka = Outage("Kafka", config.kafka.retry, stop, component="sink")
        await wait_out_start(lambda: end_offsets(config.kafka, []), lambda exc: kafka, stop=stop)
        return [log_context(sink.run(), component="sink", sink=sink.name) for sink in sinks]

    execute(start)


def _skip_record(text: str, names: tuple[str, ...], yes: bool) -> tuple[str, int, int]:
    """--skip-record TOPIC:PARTITION:OFFSET, for one named sink, confirmed; exit 2 otherwise."""
    topic, _, numbers = text.partition(":")
    partition, _, offset = numbers.partition(":")
    if not (topic and partition.isdigit() and offset.isdigit()):
        click.echo(f"error: --skip-record {text!r}: expected TOPIC:PARTITION:OFFSET, as the sink's error names it", err=True)
        sys.exit(2)
    if len(names) != 1:
        click.echo("error: --skip-record needs one --name: the sink that stopped at the record", err=True)
        sys.exit(2)
    if not yes:
        if not sys.stdin.isatty():
            click.echo("error: --skip-record leaves that record out of the target for good: add --yes", err=True)
            sys.exit(2)
        if not click.confirm(f"Skip record {text} for sink {names[0]}? What it held never reaches the target"):
            sys.exit(1)
    return topic, int(partition), int(offset)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--sink", "name", required=True, help="The sink whose tables and apply path to use.")
@click.option("--from-lsn", "from_text", required=True, metavar="LSN",
              help="Re-apply every retained event committed at or after this LSN.")
@click.option("--until-lsn", "until_text", metavar="LSN", help="Stop after the events committed at or before this LSN.")
@click.option("--target", "target_url", metavar="URL",
              help="Rebuild into this database instead of the sink's own target (which is left untouched).")
@click.option("--yes", is_flag=True, help="Replay into the sink's own target without asking.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@log_format_option
def replay(file: str, name: str, from_text: str, until_text: str | None, target_url: str | None, yes: bool,
           verbose: bool, log_format: LogFormat) -> None:
    """Re-apply retained events from an LSN to a sink's target, or rebuild another database."""
    from cdc.config import SinkConfig
    from cdc.sink.replay import Replay

    config = load_file(file)
    if name not in config.sinks:
        click.echo(f"{file}: no sink named {name} (sinks: {', '.join(config.sinks) or 'none'})", err=True)
        sys.exit(2)
    lsns = {}
    for option, text in (("--from-lsn", from_text), ("--until-lsn", until_text)):
        if text is not None:
            try:
                lsns[option] = parse_lsn(text)
            except ValueError as exc:
                click.echo(f"error: {option}: {exc}", err=True)
                sys.exit(2)
    from_lsn, until_lsn = lsns["--from-lsn"], lsns.get("--until-lsn")
    if until_lsn is not None and until_lsn < from_lsn:
        click.echo(f"error: --until-lsn {format_lsn(until_lsn)} is before --from-lsn {format_lsn(from_lsn)}", err=True)
        sys.exit(2)
    target = None
    if target_url is not None:
        try:
            target = SinkConfig.model_validate({**config.sinks[name].model_dump(), "url": target_url})
        except ValueError as exc:
            problems = "; ".join(e["msg"] for e in getattr(exc, "errors", lambda: [])()) or "invalid URL"
            click.echo(f"error: --target: {problems}", err=True)
            sys.exit(2)
    elif not yes:
        question = (f"Re-apply the events of sink {name} from {format_lsn(from_lsn)} to its own target? Its rows "
                    "change to the states of those events, and its positions move back")
        if not sys.stdin.isatty():
            click.echo("error: replay into the sink's own target rewrites it: add --yes (or use --target URL)", err=True)
            sys.exit(2)
        if not click.confirm(question):
            sys.exit(1)
    setup_logs(verbose, log_format, config)
    execute(lambda stop: [Replay(config, name, stop, from_lsn=from_lsn, until_lsn=until_lsn, target=target,
                                  config_file=file).run()])


# `cdc dlq FILE --sink NAME list`: the group's option comes after its argument, and the
# subcommand's own options (`--key`, `--yes`) pass through to it.
@main.group(context_settings={"allow_interspersed_args": True, "ignore_unknown_options": True})
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--sink", "name", required=True, help="The sink whose dead-letter queue ({pipeline}.{sink}.dlq) to use.")
@click.pass_context
def dlq(ctx: click.Context, file: str, name: str) -> None:
    """A sink's dead letters (on_error: dlq): list them, apply them again, or drop them.

    \b
      cdc dlq FILE --sink NAME list [--key KEY] [--json]
      cdc dlq FILE --sink NAME retry [--key KEY] [-v]
      cdc dlq FILE --sink NAME skip [--key KEY] [--yes] [-v]

    KEY is the key's JSON form, as `list` prints it ('{"id":2}'). See docs/sinks.md, Dead letters.
    """
    config = load_file(file)
    if name not in config.sinks:
        click.echo(f"{file}: no sink named {name} (sinks: {', '.join(config.sinks) or 'none'})", err=True)
        sys.exit(2)
    ctx.obj = (file, config, name)


@dlq.command("list")
@click.option("--key", metavar="KEY", help="Only this key: its JSON form, as `list` prints it (e.g. '{\"id\":3}').")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines for a person.")
@click.pass_obj
def dlq_list(obj: tuple, key: str | None, as_json: bool) -> None:
    """What the DLQ holds: each dead letter not retried or skipped yet, oldest first."""
    import json

    from cdc.sink.dead_letter_commands import list_letters

    file, config, name = obj

    async def show(stop: asyncio.Event) -> None:
        letters = await list_letters(config, name, key)
        if as_json:
            click.echo(json.dumps({"sink": name, "dead_letters": [d.summary() for d in letters],
                                   "held_keys": len({d.key_id for d in letters})}))
            return
        click.echo(f"sink {config.pipeline}.{name}: {len(letters)} dead letters, "
                   f"{len({d.key_id for d in letters})} keys held back")
        for d in letters:
            click.echo(f"{d.dlq_offset}\t{d.table or '-'}\t{d.key_id[1]}\t{d.topic}[{d.partition}]@{d.offset}\t"
                       f"{d.position or '-'}\t{d.reason}")

    execute(lambda stop: [show(stop)])


@dlq.command("retry")
@click.option("--key", metavar="KEY", help="Only this key's dead letters (its JSON form, as `list` prints it).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_obj
def dlq_retry(obj: tuple, key: str | None, verbose: bool) -> None:
    """Apply the dead letters to the target again (after fixing it), in order, in one transaction;
    on success they leave the DLQ and their keys are released."""
    from cdc.sink.dead_letter_commands import retry

    file, config, name = obj
    setup_logs(verbose, "text", config)

    async def run(stop: asyncio.Event) -> None:
        letters, keys = await retry(config, name, key, file)
        click.echo(f"sink {config.pipeline}.{name}: {letters} dead letters applied, {keys} keys released")

    execute(lambda stop: [run(stop)])


@dlq.command("skip")
@click.option("--key", metavar="KEY", help="Only this key's dead letters (its JSON form, as `list` prints it).")
@click.option("--yes", is_flag=True, help="Drop them without asking.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_obj
def dlq_skip(obj: tuple, key: str | None, yes: bool, verbose: bool) -> None:
    """Drop the dead letters for good, releasing their keys: what they held never reaches the target."""
    from cdc.sink.dead_letter_commands import skip

    file, config, name = obj
    which = f"the dead letters of key {key}" if key is not None else "every dead letter"
    if not yes:
        if not sys.stdin.isatty():
            click.echo(f"error: skip drops {which} of sink {name} for good: add --yes", err=True)
            sys.exit(2)
        if not click.confirm(f"Drop {which} of sink {name}? What they held never reaches the target"):
            sys.exit(1)
    setup_logs(verbose, "text", config)

    async def run(stop: asyncio.Event) -> None:
        letters, keys = await skip(config, name, key, file)
        click.echo(f"sink {config.pipeline}.{name}: {letters} dead letters skipped, {keys} keys released")

    execute(lambda stop: [run(stop)])
