"""Pipeline configuration: a pipeline YAML (version 1) -> a validated :class:`PipelineConfig`.

Modules: :mod:`~cdc.config.loader` (entry points, FILE:LINE messages), :mod:`~cdc.config.yamlread`
(YAML with line marks), :mod:`~cdc.config.envvars` (``${VAR}`` expansion),
:mod:`~cdc.config.models` (pydantic models), :mod:`~cdc.config.names` (tables, slots, topics),
:mod:`~cdc.config.connections` (source DSN and sink URLs, checked at load), :mod:`~cdc.config.rules`
(rules spanning sections).
"""

from cdc.config.connections import sqlite_path
from cdc.config.loader import load_pipeline, load_pipeline_text
from cdc.config.models import KafkaConfig, PipelineConfig, SinkConfig, SourceConfig
from cdc.config.names import DEFAULT_TOPIC, TableRef, default_object_name, kafka_topic_name

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
