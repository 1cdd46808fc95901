"""Type information of every event: the published schema its ``cdc.schema_id`` header names (on
``{pipeline}.schemas``, see cdc.events.schema_ids); connectors before schema ids sent it whole, as the
header ``cdc.schema``.

It lets a sink create a target table with matching column types without ever asking the source.
The connector builds one :class:`TableSchema` per relation version and encodes it once; sinks decode
it once per distinct schema.

Each column has a portable ``kind`` (one of :data:`KINDS`) that fixes how its values are written in
event JSON, and the PostgreSQL ``type`` as ``format_type()`` prints it, for PostgreSQL sinks.

Value forms in event JSON, by kind (arrays are JSON lists, nested per dimension, elements as below;
an array's lower bounds, as in ``[0:1]={1,2}``, are not carried):

========================  =========================================================================
boolean                   true / false
smallint, integer         number
bigint                    number when |v| <= 2**53, else a string of the decimal digits (also oid)
numeric                   string, exactly as PostgreSQL prints it ("0.00000001", "0.00000000",
                          "NaN", "Infinity", "-Infinity")
real, double              number; "NaN", "Infinity", "-Infinity" as strings
text                      string as PostgreSQL prints it: text, varchar, char, name, and every type
                          without a kind of its own (money, xml, inet, cidr, macaddr, macaddr8,
                          bit, varbit, tsvector, tsquery, geometric types, ranges, multiranges,
                          enums, composites, int2vector, oidvector, extension types)
bytea                     base64 string
date                      "2026-11-26" ("infinity", "-infinity", BC dates as PostgreSQL prints them)
time / timetz             "20:19:10.994151" / "20:19:10.994151+02:00"
timestamp / timestamptz   "2026-11-26T20:19:10.994151" / "2026-11-26T20:19:10.994151Z" (always UTC);
                          infinity, BC and years past 9999 as PostgreSQL prints them, per element
interval                  ISO-8601 duration as PostgreSQL prints it: "P1Y2M3DT4H5M6.5S"
uuid                      string
json / jsonb              the JSON value itself, embedded as PostgreSQL sent it: json byte for byte,
                          jsonb as PostgreSQL prints it (cdc.events.codec reads it back as text)
========================  =========================================================================

A column's ``attnum`` is its identity: PostgreSQL's column number (``pg_attribute.attnum``), the same
across ``RENAME COLUMN`` and ``ALTER ... TYPE``, new for a column dropped and added again. A sink
tells a renamed column (same attnum, new name) from a dropped and added one by it. Headers of
connectors older than this field decode with ``attnum`` None.

A column's ``default`` is the value, in its kind's form above, that rows older than the column hold
(``ALTER TABLE ... ADD COLUMN ... DEFAULT x`` with a non-volatile default); ``null`` otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from cdc.events.exact_json import loads

KINDS = frozenset(
    {
        "boolean", "smallint", "integer", "bigint", "numeric", "real", "double", "text", "bytea",
        "date", "time", "timetz", "timestamp", "timestamptz", "interval", "uuid", "json", "jsonb",
    }
)

HEADER = "cdc.schema"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # PostgreSQL type as format_type() prints it: "numeric(30,10)", "text[]", "timestamp with time zone"
    kind: str  # one of KINDS; for arrays, the kind of the elements
    array: bool = False
    nullable: bool = True
    builtin: bool = True  # a type every PostgreSQL has: a PostgreSQL sink may reuse `type` verbatim
    # Value (JSON form) of rows older than the column: a sink adds the column with it. None: no default.
    # Not hashed (a list is not hashable); still compared, so a changed default is a new schema.
    default: Any = field(default=None, hash=False)
    # PostgreSQL's pg_attribute.attnum: the same across RENAME COLUMN and ALTER TYPE, new for a column
    # dropped and re-added. None in headers of older connectors.
    attnum: int | None = None


@dataclass(frozen=True, slots=True)
class TableSchema:
    schema: str
    table: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # primary key column names, in key order

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "schema": self.schema,
                "table": self.table,
                "key": list(self.key),
                "columns": [
                    {"name": c.name, "type": c.type, "kind": c.kind, "array": c.array,
                     "nullable": c.nullable, "builtin": c.builtin,
                     **({"default": c.default} if c.default is not None else {}),
                     **({"attnum": c.attnum} if c.attnum is not None else {})}
                    for c in self.columns
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> "TableSchema":
        obj = loads(data)  # exact numbers, as for event values: a json default keeps every digit
        columns = tuple(
            Column(
                name=c["name"], type=c["type"], kind=c["kind"] if c["kind"] in KINDS else "text",
                array=bool(c.get("array", False)), nullable=bool(c.get("nullable", True)),
                builtin=bool(c.get("builtin", True)), default=c.get("default"),
                attnum=int(c["attnum"]) if c.get("attnum") is not None else None,
            )
            for c in obj["columns"]
        )
        return cls(schema=obj["schema"], table=obj["table"], columns=columns, key=tuple(obj["key"]))


# Integer types and how many decimal digits their values can have (for integer -> numeric(p,s)).
_INTEGER_DIGITS = {"smallint": 5, "integer": 10, "bigint": 19}
_NUMERIC = re.compile(r"numeric(?:\((\d+)(?:,(\d+))?\))?")
_VARCHAR = re.compile(r"character varying(?:\((\d+)\))?")


def keeps_values(old: str, new: str) -> bool:
    """Whether every value of PostgreSQL type ``old`` is a value of ``new``, unchanged (format_type forms).

    Also the connector's test of an ALTER COLUMN ... TYPE: such a change is taken to leave every
    value as it was (an ``ALTER TYPE ... USING`` that changes values of a widening is not seen);
    any other type change rewrote the column in the source, and the connector re-reads the table
    so that the sinks rewrite it from the source's values (see README, Schema evolution)."""
    if old == new:
        return True
    if old.endswith("[]") or new.endswith("[]"):
        return old.endswith("[]") and new.endswith("[]") and keeps_values(old[:-2], new[:-2])
    if new == "text" or new == "character varying":
        return True  # every value has a text form, and that is what the source now sends
    if old in _INTEGER_DIGITS:
        if new in _INTEGER_DIGITS:
            return _INTEGER_DIGITS[new] >= _INTEGER_DIGITS[old]
        numeric = _NUMERIC.fullmatch(new)
        if numeric:
            precision, scale = int(numeric[1] or 1000), int(numeric[2] or 0)
            return precision - scale >= _INTEGER_DIGITS[old]
        return False
    old_numeric, new_numeric = _NUMERIC.fullmatch(old), _NUMERIC.fullmatch(new)
    if old_numeric and new_numeric:
        if new_numeric[1] is None:
            return True  # unconstrained numeric holds any numeric
        if old_numeric[1] is None:
            return False
        old_p, old_s = int(old_numeric[1]), int(old_numeric[2] or 0)
        new_p, new_s = int(new_numeric[1]), int(new_numeric[2] or 0)
        return new_s >= old_s and new_p - new_s >= old_p - old_s
    old_varchar, new_varchar = _VARCHAR.fullmatch(old), _VARCHAR.fullmatch(new)
    if old_varchar and new_varchar and new_varchar[1] is not None:
        return old_varchar[1] is not None and int(new_varchar[1]) >= int(old_varchar[1])
    return old == "real" and new == "double precision"
