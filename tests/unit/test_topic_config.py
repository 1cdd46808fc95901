"""kafka.topic_config: Kafka topic configs in the pipeline YAML, as the broker will receive them."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cdc.config import load_pipeline
from cdc.errors import ConfigError

BASE = """\
pipeline: shop
source:
  postgres: postgresql://cdc@db/shop
  tables: [public.customers]
kafka:
  bootstrap_servers: k:9092
"""


def load(tmp_path: Path, kafka_lines: str):
    path = tmp_path / "p.yaml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent(kafka_lines), "  "))
    return load_pipeline(path)


def problems(tmp_path: Path, kafka_lines: str) -> list[str]:
    try:
        load(tmp_path, kafka_lines)
    except ConfigError as exc:
        return exc.problems
    raise AssertionError("expected a problem")


def test_values_reach_kafka_as_text(tmp_path: Path) -> None:
    cfg = load(tmp_path, """\
        topic_config:
          retention.ms: 604800000
          cleanup.policy: compact,delete
          min.cleanable.dirty.ratio: 0.25
          unclean.leader.election.enable: false
        """)
    assert cfg.kafka.topic_config == {
        "retention.ms": "604800000", "cleanup.policy": "compact,delete",
        "min.cleanable.dirty.ratio": "0.25", "unclean.leader.election.enable": "false",
    }


def test_default_is_none_and_an_empty_key_is_none(tmp_path: Path) -> None:
    assert load(tmp_path, "").kafka.topic_config == {}
    assert load(tmp_path, "topic_config:\n").kafka.topic_config == {}


def test_environment_variables_expand_in_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RETENTION", "3600000")
    assert load(tmp_path, "topic_config: {retention.ms: '${RETENTION}'}").kafka.topic_config == {"retention.ms": "3600000"}


def test_a_name_that_is_no_kafka_config_name_is_refused_with_its_line(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, "topic_config:\n  Retention MS: 5\n")
    assert problem.startswith(f"{tmp_path / 'p.yaml'}:8: kafka.topic_config: "), problem
    assert "'Retention MS' is not a Kafka topic config name" in problem


def test_a_nested_value_is_refused(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, "topic_config:\n  retention.ms: [1, 2]\n")
    assert "retention.ms: expected a number, a boolean or a string, not a list" in problem
