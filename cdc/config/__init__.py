"""Pipeline configuration: a pipeline YAML (version 1) -> a validated :class:`PipelineConfig`.

Modules: :mod:`~cdc.config.loader` (entry points, FILE:LINE messages), :mod:`~cdc.config.yamlread`
(YAML with line marks), :mod:`~cdc.config.envvars` (``${VAR}`` expansion),
:mod:`~cdc.config.models` (the whole file's pydantic model), one module per section
(:mod:`~cdc.config.source`, :mod:`~cdc.config.kafka` with the Kafka clients' connection settings,
:mod:`~cdc.config.sinks`, :mod:`~cdc.config.privacy`) and :mod:`~cdc.config.common` (what they
share, the retry policy), :mod:`~cdc.config.names` (tables, slots, topics),
:mod:`~cdc.config.connections` (source DSN and sink URLs, checked at load), :mod:`~cdc.config.rules`
(rules spanning sections).
"""

from cdc.config.common import RetryConfig
from cdc.config.connections import sqlite_path
from cdc.config.kafka import KafkaConfig
from cdc.config.loader import load_pipeline, load_pipeline_text
from cdc.config.models import PipelineConfig
from cdc.config.sinks import SinkConfig
from cdc.config.source import SourceConfig
from cdc.config.names import DEFAULT_TOPIC, TableRef, default_object_name, kafka_topic_name

__all__ = [
    "DEFAULT_TOPIC",
    "KafkaConfig",
    "PipelineConfig",
    "RetryConfig",
    "SinkConfig",
    "SourceConfig",
    "TableRef",
    "default_object_name",
    "kafka_topic_name",
    "load_pipeline",
    "load_pipeline_text",
    "sqlite_path",
]
