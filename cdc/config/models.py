"""The pipeline's typed model (pydantic): the whole file, made of one model per section
(:mod:`~cdc.config.source`, :mod:`~cdc.config.kafka`, :mod:`~cdc.config.sinks`,
:mod:`~cdc.config.privacy`). Build it with :func:`cdc.config.load_pipeline`, which also records YAML
lines; constructing it in code runs the same rules without lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, PrivateAttr, ValidationInfo, field_validator, model_validator

from cdc.config.common import LOADER, MODEL_CONFIG, none_to_empty_dict
from cdc.config.kafka import KafkaConfig
from cdc.config.names import PIPELINE_NAME_RE, SINK_NAME_RE, TableRef, default_object_name, topic_for
from cdc.config.privacy import PrivacyConfig
from cdc.config.rules import cross_check
from cdc.config.sinks import SinkConfig
from cdc.config.source import SourceConfig
from cdc.config.yamlread import DataPath, Lines


def fill_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Default source.slot / source.publication to cdc_<pipeline> (copies, never mutates ``data``)."""
    source, name = data.get("source"), data.get("pipeline")
    if isinstance(source, dict) and isinstance(name, str) and name:
        source = dict(source)
        source.setdefault("slot", default_object_name(name))
        source.setdefault("publication", default_object_name(name))
        data = {**data, "source": source}
    return data


def _check_sink_name(name: str) -> str:
    if not SINK_NAME_RE.match(name):
        raise ValueError(f"sink name {name!r} may only contain letters, digits, '.', '_' and '-'")
    return name


# Checked as the `sinks:` key (not SinkConfig.name) so the error points at the key's line.
SinkName = Annotated[str, AfterValidator(_check_sink_name)]


class PipelineConfig(BaseModel):
    """A whole pipeline file. Build it with :func:`load_pipeline`, which also records YAML lines."""

    model_config = MODEL_CONFIG

    version: Literal[1] = 1
    pipeline: str
    source: SourceConfig
    kafka: KafkaConfig
    sinks: Annotated[dict[SinkName, SinkConfig], BeforeValidator(none_to_empty_dict)] = {}  # zero is fine
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
