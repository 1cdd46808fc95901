"""`sinks:`: each downstream database, the tables it applies and how (pydantic models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, PrivateAttr, field_validator

from cdc.config.common import DEFAULT_CONNECT_TIMEOUT_S, MODEL_CONFIG, Int, RetryConfig, none_to_empty_dict
from cdc.config.connections import SQLITE_PREFIX, sink_url_problem, sqlite_path, with_connect_timeout
from cdc.config.names import TableName, TableRef


class SinkTable(BaseModel):
    """A table entry of a sink: its target name and the columns it keeps (a subscription)."""

    model_config = MODEL_CONFIG

    name: str | None = None  # target table; default: the source table's bare name
    columns: list[str] | None = Field(None, min_length=1)  # kept columns (key columns always); None: all

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("target table name must not be empty")
        return v


def _table_entry(value: Any) -> Any:
    # The plain `source: target` rename form stays: a string is the target name.
    return {"name": value} if isinstance(value, str) else value


class SinkConfig(BaseModel):
    """One downstream database that applies the change stream."""

    model_config = MODEL_CONFIG

    name: str  # the key under `sinks:`; set by the loader, not written in YAML
    url: str = Field(repr=False)  # may hold a password: never in a printed model
    # Subscription: the source tables this sink applies (None: every table of the pipeline).
    only: list[TableName] | None = Field(None, min_length=1)
    # source table -> target table name (`source: target`), or {name, columns}. The target is a
    # literal name (no SQL quoting, no schema). Tables not listed keep their bare name, all columns.
    tables: Annotated[
        dict[TableName, Annotated[SinkTable, BeforeValidator(_table_entry)]], BeforeValidator(none_to_empty_dict)
    ] = {}
    # Events per target transaction at most: large enough that a backlog is applied in few, big
    # statements (a commit and a round of statements per batch is what a backlog of small ones costs).
    batch_size: Int = Field(5000, ge=1)
    # `transactional`: apply whole source transactions, holding events until every event of their
    # transaction is read (the connector's transactions topic says how many), so the target never
    # shows half of one. `per_partition`: each topic partition on its own, as soon as it arrives.
    # Default (None): transactional for a sink of several tables, per_partition for one table.
    apply: Literal["transactional", "per_partition"] | None = None
    # transactional: events held at most; past it the oldest source transaction is applied in pieces
    max_transaction_events: Int = Field(100_000, ge=1)
    # A column the source drops: `keep` it in the target (rows written from then on hold NULL in
    # it), or `drop` it from the target too. See README, Schema evolution.
    on_column_drop: Literal["keep", "drop"] = "keep"
    # libpq's connect_timeout for PostgreSQL targets, unless the URL sets its own.
    connect_timeout_s: Int = Field(DEFAULT_CONNECT_TIMEOUT_S, ge=1)
    retry: RetryConfig = RetryConfig()  # the target unreachable, restarting, or a deadlock while the sink runs
    # A change the target rejects for a reason in its data: `halt` the sink (exit 1), or `dlq`: write
    # it to the topic `{pipeline}.{sink}.dlq` and hold back its key's later changes. README: Dead letters.
    on_error: Literal["halt", "dlq"] = "halt"

    _base_dir: Path | None = PrivateAttr(default=None)  # YAML directory, for relative sqlite paths

    @field_validator("url")
    @classmethod
    def _supported_url(cls, v: str) -> str:
        problem = sink_url_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @property
    def dialect(self) -> Literal["sqlite", "postgres"]:
        return "sqlite" if self.url.startswith(SQLITE_PREFIX) else "postgres"

    @property
    def connect_url(self) -> str:
        """The URL to connect with: ``url`` plus the connect timeout for PostgreSQL targets."""
        if self.dialect == "sqlite":
            return self.url
        return with_connect_timeout(self.url, self.connect_timeout_s)

    @property
    def sqlite_path(self) -> Path | None:
        """Database file for a sqlite sink (relative URLs resolved against the YAML's directory)."""
        return sqlite_path(self.url, self._base_dir)

    def target_table(self, table: TableRef) -> str:
        """Target table name for a source table: the rename, else the bare table name."""
        entry = self.tables.get(table)
        return entry.name if entry is not None and entry.name else table.name

    def subscribes(self, table: TableRef) -> bool:
        return self.only is None or table in self.only

    def kept_columns(self, table: TableRef) -> frozenset[str] | None:
        """The columns this sink keeps of a table (key columns are added by the sink), None: all."""
        entry = self.tables.get(table)
        return frozenset(entry.columns) if entry is not None and entry.columns else None
