"""The files users copy from: every example pipeline is valid, and docker/ hangs together (a
compose file that names a missing file, a password the DSN does not use, or a broker address the
pipeline does not dial fails here, not on a user's machine)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from cdc.config import load_pipeline

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"

# What a user exports before running an example (the examples' comments say which); an example
# using a variable not set here fails to load.
EXAMPLE_ENV = {
    "SOURCE_DSN": "postgresql://cdc:secret@db.example.com:5432/shop",
    "KAFKA_BOOTSTRAP": "kafka1.example.com:9092",
    "CDC_HASH_KEY": "a-hash-key-of-32-characters-long",
    "ORDERS_REPLICA_URL": "postgresql://cdc:secret@replica.example.com/orders",
    "REPLICA_URL": "postgresql://cdc:secret@replica.example.com/shop",
    "KAFKA_PASSWORD": "kafka-secret",
}


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_example_pipeline_is_valid(path: Path) -> None:
    config = load_pipeline(path, env=EXAMPLE_ENV)
    assert config.sinks, f"{path.name}: an example without a sink shows only half of cdc"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def _mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        out.append(((DOCKER / host).resolve(), container))
    return out


def test_compose_mounts_exist_and_services_it_waits_for_are_defined(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for host, _ in _mounts(service):
            assert host.exists(), f"service {name} mounts {host.relative_to(ROOT)}, which does not exist"
        for needed in service.get("depends_on", {}):
            assert needed in services, f"service {name} waits for an undefined service {needed}"
    for name in CDC_SERVICES:
        build = services[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


CDC_SERVICES = ("connector", "sink")


def _pipeline_of(service: dict) -> tuple[Path, str]:
    """The pipeline file a cdc service runs (`COMMAND FILE [options]`) and the command."""
    command, file_in_container = service["command"][:2]
    return next(host for host, container in _mounts(service) if container == file_in_container), command


@pytest.mark.parametrize("name", CDC_SERVICES)
def test_compose_cdc_services_run_the_pipeline_with_a_ready_check(compose: dict, name: str) -> None:
    service = compose["services"][name]
    pipeline_file, command = _pipeline_of(service)
    assert command == name and pipeline_file.parent == ROOT / "pipelines"
    port = service["command"][service["command"].index("--metrics-port") + 1]
    assert f"127.0.0.1:{port}/ready" in " ".join(service["healthcheck"]["test"])


def test_compose_pipeline_reaches_the_services_it_runs_with(compose: dict) -> None:
    services = compose["services"]
    cdc = services["connector"]
    pipeline_file, _ = _pipeline_of(cdc)
    env = _env(cdc)
    config = load_pipeline(pipeline_file, env=env)  # every ${VAR} it uses is set by the compose file

    source = urlsplit(config.source.postgres)
    assert source.hostname in services
    source_env = _env(services[source.hostname])
    assert source.password == source_env["POSTGRES_PASSWORD"]
    assert source.path.lstrip("/") == source_env["POSTGRES_DB"]
    assert "wal_level=logical" in services[source.hostname]["command"]

    kafka_env = _env(services["kafka"])
    advertised = {urlsplit(listener).netloc for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert set(config.kafka.bootstrap_servers.split(",")) <= advertised

    for sink in config.sinks.values():
        target = urlsplit(sink.url)
        target_env = _env(services[target.hostname])
        assert target.password == target_env["POSTGRES_PASSWORD"]
        assert target.path.lstrip("/") == target_env["POSTGRES_DB"]


def test_compose_source_schema_has_the_captured_tables(compose: dict) -> None:
    cdc = compose["services"]["connector"]
    config = load_pipeline(_pipeline_of(cdc)[0], env=_env(cdc))
    init_sql = "".join(host.read_text() for host, container in _mounts(compose["services"]["source"])
                       if container.startswith("/docker-entrypoint-initdb.d/"))
    created = {name.strip('"') for name in re.findall(r'CREATE TABLE\s+("[^"]+"|\w+)', init_sql)}
    assert {table.name for table in config.source.tables} <= created


def test_dockerfile_copies_what_exists_and_runs_cdc() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert 'ENTRYPOINT ["cdc"]' in text
    assert re.search(r"^USER (?!root)", text, re.M), "the image runs as root"


# ---- the JSON Schema of pipeline files (cdc schema) ------------------------------------------------

SCHEMA_FILE = ROOT / "docs" / "pipeline.schema.json"


def test_committed_schema_is_current() -> None:
    from cdc.config.json_schema import pipeline_schema

    assert json.loads(SCHEMA_FILE.read_text()) == pipeline_schema(), (
        "docs/pipeline.schema.json is stale: run `cdc schema > docs/pipeline.schema.json`")


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_schema_accepts_every_example(path: Path, schema_validator) -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in schema_validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


@pytest.mark.parametrize("mistake, where", [
    ({"source": {"tabels": ["t"]}}, "source"),                    # a misspelled key
    ({"kafka": {"partitions": "two"}}, "kafka.partitions"),       # a word where a number goes
    ({"sinks": {"r": {"url": "sqlite:///r.db", "apply": "eventually"}}}, "sinks.r.apply"),
])
def test_schema_flags_what_validate_refuses(mistake: dict, where: str, schema_validator) -> None:
    document = yaml.safe_load((ROOT / "pipelines" / "minimal.yaml").read_text())
    for section, value in mistake.items():
        document[section] = {**document[section], **value} if section != "source" else value
    errors = {".".join(map(str, e.absolute_path)) for e in schema_validator.iter_errors(document)}
    assert where in errors or any(e.startswith(where) for e in errors)


def test_every_kafka_client_is_built_with_the_pipeline_security() -> None:
    # A client built from bootstrap_servers alone would talk PLAINTEXT to a TLS/SASL cluster.
    for path in (ROOT / "cdc").rglob("*.py"):
        if path.parts[-2] == "dev":  # the local test brokers
            continue
        text = path.read_text()
        for match in re.finditer(r"AIOKafka(Producer|Consumer|AdminClient)\(", text):
            call = text[match.end():match.end() + 200]
            assert "client_options()" in call.split(")")[0] + ")", (
                f"{path.relative_to(ROOT)}: {match.group(0)} without **config.kafka.client_options()")
