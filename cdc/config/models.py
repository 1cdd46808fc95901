"""The pipeline's typed model (pydantic). Build it with :func:`cdc.config.load_pipeline`, which
also records YAML lines; constructing it in code runs the same rules without lines."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cdc.config.connections import (
    SQLITE_PREFIX,
    postgres_dsn_problem,
    sink_url_problem,
    sqlite_path,
    with_connect_timeout,
)
from cdc.config.names import (
    DEFAULT_TOPIC,
    PIPELINE_NAME_RE,
    SINK_NAME_RE,
    TableName,
    TableRef,
    check_slot_like,
    check_topic_template,
    default_object_name,
    topic_for,
)
from cdc.config.rules import cross_check, duplicate_tables
from cdc.config.yamlread import DataPath, Lines
from cdc.transform.privacy import Hasher, Mask, TableRules
from cdc.transform.rowfilter import FilterError, RowFilter

# Loader context flag: rules that need YAML lines to report well are skipped inside pydantic and
# run by the loader instead (see cross_check). Direct construction in code still runs them.
LOADER = "cdc_config_loader"

DEFAULT_CONNECT_TIMEOUT_S = 10


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


def fill_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Default source.slot / source.publication to cdc_<pipeline> (copies, never mutates ``data``)."""
    source, name = data.get("source"), data.get("pipeline")
    if isinstance(source, dict) and isinstance(name, str) and name:
        source = dict(source)
        source.setdefault("slot", default_object_name(name))
        source.setdefault("publication", default_object_name(name))
        data = {**data, "source": source}
    return data



_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(BaseModel):
    """How long a running component waits out a transient fault (README: Faults and retries):
    exponential backoff with jitter from `initial_delay_s` up to `max_delay_s` between attempts;
    after `give_up_after_s` of one outage the error stands and cdc exits with its code."""

    model_config = _MODEL_CONFIG

    initial_delay_s: Float = Field(0.5, gt=0)
    max_delay_s: Float = Field(30.0, gt=0)
    give_up_after_s: Float = Field(600.0, ge=0)  # 0: no retries, the first fault stops cdc


class SourceConfig(BaseModel):
    """The PostgreSQL database and tables to capture."""

    model_config = _MODEL_CONFIG

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


_TOPIC_CONFIG_NAME = re.compile(r"^[a-z][a-z0-9]*(\.[a-z0-9]+)*$")


def _topic_config(value: Any) -> Any:
    """Kafka topic configs as the broker takes them: names like ``retention.ms``, values as text
    (YAML numbers and booleans are written the way Kafka reads them: ``true``, ``604800000``)."""
    value = _none_to_empty_dict(value)
    if not isinstance(value, dict):
        return value  # pydantic reports the wrong type
    out: dict[Any, Any] = {}
    for name, setting in value.items():
        if not isinstance(name, str) or not _TOPIC_CONFIG_NAME.match(name):
            raise ValueError(f"{name!r} is not a Kafka topic config name (lower case words joined by '.', e.g. retention.ms)")
        if isinstance(setting, bool):
            setting = "true" if setting else "false"
        elif isinstance(setting, (int, float)):
            setting = str(setting)
        elif not isinstance(setting, str):
            raise ValueError(f"{name}: expected a number, a boolean or a string, not a {type(setting).__name__}")
        out[name] = setting
    return out


class KafkaSecurity(BaseModel):
    """How cdc authenticates to Kafka and encrypts the connection (README: Kafka security). Maps
    onto the Kafka clients' security settings; secrets come from ${VAR} or a file (`*_file`)."""

    model_config = _MODEL_CONFIG

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    username: str | None = None
    # A secret: repr=False, never quoted in a message. `password_file`: read when cdc connects.
    password: str | None = Field(None, repr=False)
    password_file: Path | None = None
    ca_file: Path | None = None  # CA bundle (PEM) that signed the brokers' certificates; default: the system's
    cert_file: Path | None = None  # client certificate (PEM), for brokers that require one (mutual TLS)
    key_file: Path | None = None  # its private key (PEM)
    check_hostname: bool = True  # the broker's certificate must name the host cdc dialled

    @field_validator("password_file", "ca_file", "cert_file", "key_file")
    @classmethod
    def _readable_file(cls, v: Path | None) -> Path | None:
        # Relative to the working directory, as libpq's sslrootcert; checked now so validate says so.
        if v is not None and not v.is_file():
            raise ValueError(f"{v}: no such file")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        sasl = self.protocol.startswith("SASL_")
        tls = self.protocol.endswith("SSL")
        if sasl:
            missing = [k for k, v in (("sasl_mechanism", self.sasl_mechanism), ("username", self.username)) if v is None]
            if self.password is None and self.password_file is None:
                missing.append("password (or password_file)")
            if missing:
                raise ValueError(f"{self.protocol} needs {', '.join(missing)}")
        else:
            given = [k for k in ("sasl_mechanism", "username", "password", "password_file") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only used with protocol SASL_PLAINTEXT or SASL_SSL, not {self.protocol}")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if not tls:
            given = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only used with protocol SSL or SASL_SSL, not {self.protocol}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate and its key)")
        return self


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
    # Bounds every broker request and every connection attempt of the producer, consumer and admin
    # client (aiokafka uses one timeout for both): a broker that never answers is an error, not a hang.
    request_timeout_ms: Int = Field(30000, ge=1000)
    retry: RetryConfig = RetryConfig()  # the broker unreachable or electing while cdc runs
    # Kafka topic configs (retention.ms, cleanup.policy, min.insync.replicas...) for the topics cdc
    # creates; the broker checks names and values. Existing topics are left as they are.
    topic_config: Annotated[dict[str, str], BeforeValidator(_topic_config)] = {}
    security: KafkaSecurity = KafkaSecurity()  # PLAINTEXT unless set: TLS and SASL, README: Kafka security

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
        return check_topic_template(v)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments every Kafka client of cdc is built with: brokers, timeout, security."""
        from cdc.config.kafka_security import client_options

        return client_options(self)


class SinkTable(BaseModel):
    """A table entry of a sink: its target name and the columns it keeps (a subscription)."""

    model_config = _MODEL_CONFIG

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

    model_config = _MODEL_CONFIG

    name: str  # the key under `sinks:`; set by the loader, not written in YAML
    url: str = Field(repr=False)  # may hold a password: never in a printed model
    # Subscription: the source tables this sink applies (None: every table of the pipeline).
    only: list[TableName] | None = Field(None, min_length=1)
    # source table -> target table name (`source: target`), or {name, columns}. The target is a
    # literal name (no SQL quoting, no schema). Tables not listed keep their bare name, all columns.
    tables: Annotated[
        dict[TableName, Annotated[SinkTable, BeforeValidator(_table_entry)]], BeforeValidator(_none_to_empty_dict)
    ] = {}
    batch_size: Int = Field(1000, ge=1)
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


def _check_mask(spec: Any) -> Any:
    """`email: hash`, `notes: redact`, `prefs: null` (YAML null), `phone: {keep_last: 4}`, `{keep_first: 1}`."""
    if spec is None or spec in ("hash", "redact"):
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, n), = spec.items()
        if kind in ("keep_first", "keep_last"):
            if type(n) is not int or n < 0:
                raise ValueError(f"{kind} takes a whole number of characters (0 or more)")
            return spec
    written = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else spec
    close = difflib.get_close_matches(str(written), ["hash", "redact", "keep_first", "keep_last"], n=1) if isinstance(
        written, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"a mask is hash, redact, null, {{keep_first: N}} or {{keep_last: N}}{hint}")


MaskSpec = Annotated[Any, AfterValidator(_check_mask)]


def _mask_of(spec: Any) -> Mask:
    if spec is None:
        return Mask("null")
    if isinstance(spec, dict):
        (kind, n), = spec.items()
        return Mask(kind, n)
    return Mask(spec)


def _unique_names(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    seen: set[str] = set()
    for name in v:
        if not name:
            raise ValueError("column names must not be empty")
        if name in seen:
            raise ValueError(f"column {name} is listed twice")
        seen.add(name)
    return v


class TablePrivacy(BaseModel):
    """What of one table may be published (README: Privacy)."""

    model_config = _MODEL_CONFIG

    include: Annotated[list[str] | None, AfterValidator(_unique_names)] = None
    exclude: Annotated[list[str], AfterValidator(_unique_names)] = []
    mask: Annotated[dict[str, MaskSpec], BeforeValidator(_none_to_empty_dict)] = {}
    rows: str | None = None

    @field_validator("rows")
    @classmethod
    def _filter_parses(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                RowFilter.parse(v)
            except FilterError as exc:
                raise ValueError(f"row filter {exc}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TablePrivacy:
        if self.include is not None and "exclude" in self.model_fields_set:
            raise ValueError("a table takes include or exclude, not both")
        both = [c for c in self.exclude if c in self.mask]
        if both:
            raise ValueError(f"column(s) {', '.join(both)} both excluded and masked")
        if self.include is not None:
            dropped = [c for c in self.mask if c not in self.include]
            if dropped:
                raise ValueError(f"column(s) {', '.join(dropped)} masked but not in include (so never published)")
        return self

    def rules(self) -> TableRules:
        return TableRules(
            include=tuple(self.include) if self.include is not None else None,
            exclude=tuple(self.exclude),
            masks={name: _mask_of(spec) for name, spec in self.mask.items()},
            rows=self.rows,
        )

    @property
    def hashes(self) -> bool:
        return any(spec == "hash" for spec in self.mask.values())


KEY_ID_RE = r"^[A-Za-z0-9._-]{1,32}$"
MIN_HASH_KEY_CHARS = 16


class PrivacyConfig(BaseModel):
    """`privacy:`: per-table column and row rules, and the key of `hash` masks."""

    model_config = _MODEL_CONFIG

    # A secret: repr=False, and the loader never quotes it in a message.
    hash_key: str | None = Field(None, repr=False)
    hash_key_id: str = Field("k1", pattern=KEY_ID_RE)
    tables: Annotated[dict[TableName, TablePrivacy], BeforeValidator(_none_to_empty_dict)] = {}

    @field_validator("hash_key")
    @classmethod
    def _long_enough(cls, v: str | None) -> str | None:
        if v is not None and len(v) < MIN_HASH_KEY_CHARS:  # never quotes the key
            raise ValueError(f"must have at least {MIN_HASH_KEY_CHARS} characters (a short key can be guessed)")
        return v

    @model_validator(mode="after")
    def _key_when_hashing(self) -> PrivacyConfig:
        if self.hash_key is None and any(t.hashes for t in self.tables.values()):
            hashed = [str(ref) for ref, t in self.tables.items() if t.hashes]
            raise ValueError(f"hash_key is required: {', '.join(hashed)} hash columns (e.g. hash_key: ${{CDC_HASH_KEY}})")
        return self

    def hasher(self) -> Hasher | None:
        return Hasher(self.hash_key, self.hash_key_id) if self.hash_key is not None else None


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
    privacy: PrivacyConfig = PrivacyConfig()
    path: Path  # absolute path of the YAML file; set by the loader, not written in YAML

    _display_name: str | None = PrivateAttr(default=None)  # file name as the user gave it, for messages
    _lines: dict[DataPath, int] = PrivateAttr(default_factory=dict)
    _key_lines: dict[DataPath, int] = PrivateAttr(default_factory=dict)
    _table_paths: dict[tuple[str | None, TableRef], DataPath] = PrivateAttr(default_factory=dict)
    _privacy_keys: dict[TableRef, Any] = PrivateAttr(default_factory=dict)  # table -> its key as written

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = fill_defaults(data)
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
        if not (info.context or {}).get(LOADER):  # the loader reports these with lines
            problems = cross_check(self.pipeline, list(self.source.tables), self.kafka, self.sinks, list(self.privacy.tables))
            if problems:
                raise ValueError("; ".join(msg for _, msg in problems))
        return self

    # ---- derived names ---------------------------------------------------------------------------

    def topic_for(self, table: TableRef) -> str:
        """Kafka topic of a source table: the template filled in, then made legal for Kafka."""
        return topic_for(self.kafka.topic, self.pipeline, table)

    def target_table(self, sink: str, table: TableRef) -> str:
        """Table name in sink ``sink`` for a source table: its rename or the bare table name."""
        return self.sinks[sink].target_table(table)

    def apply_mode(self, sink: str) -> str:
        """How sink ``sink`` applies: as configured, else whole transactions when it has several tables."""
        config = self.sinks[sink]
        if config.apply is not None:
            return config.apply
        tables = [t for t in self.source.tables if config.subscribes(t)]
        return "transactional" if len(tables) > 1 else "per_partition"

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
        return Lines(self._lines, self._key_lines).locate(tuple(path), key=True)

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

    def privacy_where(self, table: TableRef, *path: Any) -> str:
        """``"FILE:LINE"`` of a path under a table's entry in privacy.tables, e.g. ("mask", "email")."""
        return self.where("privacy", "tables", self._privacy_keys.get(table, str(table)), *path)
