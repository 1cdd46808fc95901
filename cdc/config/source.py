"""`source:`: the PostgreSQL database and tables a pipeline captures (pydantic model)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from cdc.config.common import DEFAULT_CONNECT_TIMEOUT_S, LOADER, MODEL_CONFIG, Float, Int, RetryConfig
from cdc.config.connections import postgres_dsn_problem, with_connect_timeout
from cdc.config.names import TableName, TableRef, check_slot_like
from cdc.config.rules import duplicate_tables


class SourceConfig(BaseModel):
    """The PostgreSQL database and tables to capture."""

    model_config = MODEL_CONFIG

    # libpq URL or key=value string; parsed at load time. repr=False: never in a printed model.
    postgres: str = Field(repr=False)
    tables: list[TableName] = Field(min_length=1)
    # Defaults (cdc_<pipeline>) are filled in by PipelineConfig / the loader; they need the pipeline name.
    slot: str
    # Restricted like a slot name (PostgreSQL itself allows more) so it is safe unquoted in SQL and in
    # pgoutput's publication_names option.
    publication: str
    status_interval_s: Float = Field(10.0, gt=0)
    retry: RetryConfig = RetryConfig()  # the source lost or refusing connections while cdc runs
    # libpq's connect_timeout (whole seconds; libpq waits at least 2), unless the DSN sets its own.
    connect_timeout_s: Int = Field(DEFAULT_CONNECT_TIMEOUT_S, ge=1)
    # Existing rows: `initial` publishes every row a table holds before its changes (op "r"), once.
    snapshot: Literal["initial", "never"] = "initial"
    snapshot_chunk_size: Int = Field(5000, ge=1)  # rows per chunk: bounds memory and each SELECT
    snapshot_parallelism: Int = Field(2, ge=1)  # tables read at the same time

    @field_validator("postgres")
    @classmethod
    def _parsable_dsn(cls, v: str) -> str:
        problem = postgres_dsn_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @property
    def conninfo(self) -> str:
        """The DSN to connect with: ``postgres`` plus the connect timeout unless it sets its own."""
        return with_connect_timeout(self.postgres, self.connect_timeout_s)

    @field_validator("slot")
    @classmethod
    def _slot_name(cls, v: str) -> str:
        return check_slot_like(v, "slot name")

    @field_validator("publication")
    @classmethod
    def _publication_name(cls, v: str) -> str:
        return check_slot_like(v, "publication name")

    @field_validator("tables")
    @classmethod
    def _unique_tables(cls, v: list[TableRef], info: ValidationInfo) -> list[TableRef]:
        if not (info.context or {}).get(LOADER):  # the loader reports this with the duplicate's line
            problems = duplicate_tables(v)
            if problems:
                raise ValueError("; ".join(msg for _, msg in problems))
        return v
