"""`kafka:`: the Kafka cluster, how tables map to topics, and how cdc logs in (pydantic models); and
the connection settings every Kafka client of cdc (producer, consumers, admin) is built with.

One place for those, so that a client added later cannot forget TLS or SASL: build clients with
``AIOKafkaProducer(**config.kafka.client_options(), ...)``.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from cdc.config.common import MODEL_CONFIG, Int, RetryConfig, none_to_empty_dict
from cdc.config.names import DEFAULT_TOPIC, check_topic_template
from cdc.errors import ConfigError


_TOPIC_CONFIG_NAME = re.compile(r"^[a-z][a-z0-9]*(\.[a-z0-9]+)*$")


def _topic_config(value: Any) -> Any:
    """Kafka topic configs as the broker takes them: names like ``retention.ms``, values as text
    (YAML numbers and booleans are written the way Kafka reads them: ``true``, ``604800000``)."""
    value = none_to_empty_dict(value)
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

    model_config = MODEL_CONFIG

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

    model_config = MODEL_CONFIG

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
        return client_options(self)


def client_options(kafka: KafkaConfig) -> dict[str, Any]:
    security = kafka.security
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "request_timeout_ms": kafka.request_timeout_ms,
        "security_protocol": security.protocol,
    }
    if security.protocol.endswith("SSL"):
        options["ssl_context"] = _ssl_context(security.ca_file, security.cert_file, security.key_file,
                                              security.check_hostname)
    if security.protocol.startswith("SASL_"):
        options["sasl_mechanism"] = security.sasl_mechanism
        options["sasl_plain_username"] = security.username
        options["sasl_plain_password"] = (security.password if security.password is not None
                                          else _read_secret(security.password_file))
    return options


def _ssl_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None,
                 check_hostname: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        context.check_hostname = check_hostname
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"kafka.security: cannot load {'the CA file ' + str(ca_file) if cert_file is None else 'the client certificate ' + str(cert_file)}: {exc}"]) from None
    return context


def _read_secret(path: Path | None) -> str:
    assert path is not None
    try:
        return path.read_text(encoding="utf-8").rstrip("\n")  # a secret file usually ends with a newline
    except OSError as exc:
        raise ConfigError([f"kafka.security.password_file: cannot read {path}: {exc.strerror or exc}"]) from None
