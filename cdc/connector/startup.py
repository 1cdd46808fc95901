"""Preflight checks and set-up before streaming, each a function: the source (connection, tables,
privileges, privacy, the slot), rule bindings against the last start, a missing slot while topics
hold events, the publication. Every check comes before any side effect: a wrong broker address or
a missing table must not leave a slot behind pinning WAL, nor topics for tables that do not exist.
Called by cdc.connector.lifecycle; what they find feeds the stages' construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from cdc.config import PipelineConfig
from cdc.errors import AlreadyRunningError, SourceError, SourceLostError, WouldLoseDataError
from cdc.events.origin import SourceOrigin
from cdc.publish.admin import latest_per_key
from cdc.publish.kafka import Publisher
from cdc.redact import one_line, redact
from cdc.source.postgres.catalog import Catalog, TableInfo
from cdc.source.postgres.publication import ensure_publication
from cdc.source.postgres.replication import SESSION_OPTIONS, ReplicationConnection, SlotState, connect_failure
from cdc.source.postgres.values import ValueDecoder
from cdc.transform import column_bindings
from cdc.transform.plan import PrivacyPlan, check_source_and_privacy


@dataclass
class CheckedSource:
    """What the source check found; `conn` is the catalog connection (new relations, types) while streaming."""

    conn: psycopg.Connection
    catalog: Catalog
    values: ValueDecoder
    tables: dict[int, TableInfo]  # by table OID = pgoutput relation id
    privacy: PrivacyPlan
    db_name: str
    origin: SourceOrigin  # from IDENTIFY_SYSTEM
    slot: SlotState | None  # None: missing


def check_source(config: PipelineConfig, repl: ReplicationConnection, reconnecting: bool) -> CheckedSource:
    """Connect, check tables, privileges and the slot. `reconnecting`: this process streamed before
    (its own walsender may still hold the slot)."""
    try:
        # The same session settings as the walsender's, so loaders read its text the way it was printed.
        conn = psycopg.connect(config.source.conninfo, autocommit=True, options=SESSION_OPTIONS)
    except psycopg.Error as exc:  # one line, and never the password (libpq may quote the DSN)
        dsn = config.source.postgres
        raise connect_failure(f"{config.where('source', 'postgres')}: cannot connect to the source {redact(dsn)}",
                              exc, dsn) from None
    try:
        catalog = Catalog(conn)
        values = ValueDecoder(conn)
        checked, privacy = check_source_and_privacy(config, catalog)
        db_name = conn.info.dbname
        repl.open()
        system_id, timeline = repl.identify_system()
        origin = SourceOrigin(system_id, timeline, repl.timeline_start(timeline))
        slot = repl.find_slot(config.source.slot)
        _check_slot(config, conn, repl, slot, reconnecting)
    except BaseException:
        conn.close()
        raise
    return CheckedSource(conn, catalog, values, {info.oid: info for info in checked.values()}, privacy, db_name,
                         origin, slot)


def _check_slot(config: PipelineConfig, conn: psycopg.Connection, repl: ReplicationConnection, slot: SlotState | None,
                reconnecting: bool) -> None:
    if slot is not None and slot.active_pid is not None and reconnecting and slot.holder == repl.application_name:
        # Our own walsender from before a reconnect, which has not noticed yet that we left.
        conn.execute("SELECT pg_terminate_backend(%s)", (slot.active_pid,))
        raise SourceLostError(f"slot {slot.name} is still held by this process's previous walsender (PID "
                              f"{slot.active_pid}): ended it")
    if slot is not None and slot.active_pid is not None:
        raise AlreadyRunningError(
            f"pipeline {config.pipeline} is already running: slot {slot.name} is held by "
            + (f"{slot.holder[4:].replace('pid', 'PID', 1)}, the cdc process (its walsender on the source is PID "
               f"{slot.active_pid}): stop it first" if slot.holder else
               f"PID {slot.active_pid} on the source, a walsender of a client that is not cdc: stop that client first")
        )
    if slot is not None and slot.wal_status == "lost":
        raise WouldLoseDataError(
            f"replication slot {slot.name} was invalidated: PostgreSQL removed WAL it still needed "
            "(max_slot_wal_keep_size), so changes are missing. Drop it (SELECT pg_drop_replication_slot"
            f"('{slot.name}')) and start with --create-slot; the tables need a re-snapshot"
        )


def check_missing_slot(config: PipelineConfig, slot: SlotState | None, ends: dict[tuple[str, int], int],
                       create_missing_slot: bool) -> None:
    """A missing slot while the topics hold events: the slot was dropped, changes since are lost."""
    holding = sorted({topic for (topic, _), end in ends.items() if end > 0})
    if slot is None and holding and not create_missing_slot:
        raise WouldLoseDataError(
            f"{config.where('source', 'slot')}: replication slot {config.source.slot} does not exist, but "
            f"topic(s) {', '.join(holding)} hold events of this pipeline: the slot was dropped, and every "
            "change made since then is lost to it. To start a new slot anyway (changes made while it was "
            "missing stay missing downstream), run once with --create-slot"
        )


async def check_bindings(config: PipelineConfig, privacy: PrivacyPlan) -> None:
    """Refuse rules whose name named another column at the last start (see cdc.transform.column_bindings)."""
    last = column_bindings.decode(await latest_per_key(config.kafka, column_bindings.topic_of(config.pipeline)))
    problems = []
    for ref, plan in privacy.tables.items():
        if plan.policy is not None:
            now = {c.attnum: c.name for c in plan.columns}
            problems += column_bindings.problems(config, ref, plan.info.oid, now, last.get(str(ref)))
    if problems:
        raise SourceError("\n".join(problems))


async def record_bindings(config: PipelineConfig, privacy: PrivacyPlan, publisher: Publisher) -> None:
    """What each rule means as of this start, for the next start to compare with."""
    topic = column_bindings.topic_of(config.pipeline)
    for ref, plan in privacy.tables.items():
        if plan.policy is not None:
            value = column_bindings.record(plan.info.oid, {c.name: c.attnum for c in plan.columns})
            await publisher.send_and_wait(topic, str(ref).encode(), value)


def publication(config: PipelineConfig, source: CheckedSource) -> set[tuple[str, str]]:
    """Create or reconcile the publication; returns the tables whose column list this changed."""
    try:
        return ensure_publication(source.conn, config.source.publication, list(config.source.tables),
                                  source.privacy.publication())
    except psycopg.Error as exc:  # e.g. a role that may not alter the publication; names no value
        raise SourceError(
            f"{config.where('source', 'publication')}: cannot create or update publication "
            f"{config.source.publication}: {one_line(exc)}"
        ) from None
