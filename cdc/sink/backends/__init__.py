"""SQL dialects of sink targets: DDL, upserts and value converters, without any connection.

See :mod:`cdc.sink.dialects.postgres` and :mod:`cdc.sink.dialects.sqlite` for the type mappings.
"""

from cdc.sink.dialects.base import POSITIONS_TABLE, Dialect, TablePlan
from cdc.sink.dialects.postgres import PostgresDialect
from cdc.sink.dialects.sqlite import SqliteDialect

__all__ = ["POSITIONS_TABLE", "Dialect", "TablePlan", "PostgresDialect", "SqliteDialect"]
