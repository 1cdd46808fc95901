"""Names derived from or checked in a pipeline: table references, slot/publication and topic names."""

from __future__ import annotations

import re
import string
from typing import Annotated, Any, NamedTuple

import sqlglot
from pydantic import BeforeValidator
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from cdc.sqlnames import ascii_lower, quote_ident

DEFAULT_TOPIC = "{pipeline}.{schema}.{table}"
TOPIC_PLACEHOLDERS = ("pipeline", "schema", "table")
KAFKA_TOPIC_MAX = 249  # Kafka's limit on topic name length
PG_NAME_MAX_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL silently truncates longer identifiers
SLOT_NAME_RE = re.compile(r"^[a-z0-9_]{1,63}$")  # PostgreSQL's rule for replication slot names
PIPELINE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
SINK_NAME_RE = PIPELINE_NAME_RE
_KAFKA_ILLEGAL = re.compile(r"[^A-Za-z0-9._-]")

# PostgreSQL reserved keywords (RESERVED and TYPE_FUNC_NAME categories): these cannot be written as an
# unquoted table name, so __str__ quotes them.
_PG_RESERVED = frozenset(
    """
    all analyse analyze and any array as asc asymmetric authorization binary both case cast check
    collate collation column concurrently constraint create cross current_catalog current_date
    current_role current_schema current_time current_timestamp current_user default deferrable desc
    distinct do else end except false fetch for foreign freeze from full grant group having ilike in
    initially inner intersect into is isnull join lateral leading left like limit localtime
    localtimestamp natural not notnull null offset on only or order outer overlaps placing primary
    references returning right select session_user similar some symmetric system_user table
    tablesample then to trailing true union unique user using variadic verbose when where window with
    """.split()
)
# What PostgreSQL accepts unquoted: a letter or _, then letters, digits, _ or $.
_PG_UNQUOTED_RE = re.compile(r"[^\W\d][\w$]*")
# What may be printed unquoted and read back unchanged (PostgreSQL folds unquoted names to lower case).
_PG_PLAIN_RE = re.compile(r"[a-z_][a-z0-9_$]*")
_TABLE_HINT = 'write schema.table; quote names with spaces, capitals or symbols: public."Order Items"'


def _sql_ident(ident: str) -> str:
    """Quote an identifier only when PostgreSQL would otherwise read it differently."""
    if _PG_PLAIN_RE.fullmatch(ident) and ident not in _PG_RESERVED:
        return ident
    return quote_ident(ident)


class TableRef(NamedTuple):
    """A PostgreSQL table as (schema, name), both exactly as stored in the catalog (already folded).

    ``str(ref)`` is the short SQL form for messages and YAML (``public."Order Items"``);
    ``ref.quoted()`` always quotes, for building SQL.
    """

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{_sql_ident(self.schema)}.{_sql_ident(self.name)}"

    def quoted(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @classmethod
    def parse(cls, text: str) -> TableRef:
        """Parse ``[schema.]table`` with PostgreSQL identifier rules; raise ValueError if invalid.

        Unquoted parts fold to lower case, double-quoted parts are kept exactly (``""`` is a quote),
        and a bare name is in schema ``public``.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"table name must be a non-empty string; {_TABLE_HINT}")
        try:
            tokens = sqlglot.tokenize(text, read="postgres")
        except TokenError:
            raise ValueError(f"invalid table name {text!r}: unterminated quoted identifier") from None
        # The parser would silently drop comments and a trailing ';' ("a--b" parses as "a").
        if any(tok.comments for tok in tokens) or any(tok.token_type == TokenType.SEMICOLON for tok in tokens):
            raise ValueError(f"invalid table name {text!r}: {_TABLE_HINT}")
        try:
            table = sqlglot.parse_one(text, into=exp.Table, dialect="postgres")
        except (ParseError, TokenError):
            raise ValueError(f"invalid table name {text!r}: {_TABLE_HINT}") from None
        parts = table.parts
        if not isinstance(table, exp.Table) or not all(isinstance(p, exp.Identifier) for p in parts):
            raise ValueError(f"invalid table name {text!r}: {_TABLE_HINT}")
        if len(parts) > 2:
            raise ValueError(
                f"invalid table name {text!r}: write schema.table (the database comes from source.postgres)"
            )
        names: list[str] = []
        for part in parts:
            ident = part.this
            if part.quoted:
                if ident == "":
                    raise ValueError(f"invalid table name {text!r}: zero-length quoted identifier")
            else:
                if not _PG_UNQUOTED_RE.fullmatch(ident):
                    raise ValueError(f"invalid table name {text!r}: {_TABLE_HINT}")
                ident = ascii_lower(ident)
            if len(ident.encode()) > PG_NAME_MAX_BYTES:
                raise ValueError(
                    f"invalid table name {text!r}: {ident!r} is longer than {PG_NAME_MAX_BYTES} bytes "
                    "(PostgreSQL would truncate it)"
                )
            names.append(ident)
        if len(names) == 1:
            names.insert(0, "public")
        return cls(names[0], names[1])


def parse_or_none(raw: Any) -> TableRef | None:
    try:
        return TableRef.parse(raw)
    except ValueError:
        return None


def _to_table_ref(value: Any) -> Any:
    if isinstance(value, str):
        return TableRef.parse(value)
    if isinstance(value, tuple):  # TableRef or (schema, name) from code
        return value
    raise ValueError(f"table name must be a string; {_TABLE_HINT}")


TableName = Annotated[TableRef, BeforeValidator(_to_table_ref)]


def default_object_name(pipeline: str) -> str:
    """Default replication slot / publication name: ``cdc_<pipeline>`` made legal for a slot."""
    return "cdc_" + re.sub(r"[^a-z0-9_]", "_", pipeline.lower())


def check_slot_like(value: str, what: str) -> str:
    if not SLOT_NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 characters of lower-case letters, digits and _ "
            "(PostgreSQL's rule for slot names)"
        )
    return value


def kafka_topic_name(text: str) -> str:
    """Make ``text`` a legal Kafka topic name: illegal characters become ``_``, cut to 249 chars."""
    return _KAFKA_ILLEGAL.sub("_", text)[:KAFKA_TOPIC_MAX]


def topic_for(template: str, pipeline: str, table: TableRef) -> str:
    """Kafka topic of a table: the template filled in, then made legal for Kafka."""
    return kafka_topic_name(template.format(pipeline=pipeline, schema=table.schema, table=table.name))


def check_topic_template(template: str) -> str:
    if not template:
        raise ValueError("topic template must not be empty")
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"invalid topic template {template!r}: {e} (write {{{{ or }}}} for a literal brace)") from None
    allowed = ", ".join("{" + p + "}" for p in TOPIC_PLACEHOLDERS)
    for _literal, field, spec, conversion in fields:
        if field is None:
            continue
        if field not in TOPIC_PLACEHOLDERS or spec or conversion:
            raise ValueError(f"unknown placeholder {{{field}}} in topic template {template!r}; allowed: {allowed}")
    return template
