"""Verbs that look and explain, and change nothing: `cdc validate`, `cdc setup --print-sql`,
`cdc schema`, `cdc explain` (the privacy audit against the source), `cdc status`."""

from __future__ import annotations

import json
import sys

import click
import psycopg

from cdc.cli.group import load_file, main, source_errors
from cdc.errors import refused_for_good
from cdc.redact import one_line, redact, scrub


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check a pipeline YAML. Prints every problem as FILE:LINE: message and exits 2, or exits 0."""
    config = load_file(file)
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

    config = load_file(file)
    if not print_sql:
        click.echo("error: cdc setup only prints the SQL for an administrator to run: add --print-sql", err=True)
        sys.exit(2)
    role = role or str(conninfo_to_dict(config.source.postgres).get("user") or f"cdc_{config.pipeline}")
    dsn = admin_dsn or config.source.conninfo
    with source_errors(config):
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


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
def explain(file: str, as_json: bool) -> None:
    """Connect to the source and print what each table publishes: every column's fate (pass,
    exclude, hash, keep_first, keep_last, redact, null), whether the publication or the connector
    enforces it, the row filter and where it runs, and why pushdown was not used."""
    import json

    from cdc.transform.plan import prepare
    from cdc.source.postgres.catalog import Catalog
    from cdc.source.postgres.replication import SESSION_OPTIONS

    config = load_file(file)
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

    config = load_file(file)
    result = pipeline_status(config, max_lag_events=max_lag_events)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))
    problems = unreachable(result)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(1 if problems else 3 if result["problems"] else 0)
