"""The connection settings every Kafka client of cdc (producer, consumers, admin) is built with.

One place, so that a client added later cannot forget TLS or SASL: build clients with
``AIOKafkaProducer(**config.kafka.client_options(), ...)``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdc.errors import ConfigError

if TYPE_CHECKING:
    from cdc.config.models import KafkaConfig


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
