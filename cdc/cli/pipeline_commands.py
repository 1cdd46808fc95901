"""The `cdc` command: validate a pipeline, run its connector and sinks."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click
import psycopg
from aiokafka.errors import KafkaError

from cdc.config import PipelineConfig, load_pipeline
from cdc.errors import CdcError, ConfigError, TargetError, TargetLoginError, refused_for_good
from cdc.logs import LogFormat, log_context, setup_logging
from cdc.lsn import format_lsn, parse_lsn
from cdc.redact import one_line, redact, scrub
from cdc.retry import Outage, wait_out_start

if TYPE_CHECKING:
    from cdc.connector import Connector
    from cdc.sink.runner import Sink

log = logging.getLogger("cdc")


def _load(path: str) -> PipelineConfig:
    try:
        return load_pipeline(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(exc.exit_code)


def _setup_logging(verbose: bool, log_format: LogFormat, config: PipelineConfig) -> None:
    for handler in setup_logging(verbose, log_format, pipeline=config.pipeline):
        handler.addFilter(_RateLimitedKafkaLog())  # logger filters do not apply to child loggers
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


_metrics_port_option = click.option(
    "--metrics-port", type=click.IntRange(0, 65535), metavar="PORT", envvar="CDC_METRICS_PORT",
    help="Serve Prometheus metrics on /metrics, and /health and /ready, on this port (all interfaces).")


def _observe(port: int | None, config: PipelineConfig, *, connector: Any = None, sinks: Iterable[Any] = ()) -> None:
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


_log_format_option = click.option(
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


async def _run_until_stopped(make_tasks: Callable[[asyncio.Event], Workers | Awaitable[Workers]]) -> None:
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


def _execute(make_tasks: Callable[[asyncio.Event], list[Awaitable[None]]]) -> None:
    code = 0
    try:
        asyncio.run(_run_until_stopped(make_tasks))
    except CdcError as exc:
        click.echo(f"error: {exc}", err=True)
        code = exc.exit_code
    except (psycopg.OperationalError, KafkaError, OSError) as exc:
        # An unreachable or failing service: the message is the useful part, not our traceback.
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        code = 1
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


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check a pipeline YAML. Prints every problem as FILE:LINE: message and exits 2, or exits 0."""
    config = _load(file)
    click.echo(f"{file}: pipeline {config.pipeline} is valid: {len(config.source.tables)} tables, {len(config.sinks)} sinks")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--print-sql", is_flag=True, help="Print the SQL an administrator runs once (required: nothing is executed).")
@click.option("--role", metavar="NAME", help="The connector's role (default: the user of source.postgres, else cdc_PIPELINE).")
@click.option("--admin-dsn", metavar="DSN", envvar="CDC_ADMIN_DSN",
              help="Read the catalog through this connection instead of source.postgres (the role may not exist yet).")
def setup(file: str, print_sql: bool, role: str | None, admin_dsn: str | None) -> None:
    """Print what an administrator runs once so that the connector needs only a least-privilege role:
    the role (LOGIN, REPLICATION, SELECT on the tables), replica identities and the publication."""
    from psycopg.conninfo import conninfo_to_dict

    from cdc.source.postgres.setup import setup_sql

    config = _load(file)
    if not print_sql:
        click.echo("error: cdc setup only prints the SQL for an administrator to run: add --print-sql", err=True)
        sys.exit(2)
    role = role or str(conninfo_to_dict(config.source.postgres).get("user") or f"cdc_{config.pipeline}")
    dsn = admin_dsn or config.source.conninfo
    with _source_errors(config):
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                script = setup_sql(config, conn, role)
        except ValueError as exc:
            click.echo(f"error: {config.where('source', 'tables')}: {exc}", err=True)
            sys.exit(2)
        except psycopg.OperationalError as exc:
            click.echo(f"error: cannot connect to the source {redact(dsn)}: {scrub(one_line(exc), dsn)}", err=True)
            sys.exit(2 if refused_for_good(str(exc)) else 3)
    click.echo(script, nl=False)


@main.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of pipeline files, for editors (completion and lint as you type)."""
    from cdc.config.json_schema import pipeline_schema

    click.echo(json.dumps(pipeline_schema(), indent=2))


def check_target(config: PipelineConfig, name: str) -> None:
    """The sink's target can be reached and used; creates nothing (no SQLite file, no positions
    table): a start that fails a later check leaves no trace in the targets."""
    sink = config.sinks[name]
    where = f"sink {config.pipeline}.{name}"
    path = sink.sqlite_path
    if sink.dialect == "sqlite" and path is not None:
        try:
            if path.exists():  # read-only: an existing file must be a database we can open
                conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
                try:
                    conn.execute("SELECT count(*) FROM sqlite_master")
                finally:
                    conn.close()
            elif not os.access(path.parent, os.W_OK | os.X_OK):
                raise TargetError(f"{where}: cannot use target {path}: directory {path.parent} is not writable")
        except sqlite3.Error as exc:
            raise TargetError(f"{where}: cannot use target {path}: {exc}") from None
        return
    url = sink.connect_url
    try:
        psycopg.connect(url, autocommit=True).close()
    except psycopg.Error as exc:  # one line, never the password
        text = scrub(one_line(exc), url)
        error = TargetLoginError if refused_for_good(text) else TargetError
        raise error(f"{where}: cannot use target {redact(url)}: {text}") from None


# Start-up checks wait out what is not up yet (a source still starting up or refusing connections, a
# broker, a target) under the component's retry ceiling, as a fault while running would be; bad
# input stops at once with its exit code (README: Faults and retries).


async def _check_connector(connector: Connector, stop: asyncio.Event) -> None:
    from cdc.connector import _kafka_fault

    async def attempt() -> None:
        try:
            await connector.check()
        except BaseException:  # the next attempt connects again
            connector.repl.close()
            if connector.catalog_conn is not None:
                connector.catalog_conn.close()
                connector.catalog_conn = None
            raise

    await wait_out_start(attempt, lambda exc: connector.kafka_outage if _kafka_fault(exc) else connector.source_outage,
                         stop=stop)


async def _check_targets(config: PipelineConfig, sinks: Iterable[Sink], stop: asyncio.Event) -> None:
    for sink in sinks:
        await wait_out_start(lambda: asyncio.to_thread(check_target, config, sink.name),
                             lambda exc: sink.outage, stop=stop)  # noqa: B023 (awaited in this iteration)


_CREATE_SLOT_HELP = (
    "Create the replication slot even though the pipeline's topics already hold events (the slot was "
    "dropped: changes made while it was missing are not published)."
)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--create-slot", is_flag=True, help=_CREATE_SLOT_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@_log_format_option
@_metrics_port_option
def run(file: str, create_slot: bool, verbose: bool, log_format: LogFormat, metrics_port: int | None) -> None:
    """Run the connector and every sink of the pipeline in one process, until SIGINT/SIGTERM."""
    from cdc.connector import Connector
    from cdc.sink.runner import Sink

    config = _load(file)
    _setup_logging(verbose, log_format, config)

    async def start(stop: asyncio.Event) -> Workers:
        # Source, Kafka, then every target; nothing is created (slot, publication, topics, SQLite
        # files, positions tables, locks) until all of them passed.
        connector = Connector(config, stop, create_missing_slot=create_slot)
        sinks = [Sink(config, name, stop, config_file=file) for name in config.sinks]
        _observe(metrics_port, config, connector=connector, sinks=sinks)  # /health and /ready during the checks too
        await _check_connector(connector, stop)
        await _check_targets(config, sinks, stop)
        return [log_context(connector.run(), component="connector", slot=config.source.slot),
                *(log_context(sink.run(), component="sink", sink=sink.name) for sink in sinks)]

    _execute(start)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--create-slot", is_flag=True, help=_CREATE_SLOT_HELP)
@click.option("--skip-to-lsn", "skip_to", metavar="LSN",
              help="Do not stream: confirm the slot up to LSN, so that nothing before it is ever published, and exit.")
@click.option("--yes", is_flag=True, help="With --skip-to-lsn: do not ask for confirmation.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@_log_format_option
@_metrics_port_option
def connector(file: str, create_slot: bool, skip_to: str | None, yes: bool, verbose: bool, log_format: LogFormat,
              metrics_port: int | None) -> None:
    """Run only the connector: PostgreSQL -> Kafka."""
    from cdc.connector import Connector

    config = _load(file)
    _setup_logging(verbose, log_format, config)
    if skip_to is not None:
        _skip_to_lsn(config, skip_to, yes)
        return

    async def start(stop: asyncio.Event) -> Workers:
        connector = Connector(config, stop, create_missing_slot=create_slot)
        _observe(metrics_port, config, connector=connector)
        await _check_connector(connector, stop)
        return [log_context(connector.run(), component="connector", slot=config.source.slot)]

    _execute(start)


@contextmanager
def _source_errors(config: PipelineConfig) -> Iterator[None]:
    """A one-shot command against the source: its error on one line with its exit code, no password."""
    try:
        yield
    except CdcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except psycopg.Error as exc:
        dsn = config.source.postgres
        click.echo(f"error: {config.where('source', 'postgres')}: source {redact(dsn)}: {scrub(one_line(exc), dsn)}", err=True)
        sys.exit(1)


def _skip_to_lsn(config: PipelineConfig, text: str, yes: bool) -> None:
    from cdc.connector import skip_slot_to, slot_position

    try:
        lsn = parse_lsn(text)
    except ValueError as exc:
        click.echo(f"error: --skip-to-lsn: {exc}", err=True)
        sys.exit(2)
    with _source_errors(config):
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


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
def explain(file: str, as_json: bool) -> None:
    """Connect to the source and print what each table publishes: every column's fate (pass,
    exclude, hash, keep_first, keep_last, redact, null), whether the publication or the connector
    enforces it, the row filter and where it runs, and why pushdown was not used."""
    import json

    from cdc.privacy_plan import prepare
    from cdc.source.postgres.catalog import Catalog
    from cdc.source.postgres.replication import SESSION_OPTIONS

    config = _load(file)
    dsn = config.source.postgres
    try:
        with psycopg.connect(config.source.conninfo, autocommit=True, options=SESSION_OPTIONS) as conn:
            catalog = Catalog(conn)
            plan, problems = prepare(config, catalog)
            # Asked of the catalog: a table left out of the plan for a policy problem does exist.
            missing = [f"{config.table_location(ref)}: table {ref} does not exist in the source database"
                       for ref in config.source.tables if catalog.table_info(ref) is None]
    except psycopg.Error as exc:
        click.echo(f"error: {config.where('source', 'postgres')}: cannot use the source {redact(dsn)}: "
                   f"{scrub(one_line(exc), dsn)}", err=True)
        sys.exit(2)
    if problems or missing:
        for problem in [*missing, *problems]:
            click.echo(problem, err=True)
        sys.exit(2)
    audit = plan.describe(config)
    if as_json:
        click.echo(json.dumps(audit, indent=2))
        return
    for table in audit["tables"]:
        click.echo(f"{table['table']} -> topic {table['topic']} (replica identity {table['replica_identity']})")
        for col in table["columns"]:
            enforced = f" [{col['enforced']}]" if col["enforced"] else ""
            reason = f" ({col['reason']})" if col.get("reason") else ""
            click.echo(f"  {col['name']:<24} {col['fate']:<10}{enforced}{reason}")
        rows = table["rows"]
        if rows["filter"] is None:
            click.echo("  rows: every row")
        else:
            reason = f" ({rows['reason']})" if rows.get("reason") else ""
            click.echo(f"  rows: {rows['filter']} [{rows['enforced']}]{reason}")


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
@_log_format_option
@_metrics_port_option
def sink(file: str, names: tuple[str, ...], accept_source_history: bool, skip_text: str | None, yes: bool,
         verbose: bool, log_format: LogFormat, metrics_port: int | None) -> None:
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
    skip_record = _skip_record(skip_text, names, yes) if skip_text is not None else None
    _setup_logging(verbose, log_format, config)
    selected = names or tuple(config.sinks)

    async def start(stop: asyncio.Event) -> Workers:
        from cdc.kafka_admin import end_offsets

        sinks = [Sink(config, name, stop, accept_source_history=accept_source_history, config_file=file,
                      skip_record=skip_record) for name in selected]
        _observe(metrics_port, config, sinks=sinks)
        await _check_targets(config, sinks, stop)
        # Kafka reachable: before a target gets its positions table
        kafka = Outage("Kafka", config.kafka.retry, stop, component="sink")
        await wait_out_start(lambda: end_offsets(config.kafka, []), lambda exc: kafka, stop=stop)
        return [log_context(sink.run(), component="sink", sink=sink.name) for sink in sinks]

    _execute(start)


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
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines for a person.")
@click.option("--max-lag-events", type=click.IntRange(min=0), metavar="N",
              help="Also exit 3 when a sink has more than N events left to apply.")
def status(file: str, as_json: bool, max_lag_events: int | None) -> None:
    """Where the pipeline stands: the slot, snapshots, topics, and each sink's applied position and lag.

    Exits 0 when healthy; 1 when the source, Kafka or a target did not answer (saying which); 2 for
    a bad file; 3 when everything answered but no connector is running, a sink with events to apply
    is not running, or (with --max-lag-events) a sink is too far behind. For health checks.
    """
    import json

    from cdc.status import pipeline_status, render, unreachable

    config = _load(file)
    result = pipeline_status(config, max_lag_events=max_lag_events)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))
    problems = unreachable(result)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(1 if problems else 3 if result["problems"] else 0)


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
@_log_format_option
def replay(file: str, name: str, from_text: str, until_text: str | None, target_url: str | None, yes: bool,
           verbose: bool, log_format: LogFormat) -> None:
    """Re-apply retained events from an LSN to a sink's target, or rebuild another database."""
    from cdc.config import SinkConfig
    from cdc.sink.replay import Replay

    config = _load(file)
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
    _setup_logging(verbose, log_format, config)
    _execute(lambda stop: [Replay(config, name, stop, from_lsn=from_lsn, until_lsn=until_lsn, target=target,
                                  config_file=file).run()])


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--table", "tables", multiple=True, required=True, metavar="TABLE",
              help="Table to re-read (repeatable), as written in source.tables.")
@click.option("--where", metavar="SQL", help="Only the rows matching this SQL condition.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@_log_format_option
def snapshot(file: str, tables: tuple[str, ...], where: str | None, verbose: bool, log_format: LogFormat) -> None:
    """Re-read tables (or the rows matching --where) while streaming goes on.

    The request travels in the source's WAL, so a running connector takes it up in order with the
    stream; with no connector running, this command runs one until the snapshot is done.
    """
    from cdc.config import TableRef
    from cdc.connector import Connector, request_snapshot

    config = _load(file)
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
    _setup_logging(verbose, log_format, config)
    with _source_errors(config):
        request, running = request_snapshot(config, refs, where)
    if running:
        log.info("snapshot request %s handed to the running connector; following its progress", request)
        _execute(lambda stop: [_follow_snapshot(config, request, refs, stop)])
    else:
        log.info("no connector is running: running one until snapshot request %s is done", request)
        _execute(lambda stop: [Connector(config, stop, until_request=request).run()])


async def _follow_snapshot(config: PipelineConfig, request: str, refs: list, stop: asyncio.Event) -> None:
    from cdc.snapshot import load_progress

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
    config = _load(file)
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

    _execute(lambda stop: [show(stop)])


@dlq.command("retry")
@click.option("--key", metavar="KEY", help="Only this key's dead letters (its JSON form, as `list` prints it).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_obj
def dlq_retry(obj: tuple, key: str | None, verbose: bool) -> None:
    """Apply the dead letters to the target again (after fixing it), in order, in one transaction;
    on success they leave the DLQ and their keys are released."""
    from cdc.sink.dead_letter_commands import retry

    file, config, name = obj
    _setup_logging(verbose, "text", config)

    async def run(stop: asyncio.Event) -> None:
        letters, keys = await retry(config, name, key, file)
        click.echo(f"sink {config.pipeline}.{name}: {letters} dead letters applied, {keys} keys released")

    _execute(lambda stop: [run(stop)])


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
    _setup_logging(verbose, "text", config)

    async def run(stop: asyncio.Event) -> None:
        letters, keys = await skip(config, name, key, file)
        click.echo(f"sink {config.pipeline}.{name}: {letters} dead letters skipped, {keys} keys released")

    _execute(lambda stop: [run(stop)])


if __name__ == "__main__":
    main()
