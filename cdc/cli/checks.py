"""Start-up checks of the long-running verbs (run, connector, sink): the source and Kafka through the
connector's own checks, and each sink's target, waited out under each component's retry ceiling."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

import psycopg

from cdc.config import PipelineConfig
from cdc.errors import TargetError, TargetLoginError, refused_for_good
from cdc.redact import one_line, redact, scrub
from cdc.retry import wait_out_start

if TYPE_CHECKING:
    from cdc.connector import Connector
    from cdc.sink.runner import Sink


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


async def check_connector(connector: Connector, stop: asyncio.Event) -> None:
    from cdc.connector import kafka_fault

    async def attempt() -> None:
        try:
            await connector.check()
        except BaseException:  # the next attempt connects again
            connector.close_source()
            raise

    await wait_out_start(attempt, lambda exc: connector.kafka_outage if kafka_fault(exc) else connector.source_outage,
                         stop=stop)


async def check_targets(config: PipelineConfig, sinks: Iterable[Sink], stop: asyncio.Event) -> None:
    for sink in sinks:
        await wait_out_start(lambda: asyncio.to_thread(check_target, config, sink.name),
                             lambda exc: sink.outage, stop=stop)  # noqa: B023 (awaited in this iteration)
