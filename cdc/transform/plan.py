"""The pipeline's privacy policy against the source catalog: each table's compiled policy, what its
publication enforces (pushdown) and why the rest stays with the connector. Used by the connector at
start and by `cdc explain`; the rules themselves are pure (cdc.transform.privacy)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cdc.config import PipelineConfig, TableRef
from cdc.errors import SourceError
from cdc.source.postgres.catalog import Catalog, ColumnInfo, TableInfo, check_source
from cdc.source.postgres.publication import publication_blocker
from cdc.transform.privacy import Pushdown, TablePolicy, compile_policy, plan_pushdown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TablePlan:
    ref: TableRef
    info: TableInfo
    columns: list[ColumnInfo]
    policy: TablePolicy | None  # None: the table has no privacy entry, every column is published
    pushdown: Pushdown


@dataclass(frozen=True)
class PrivacyPlan:
    tables: dict[TableRef, TablePlan]

    def policy(self, ref: TableRef) -> TablePolicy | None:
        plan = self.tables.get(ref)
        return plan.policy if plan is not None else None

    def publication(self) -> dict[TableRef, tuple[tuple[str, ...] | None, str | None]]:
        """Column list and row filter per table, for ensure_publication."""
        return {ref: (p.pushdown.columns, p.pushdown.where) for ref, p in self.tables.items()}

    def describe(self, config: PipelineConfig) -> dict[str, Any]:
        """The audit of `cdc explain --json`: per table its columns' fates and where they are enforced."""
        out = []
        for ref in config.source.tables:
            plan = self.tables.get(ref)
            if plan is None:
                continue
            policy, push = plan.policy, plan.pushdown
            columns = []
            for col in plan.columns:
                fate = policy.fate(col.name) if policy else "pass"
                # Excluded: the publication's column list or the connector drops it. Masks always
                # run in the connector; passed columns need no enforcement.
                enforced = push.columns_at if fate == "exclude" else None if fate == "pass" else "connector"
                entry = {"name": col.name, "type": col.type, "fate": fate, "enforced": enforced}
                if fate == "exclude" and push.columns_reason:
                    entry["reason"] = push.columns_reason
                columns.append(entry)
            row_filter = policy.row_filter if policy else None
            rows = {"filter": row_filter.text if row_filter else None,
                    "enforced": push.rows_at if row_filter else None}
            if row_filter is not None:
                rows["publication_where"] = push.where
                if push.rows_reason:
                    rows["reason"] = push.rows_reason
            out.append({
                "table": str(ref), "topic": config.topic_for(ref),
                "replica_identity": {"d": "default", "f": "full"}.get(plan.info.replica_identity, plan.info.replica_identity),
                "column_list": list(push.columns) if push.columns is not None else None,
                "columns": columns, "rows": rows,
            })
        return {"publication": config.source.publication, "tables": out}


def prepare(config: PipelineConfig, catalog: Catalog) -> tuple[PrivacyPlan, list[str]]:
    """Compile every table's policy against the catalog; the plan and the problems (FILE:LINE: ...).

    Tables that do not exist are left out (check_source reports them)."""
    conn = catalog.conn
    privacy = config.privacy
    hasher = privacy.hasher()
    blocker = publication_blocker(conn, config.source.publication)
    version = conn.info.server_version
    problems: list[str] = []
    tables: dict[TableRef, TablePlan] = {}
    for ref in config.source.tables:
        info = catalog.table_info(ref)
        if info is None or info.partitioned:
            continue
        columns = catalog.columns(info.oid)
        policy = None
        entry = privacy.tables.get(ref)
        if entry is not None:
            policy, found = compile_policy(
                str(ref), entry.rules(), columns, info.primary_key, info.replica_identity, hasher,
                lambda *path, ref=ref: config.privacy_where(ref, *path),
            )
            problems += found
            if policy is None:
                continue
        push = plan_pushdown(policy, columns, info.primary_key, info.replica_identity, version, blocker) if policy else Pushdown()
        tables[ref] = TablePlan(ref, info, columns, policy, push)
    return PrivacyPlan(tables), problems


def check_source_and_privacy(config: PipelineConfig, catalog: Catalog) -> tuple[dict[TableRef, TableInfo], PrivacyPlan]:
    """The source's up-front checks and the privacy policy's, all problems reported together."""
    plan, problems = prepare(config, catalog)
    dropped = {
        ref: frozenset(c.name for c in p.columns if not p.policy.passes(c.name))
        for ref, p in plan.tables.items() if p.policy is not None
    }
    tables_at = {ref: config.table_location(ref) for ref in config.source.tables}
    try:
        checked = check_source(catalog, tables_at, config.where("source", "postgres"), config.source.publication, dropped,
                               snapshot_reads=config.source.snapshot == "initial")
    except SourceError as exc:
        raise SourceError("\n".join([str(exc), *problems])) from None
    if problems:
        raise SourceError("\n".join(problems))
    for ref, p in plan.tables.items():
        _log_enforcement(config, p)
    return checked, plan


def _log_enforcement(config: PipelineConfig, plan: TablePlan) -> None:
    """Say at start what stays with the connector and why (names only, never values)."""
    policy, push = plan.policy, plan.pushdown
    if policy is None:
        return
    where = config.privacy_where(plan.ref)
    dropped = [c.name for c in plan.columns if not policy.passes(c.name)]
    if dropped and push.columns is None:
        log.info("%s: %s: column(s) %s are dropped by the connector, not the publication: %s",
                 where, plan.ref, ", ".join(dropped), push.columns_reason)
    if policy.row_filter is not None and push.where is None:
        log.info("%s: %s: the row filter runs in the connector, not the publication: %s", where, plan.ref, push.rows_reason)
