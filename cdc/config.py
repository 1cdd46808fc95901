"""Pipeline configuration: load a pipeline YAML (version 1), validate it, and keep YAML line numbers.

Every problem a user can make in the file is reported as ``FILE:LINE: message`` and all of them are
collected into one :class:`~cdc.errors.ConfigError`, so a user fixes the file in one pass instead of
one error per run. To get lines, the YAML is *composed* (node tree with marks) rather than loaded, and
turned into plain Python data plus a map ``data path -> line``. Pydantic then validates the plain data
and its error locations are translated back to lines through that map.

Rules that span sections (sink renames must name source tables, topics must not collide, ...) are
checked after pydantic, on whatever sections validated, so they are reported alongside field errors.

``${VAR}`` / ``${VAR:-default}`` are expanded from the environment *after* parsing, inside string
scalars only: a value is never pasted into YAML text, so a password with ``: #`` stays a string.

Entry points: :func:`load_pipeline` (a file) and :func:`load_pipeline_text` (tests).
"""

from __future__ import annotations

import difflib
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import sqlglot
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

from cdc.errors import ConfigError

__all__ = [
    "DEFAULT_TOPIC",
    "KafkaConfig",
    "PipelineConfig",
    "SinkConfig",
    "SourceConfig",
    "TableRef",
    "default_object_name",
    "kafka_topic_name",
    "load_pipeline",
    "load_pipeline_text",
    "sqlite_path",
]

DataPath = tuple[Any, ...]  # keys (str, or whatever YAML gave) and list indexes, from the document root

DEFAULT_TOPIC = "{pipeline}.{schema}.{table}"
TOPIC_PLACEHOLDERS = ("pipeline", "schema", "table")
KAFKA_TOPIC_MAX = 249  # Kafka's limit on topic name length
PG_NAME_MAX_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL silently truncates longer identifiers
SLOT_NAME_RE = re.compile(r"^[a-z0-9_]{1,63}$")  # PostgreSQL's rule for replication slot names
PIPELINE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
SINK_NAME_RE = PIPELINE_NAME_RE
SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
_KAFKA_ILLEGAL = re.compile(r"[^A-Za-z0-9._-]")

# Loader context flag: rules that need YAML lines to report well are skipped inside pydantic and
# run by the loader instead (see _cross_check). Direct construction in code still runs them.
_LOADER = "cdc_config_loader"


# --------------------------------------------------------------------------------------------------
# Table names
# --------------------------------------------------------------------------------------------------

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
# PostgreSQL folds only ASCII letters when the database encoding is UTF-8; str.lower() would do more.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_TABLE_HINT = 'write schema.table; quote names with spaces, capitals or symbols: public."Order Items"'


def _quote_ident(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


def _sql_ident(ident: str) -> str:
    """Quote an identifier only when PostgreSQL would otherwise read it differently."""
    if _PG_PLAIN_RE.fullmatch(ident) and ident not in _PG_RESERVED:
        return ident
    return _quote_ident(ident)


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
        return f"{_quote_ident(self.schema)}.{_quote_ident(self.name)}"

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
                ident = ident.translate(_ASCII_LOWER)
            if len(ident.encode()) > PG_NAME_MAX_BYTES:
                raise ValueError(
                    f"invalid table name {text!r}: {ident!r} is longer than {PG_NAME_MAX_BYTES} bytes "
                    "(PostgreSQL would truncate it)"
                )
            names.append(ident)
        if len(names) == 1:
            names.insert(0, "public")
        return cls(names[0], names[1])


def _to_table_ref(value: Any) -> Any:
    if isinstance(value, str):
        return TableRef.parse(value)
    if isinstance(value, tuple):  # TableRef or (schema, name) from code
        return value
    raise ValueError(f"table name must be a string; {_TABLE_HINT}")


TableName = Annotated[TableRef, BeforeValidator(_to_table_ref)]


# --------------------------------------------------------------------------------------------------
# Small helpers shared by models and loader
# --------------------------------------------------------------------------------------------------


def _no_bool(value: Any) -> Any:
    # Pydantic's lax mode turns `true` into 1; a YAML boolean in a number field is a user mistake.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


def _none_to_empty_dict(value: Any) -> Any:
    # `sinks:` with every entry commented out is YAML null; treat it as "none".
    return {} if value is None else value


def default_object_name(pipeline: str) -> str:
    """Default replication slot / publication name: ``cdc_<pipeline>`` made legal for a slot."""
    return "cdc_" + re.sub(r"[^a-z0-9_]", "_", pipeline.lower())


def kafka_topic_name(text: str) -> str:
    """Make ``text`` a legal Kafka topic name: illegal characters become ``_``, cut to 249 chars."""
    return _KAFKA_ILLEGAL.sub("_", text)[:KAFKA_TOPIC_MAX]


def sqlite_path(url: str, base_dir: str | Path | None = None) -> Path | None:
    """File of a ``sqlite:///`` URL, or None for other URLs.

    ``sqlite:///rel.db`` is relative to ``base_dir`` (the YAML file's directory, so a pipeline works
    from any working directory); ``sqlite:////abs/path.db`` is absolute.
    """
    if not url.startswith(SQLITE_PREFIX):
        return None
    rest = url[len(SQLITE_PREFIX) :]
    path = Path(rest)
    if path.is_absolute():
        return path
    return Path(base_dir if base_dir is not None else Path.cwd()).absolute() / path


def _check_slot_like(value: str, what: str) -> str:
    if not SLOT_NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 characters of lower-case letters, digits and _ "
            "(PostgreSQL's rule for slot names)"
        )
    return value


def _check_topic_template(template: str) -> str:
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


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(BaseModel):
    """The PostgreSQL database and tables to capture."""

    model_config = _MODEL_CONFIG

    postgres: str  # libpq DSN / URL, passed to psycopg as is
    tables: list[TableName] = Field(min_length=1)
    # Defaults (cdc_<pipeline>) are filled in by PipelineConfig / the loader; they need the pipeline name.
    slot: str
    # Restricted like a slot name (PostgreSQL itself allows more) so it is safe unquoted in SQL and in
    # pgoutput's publication_names option.
    publication: str
    status_interval_s: Float = Field(10.0, gt=0)

    @field_validator("postgres")
    @classmethod
    def _dsn_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("connection string must not be empty")
        return v

    @field_validator("slot")
    @classmethod
    def _slot_name(cls, v: str) -> str:
        return _check_slot_like(v, "slot name")

    @field_validator("publication")
    @classmethod
    def _publication_name(cls, v: str) -> str:
        return _check_slot_like(v, "publication name")

    @field_validator("tables")
    @classmethod
    def _unique_tables(cls, v: list[TableRef], info: ValidationInfo) -> list[TableRef]:
        if not (info.context or {}).get(_LOADER):  # the loader reports this with the duplicate's line
            problems = _duplicate_tables(v)
            if problems:
                raise ValueError("; ".join(msg for _, msg in problems))
        return v


class KafkaConfig(BaseModel):
    """The Kafka cluster and how tables map to topics."""

    model_config = _MODEL_CONFIG

    bootstrap_servers: str
    topic: str = DEFAULT_TOPIC
    partitions: Int = Field(1, ge=1)
    replication_factor: Int = Field(1, ge=1)
    linger_ms: Int = Field(5, ge=0)
    max_batch_bytes: Int = Field(1048576, ge=1)
    # An idempotent producer never lets a later batch land before an earlier one that failed; a
    # broker without idempotent producers (some Kafka protocol brokers) needs `idempotence: false`.
    idempotence: bool = True

    @field_validator("partitions")
    @classmethod
    def _one_partition(cls, v: int) -> int:
        # A truncate must be ordered against every row change of its table; across partitions it
        # is not (yet), so one partition per table topic.
        if v != 1:
            raise ValueError("only 1 partition per table topic is supported for now (truncates must stay in order with row changes)")
        return v

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("bootstrap_servers must not be empty (host:port[,host:port...])")
        return v

    @field_validator("topic")
    @classmethod
    def _topic_template(cls, v: str) -> str:
        return _check_topic_template(v)


class SinkConfig(BaseModel):
    """One downstream database that applies the change stream."""

    model_config = _MODEL_CONFIG

    name: str  # the key under `sinks:`; set by the loader, not written in YAML
    url: str
    # source table -> target table name. The target is a literal name (no SQL quoting, no schema).
    # Source tables not listed here keep their bare table name.
    tables: Annotated[dict[TableName, str], BeforeValidator(_none_to_empty_dict)] = {}
    batch_size: Int = Field(1000, ge=1)

    _base_dir: Path | None = PrivateAttr(default=None)  # YAML directory, for relative sqlite paths

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str) -> str:
        if v.startswith(SQLITE_PREFIX):
            if not v[len(SQLITE_PREFIX) :]:
                raise ValueError("sqlite URL needs a file: sqlite:///relative.db or sqlite:////absolute/path.db")
            return v
        if v.startswith(POSTGRES_PREFIXES):
            return v
        raise ValueError(
            f"unsupported sink URL {v!r}: supported schemes are sqlite:/// (sqlite:///relative.db, "
            "sqlite:////absolute/path.db), postgresql:// and postgres://"
        )

    @field_validator("tables")
    @classmethod
    def _target_names(cls, v: dict[TableRef, str]) -> dict[TableRef, str]:
        for table, target in v.items():
            if not target.strip():
                raise ValueError(f"target table name for {table} must not be empty")
        return v

    @property
    def dialect(self) -> Literal["sqlite", "postgres"]:
        return "sqlite" if self.url.startswith(SQLITE_PREFIX) else "postgres"

    @property
    def sqlite_path(self) -> Path | None:
        """Database file for a sqlite sink (relative URLs resolved against the YAML's directory)."""
        return sqlite_path(self.url, self._base_dir)

    def target_table(self, table: TableRef) -> str:
        """Target table name for a source table: the rename, else the bare table name."""
        return self.tables.get(table, table.name)


def _check_sink_name(name: str) -> str:
    if not SINK_NAME_RE.match(name):
        raise ValueError(f"sink name {name!r} may only contain letters, digits, '.', '_' and '-'")
    return name


# Checked as the `sinks:` key (not SinkConfig.name) so the error points at the key's line.
SinkName = Annotated[str, AfterValidator(_check_sink_name)]


class PipelineConfig(BaseModel):
    """A whole pipeline file. Build it with :func:`load_pipeline`, which also records YAML lines."""

    model_config = _MODEL_CONFIG

    version: Literal[1] = 1
    pipeline: str
    source: SourceConfig
    kafka: KafkaConfig
    sinks: Annotated[dict[SinkName, SinkConfig], BeforeValidator(_none_to_empty_dict)] = {}  # zero is fine
    path: Path  # absolute path of the YAML file; set by the loader, not written in YAML

    _display_name: str | None = PrivateAttr(default=None)  # file name as the user gave it, for messages
    _lines: dict[DataPath, int] = PrivateAttr(default_factory=dict)
    _key_lines: dict[DataPath, int] = PrivateAttr(default_factory=dict)
    _table_paths: dict[tuple[str | None, TableRef], DataPath] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = _fill_defaults(data)
        return data

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if type(v) is not int or v != 1:  # `true` == 1 in Python; reject it and "1"
            raise ValueError(f"unsupported version {v!r}: this cdc reads version 1")
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline_name(cls, v: str) -> str:
        if not PIPELINE_NAME_RE.match(v):
            raise ValueError(f"pipeline name {v!r} must be non-empty: letters, digits, '.', '_' and '-'")
        return v

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.absolute()

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> PipelineConfig:
        for sink in self.sinks.values():
            sink._base_dir = self.path.parent
        if not (info.context or {}).get(_LOADER):  # the loader reports these with lines
            problems = _cross_check(self.pipeline, list(self.source.tables), self.kafka, self.sinks)
            if problems:
                raise ValueError("; ".join(msg for _, msg in problems))
        return self

    # ---- derived names ---------------------------------------------------------------------------

    def topic_for(self, table: TableRef) -> str:
        """Kafka topic of a source table: the template filled in, then made legal for Kafka."""
        return _topic(self.kafka.topic, self.pipeline, table)

    def target_table(self, sink: str, table: TableRef) -> str:
        """Table name in sink ``sink`` for a source table: its rename or the bare table name."""
        return self.sinks[sink].target_table(table)

    def sqlite_path(self, sink: str) -> Path | None:
        """Database file of a sqlite sink, None for other sinks."""
        return self.sinks[sink].sqlite_path

    # ---- locations, for errors found later (e.g. a table missing in the database) ----------------

    @property
    def display_name(self) -> str:
        return self._display_name or str(self.path)

    def line_of(self, *path: Any) -> int | None:
        """1-based YAML line of a data path (closest existing ancestor), None if built without YAML."""
        if len(path) == 1 and isinstance(path[0], tuple):
            path = path[0]
        return _Lines(self._lines, self._key_lines).locate(tuple(path), key=True)

    def where(self, *path: Any) -> str:
        """``"FILE:LINE"`` for a data path, e.g. ``cfg.where("source", "tables", 2)``.

        A path that is not in the file (a defaulted key) falls back to its closest ancestor. Without
        line information (config built in code) this is just the file name.
        """
        line = self.line_of(*path)
        return self.display_name if line is None else f"{self.display_name}:{line}"

    def table_location(self, table: TableRef, sink: str | None = None) -> str:
        """``"FILE:LINE"`` of a table's entry in source.tables (or its rename in sink ``sink``)."""
        path = self._table_paths.get((sink, table)) if sink is not None else None
        path = path or self._table_paths.get((None, table)) or ("source", "tables")
        return self.where(*path)


# --------------------------------------------------------------------------------------------------
# Rules spanning fields / sections
# --------------------------------------------------------------------------------------------------


def _fill_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Default source.slot / source.publication to cdc_<pipeline> (copies, never mutates ``data``)."""
    source, name = data.get("source"), data.get("pipeline")
    if isinstance(source, dict) and isinstance(name, str) and name:
        source = dict(source)
        source.setdefault("slot", default_object_name(name))
        source.setdefault("publication", default_object_name(name))
        data = {**data, "source": source}
    return data


def _topic(template: str, pipeline: str, table: TableRef) -> str:
    return kafka_topic_name(template.format(pipeline=pipeline, schema=table.schema, table=table.name))


# A problem found by a cross-section rule: (abstract location, "dotted.path: message").
# Locations use TableRef keys for sink renames; the loader maps them to YAML keys.
_Problem = tuple[DataPath, str]


def _duplicate_tables(tables: list[TableRef | None]) -> list[_Problem]:
    seen: dict[TableRef, int] = {}
    problems: list[_Problem] = []
    for i, table in enumerate(tables):
        if table is None:
            continue
        if table in seen:
            problems.append(
                (
                    ("source", "tables", i),
                    f"source.tables[{i}]: duplicate table {table} (same as source.tables[{seen[table]}])",
                )
            )
        else:
            seen[table] = i
    return problems


def _cross_check(
    pipeline: str | None,
    tables: list[TableRef | None],
    kafka: KafkaConfig | None,
    sinks: Mapping[str, SinkConfig],
) -> list[_Problem]:
    """Rules that need more than one section, on whatever validated (None: did not validate).

    ``tables`` is source.tables by index, None where an entry is invalid (already reported). With an
    invalid entry, "not in source.tables" is not reported: the user may have meant that entry.
    """
    problems = _duplicate_tables(tables)
    first_index: dict[TableRef, int] = {}
    for i, t in enumerate(tables):
        if t is not None:
            first_index.setdefault(t, i)
    source_tables = list(first_index)  # unique, in file order

    if pipeline is not None and kafka is not None:
        # Kafka refuses topics that differ only in '.' vs '_' (they share metric names): compare a
        # folded form too.
        by_topic: dict[str, TableRef] = {}
        by_folded: dict[str, tuple[str, TableRef]] = {}
        for table in source_tables:
            topic = _topic(kafka.topic, pipeline, table)
            where = ("source", "tables", first_index[table])
            folded = topic.replace(".", "_")
            if topic in (".", ".."):
                message = f"kafka.topic: topic name {topic!r} for {table} is not allowed by Kafka"
                problems.append((("kafka", "topic"), message))
            elif topic in by_topic:
                problems.append((where, f"kafka.topic: tables {by_topic[topic]} and {table} both map to topic {topic!r}"))
            elif folded in by_folded:
                other_topic, other = by_folded[folded]
                problems.append(
                    (
                        where,
                        f"kafka.topic: topic {topic!r} for {table} collides with {other_topic!r} for {other} "
                        "(Kafka treats '.' and '_' in topic names as the same)",
                    )
                )
            by_topic.setdefault(topic, table)
            by_folded.setdefault(folded, (topic, table))

    complete = None not in tables
    for name, sink in sinks.items():
        if complete:
            for table in sink.tables:
                if table not in first_index:
                    message = f"sinks.{name}.tables: unknown table {table}: not in source.tables"
                    problems.append((("sinks", name, "tables", table), message))
        # SQLite table names are case-insensitive even when quoted; PostgreSQL's quoted ones are not.
        fold = (lambda t: t.translate(_ASCII_LOWER)) if sink.dialect == "sqlite" else (lambda t: t)
        targets: dict[str, TableRef] = {}
        for table in source_tables:
            target = sink.target_table(table)
            first = targets.setdefault(fold(target), table)
            if first != table:
                renamed = table if table in sink.tables else first if first in sink.tables else None
                where = ("sinks", name, "tables", renamed) if renamed else ("sinks", name)
                problems.append(
                    (
                        where,
                        f"sinks.{name}.tables: tables {first} and {table} both map to target table {target!r}; "
                        f"rename one of them under sinks.{name}.tables",
                    )
                )
    return problems


# --------------------------------------------------------------------------------------------------
# YAML -> plain data + lines
# --------------------------------------------------------------------------------------------------


class _Lines:
    """Line lookup: ``values`` has the line of every node, ``keys`` the line of each mapping key."""

    def __init__(self, values: dict[DataPath, int], keys: dict[DataPath, int]):
        self.values, self.keys = values, keys

    def locate(self, path: DataPath, key: bool) -> int | None:
        """Line of ``path`` (its key line if ``key``), else the key line of the closest ancestor."""
        if key and path in self.keys:
            return self.keys[path]
        if path in self.values:
            return self.values[path]
        while path:
            path = path[:-1]
            if path in self.keys:
                return self.keys[path]
            if path in self.values:
                return self.values[path]
        return None


_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(path: DataPath) -> str:
    """``('sinks', 'replica', 'tables', 'public.x')`` -> ``sinks.replica.tables[public.x]``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _SIMPLE_KEY.fullmatch(part):
            out += ("." if out else "") + part
        else:
            out += f"[{part}]"
    return out or "(top level)"


_ENV_RE = re.compile(
    r"\$\$\{"  # $${ -> literal ${
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"  # ${NAME} / ${NAME:-default}
    r"|\$\{"  # anything else starting with ${ is a mistake
)


class _Reader:
    """Turns a composed YAML node tree into plain data, recording lines and collecting problems."""

    def __init__(self, filename: str, env: Mapping[str, str]):
        self.filename = filename
        self.env = env
        self.lines: dict[DataPath, int] = {}
        self.key_lines: dict[DataPath, int] = {}
        self.problems: list[tuple[int, str]] = []
        # Paths already reported here (unset ${VAR}, recursive alias): pydantic's knock-on errors for
        # them would be noise.
        self.reported: list[DataPath] = []
        self._constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self._active: set[int] = set()

    def problem(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    def read(self, text: str) -> Any:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            detail = e.problem or e.context or "syntax error"
            if e.context and e.problem and e.context_mark and e.context_mark.line + 1 != line:
                detail += f" ({e.context} at line {e.context_mark.line + 1})"
            raise ConfigError([f"{self.filename}:{line}: invalid YAML: {detail}"]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{self.filename}:1: invalid YAML: {e}"]) from None
        finally:
            loader.dispose()
        if node is None:
            raise ConfigError([f"{self.filename}:1: the file is empty; expected a mapping with {_TOP_KEYS}"])
        if not isinstance(node, yaml.MappingNode):
            line = node.start_mark.line + 1
            raise ConfigError([f"{self.filename}:{line}: top level must be a mapping with {_TOP_KEYS}, got {_kind(node)}"])
        return self.node(node, ())

    def node(self, node: yaml.Node, path: DataPath) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.ScalarNode):
            before = len(self.problems)
            value = self.scalar(node)
            if len(self.problems) > before:
                self.reported.append(path)
            return self.expand(value, path, line) if isinstance(value, str) else value
        if id(node) in self._active:  # `&a [*a]`: would recurse forever
            self.problem(line, f"{_dotted(path)}: recursive YAML alias")
            self.reported.append(path)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.node(item, path + (i,)) for i, item in enumerate(node.value)]
            return self.mapping(node, path)
        finally:
            self._active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: DataPath) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_line, f"{_dotted(path)}: mapping keys must be plain values, got {_kind(key_node)}")
                continue
            key = self.scalar(key_node)
            if key in result:
                first = self.key_lines[path + (key,)]
                self.problem(key_line, f"{_dotted(path + (key,))}: duplicate key {key!r} (first at line {first})")
                continue
            self.key_lines[path + (key,)] = key_line
            result[key] = self.node(value_node, path + (key,))
        # Merged keys come after explicit ones so that explicit keys win, as YAML specifies.
        for merge in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    self.problem(source.start_mark.line + 1, f"{_dotted(path)}: '<<' must merge a mapping")
                    continue
                merged = self.mapping(source, path)
                for key, value in merged.items():
                    result.setdefault(key, value)
        return result

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:  # e.g. an unknown !tag
            mark = getattr(e, "problem_mark", None) or node.start_mark
            self.problem(mark.line + 1, f"invalid YAML value: {getattr(e, 'problem', None) or e}")
        except Exception:  # PyYAML's constructors crash on some malformed tagged values (!!timestamp x)
            self.problem(node.start_mark.line + 1, f"invalid YAML value {node.value!r} for tag {node.tag}")
        return None

    def expand(self, value: str, path: DataPath, line: int) -> str:
        """Expand ``${VAR}``, ``${VAR:-default}`` (default if unset or empty) and ``$${`` in a string."""
        if "${" not in value:
            return value
        failed = False

        def replace(m: re.Match[str]) -> str:
            nonlocal failed
            if m.group(0) == "$${":
                return "${"
            name = m.group("name")
            if name is None:
                failed = True
                self.problem(
                    line,
                    f"{_dotted(path)}: malformed variable reference in {value!r}: use ${{NAME}} or "
                    "${NAME:-default}; write $${ for a literal ${",
                )
                return m.group(0)
            current = self.env.get(name)
            if m.group("default") is not None:
                return current if current else m.group("default")
            if current is None:
                failed = True
                self.problem(line, f"environment variable {name} is not set (used in {_dotted(path)})")
                return m.group(0)
            return current

        expanded = _ENV_RE.sub(replace, value)
        if failed:
            self.reported.append(path)
        return expanded


_TOP_KEYS = "pipeline:, source:, kafka:, sinks:"


def _kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(type(node), "a single value")


# --------------------------------------------------------------------------------------------------
# Pydantic errors -> "FILE:LINE: path: message"
# --------------------------------------------------------------------------------------------------


def _model_at(path: DataPath) -> type[BaseModel] | None:
    if path == ():
        return PipelineConfig
    if path == ("source",):
        return SourceConfig
    if path == ("kafka",):
        return KafkaConfig
    if len(path) == 2 and path[0] == "sinks":
        return SinkConfig
    return None


# Keys the loader sets itself; a user writing them gets "unknown key".
_INJECTED = {PipelineConfig: {"path"}, SinkConfig: {"name"}}


def _user_keys(model: type[BaseModel]) -> list[str]:
    return [k for k in model.model_fields if k not in _INJECTED.get(model, set())]


def _unknown_key_message(path: DataPath) -> str:
    model = _model_at(path[:-1])
    key = path[-1]
    if model is None:
        return "unknown key"
    allowed = _user_keys(model)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "allowed keys: " + ", ".join(allowed)
    return f"unknown key; {hint}"


def _format_pydantic(error: Any, lines: _Lines) -> tuple[int, str]:
    """One pydantic error as (line, "dotted.path: message"), choosing the line by error kind."""
    loc = tuple(error["loc"])
    kind = error["type"]
    is_key = bool(loc) and loc[-1] == "[key]"
    path = loc[:-1] if is_key else loc
    if kind == "extra_forbidden":
        line = lines.locate(path, key=True)
        where, message = _dotted(path), _unknown_key_message(path)
    elif kind == "missing":
        line = lines.locate(path[:-1], key=True)  # the mapping that lacks it
        where, message = _dotted(path), "required key is missing"
    else:
        line = lines.locate(path, key=is_key)
        where = _dotted(path)
        message = re.sub(r" or instance of \w+", "", error["msg"])  # pydantic internals, not YAML
        if kind in ("value_error", "assertion_error"):
            message = re.sub(r"^(Value|Assertion) error, ", "", message)
        else:
            value = error.get("input")
            if isinstance(value, (str, int, float, bool)) or value is None:
                message += f" (got {value!r})"
        if is_key:
            message = f"key {path[-1]!r}: {message}"
            where = _dotted(path[:-1])
    return (line or 1, f"{where}: {message}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_pipeline(path: str | Path, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Load and validate a pipeline YAML file. Raises ConfigError with every problem found."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read pipeline file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: pipeline file is not UTF-8: {e.reason}"]) from None
    return _load(text, str(path), Path(path).absolute(), env)


def load_pipeline_text(
    text: str,
    filename: str = "<string>",
    env: Mapping[str, str] | None = None,
    base_dir: str | Path | None = None,
) -> PipelineConfig:
    """Load from text. ``filename`` is what messages show; relative sqlite paths resolve against
    ``base_dir`` (default: the directory of ``filename``, relative to the working directory)."""
    if base_dir is None:
        file_path = Path(filename).absolute()
    else:
        file_path = Path(base_dir).absolute() / Path(filename).name
    return _load(text, filename, file_path, env)


def _load(text: str, filename: str, file_path: Path, env: Mapping[str, str] | None) -> PipelineConfig:
    reader = _Reader(filename, os.environ if env is None else env)
    data = reader.read(text)  # raises on syntax errors: nothing else can be checked then
    lines = _Lines(reader.lines, reader.key_lines)
    problems = list(reader.problems)

    # Keys the loader owns (path, sinks.*.name): a user writing them gets "unknown key"; then set them.
    if "path" in data:
        problems.append((lines.locate(("path",), key=True) or 1, f"path: {_unknown_key_message(('path',))}"))
    data["path"] = file_path
    if isinstance(data.get("sinks"), dict):
        sinks = {}
        for name, sink in data["sinks"].items():
            if isinstance(sink, dict):
                if "name" in sink:
                    at = ("sinks", name, "name")
                    problems.append((lines.locate(at, key=True) or 1, f"{_dotted(at)}: {_unknown_key_message(at)}"))
                sink = {**sink, "name": str(name)}  # a non-string key is reported once, as a key error
            sinks[name] = sink
        data["sinks"] = sinks
    data = _fill_defaults(data)

    context = {_LOADER: True}
    config: PipelineConfig | None = None
    failed_locs: list[DataPath] = []
    try:
        config = PipelineConfig.model_validate(data, context=context)
    except ValidationError as e:
        for error in e.errors(include_url=False):
            loc = tuple(error["loc"])
            failed_locs.append(loc)
            if any(loc[: len(p)] == p for p in reader.reported):
                continue
            problems.append(_format_pydantic(error, lines))

    # Cross-section rules run on every section that validated, so they are reported together with
    # field errors elsewhere in the file.
    def valid(section: DataPath) -> bool:
        bad = failed_locs + reader.reported
        return not any(loc[: len(section)] == section for loc in bad)

    table_paths = _table_paths(data)
    if config is not None:
        pipeline, tables, kafka, sinks = config.pipeline, list(config.source.tables), config.kafka, config.sinks
    else:
        pipeline = data.get("pipeline") if valid(("pipeline",)) else None
        # Table entries one by one, so one bad entry does not hide e.g. a topic collision of others.
        raw_tables = data.get("source", {}).get("tables") if isinstance(data.get("source"), dict) else None
        tables = [_parse_or_none(raw) for raw in raw_tables] if isinstance(raw_tables, list) else []
        kafka = _try(KafkaConfig, data.get("kafka"), context) if valid(("kafka",)) else None
        sinks = {}
        if isinstance(data.get("sinks"), dict):
            for name, raw in data["sinks"].items():
                sink = _try(SinkConfig, raw, context) if valid(("sinks", name)) else None
                if sink is not None:
                    sinks[name] = sink
    for where, message in _cross_check(pipeline, tables, kafka, sinks):
        if len(where) == 4 and where[0] == "sinks" and isinstance(where[3], TableRef):
            where = table_paths.get((where[1], where[3]), where[:3])
        problems.append((lines.locate(where, key=True) or 1, message))

    if problems:
        problems.sort(key=lambda p: p[0])  # stable: same-line problems keep discovery order
        raise ConfigError([f"{filename}:{line}: {message}" for line, message in problems])

    assert config is not None
    config._display_name = filename
    config._lines = reader.lines
    config._key_lines = reader.key_lines
    config._table_paths = table_paths
    return config


def _try(model: type[BaseModel], raw: Any, context: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw, context=context)
    except ValidationError:
        return None


def _table_paths(data: dict[str, Any]) -> dict[tuple[str | None, TableRef], DataPath]:
    """Where each table is written: source.tables entries, and sink rename keys (by sink name)."""
    paths: dict[tuple[str | None, TableRef], DataPath] = {}
    source = data.get("source")
    if isinstance(source, dict) and isinstance(source.get("tables"), list):
        for i, raw in enumerate(source["tables"]):
            ref = _parse_or_none(raw)
            if ref is not None:
                paths.setdefault((None, ref), ("source", "tables", i))
    sinks = data.get("sinks")
    if isinstance(sinks, dict):
        for name, sink in sinks.items():
            if isinstance(sink, dict) and isinstance(sink.get("tables"), dict):
                for raw in sink["tables"]:
                    ref = _parse_or_none(raw)
                    if ref is not None:
                        paths.setdefault((name, ref), ("sinks", name, "tables", raw))
    return paths


def _parse_or_none(raw: Any) -> TableRef | None:
    try:
        return TableRef.parse(raw)
    except ValueError:
        return None
