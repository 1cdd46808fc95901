"""A JSON Schema of the pipeline YAML, for editors (completion, lint) and `cdc schema`.

Generated from the pydantic model, then adjusted to what a user writes rather than what the model
holds: table names are strings, loader-filled fields (`path`, a sink's `name`, default slot and
publication) are not asked for, and a number or boolean may be a `${VAR}` to expand. The schema
is a help, not the judge: `cdc validate` runs every rule (names, filters, cross-checks).
"""

from __future__ import annotations

from typing import Any

from cdc.config.models import PipelineConfig

SCHEMA_ID = "https://github.com/cdc-dev/cdc/pipeline.schema.json"

# ${VAR} or ${VAR:-default}: expanded after the YAML is parsed, so any field may hold one.
_VARIABLE = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}

_TABLE_NAME = {
    "type": "string",
    "description": "A PostgreSQL table name: unquoted parts fold to lower case, a bare name means "
                   'schema public, double quotes keep a name exactly (public."Order Items").',
}


def pipeline_schema() -> dict[str, Any]:
    schema = PipelineConfig.model_json_schema(mode="validation")
    defs = schema["$defs"]
    defs["TableRef"] = _TABLE_NAME
    _not_written(schema, "path")
    _not_written(defs["SinkConfig"], "name")
    for default_named in ("slot", "publication"):  # cdc_<pipeline> unless written
        _optional(defs["SourceConfig"], default_named)
    # `source_table: target_name` is the short form of {name: target_name}.
    defs["SinkConfig"]["properties"]["tables"]["additionalProperties"] = {
        "anyOf": [{"type": "string"}, {"$ref": "#/$defs/SinkTable"}]}
    # Topic configs are passed to Kafka as text; YAML numbers and booleans are written as Kafka reads them.
    defs["KafkaConfig"]["properties"]["topic_config"]["additionalProperties"] = {
        "type": ["string", "number", "boolean"]}
    for node in [schema, *defs.values()]:
        for prop in node.get("properties", {}).values():
            _allow_variable(prop)
    _drop_titles(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **schema, "title": "cdc pipeline"}


def _not_written(node: dict[str, Any], field: str) -> None:
    node["properties"].pop(field, None)
    _optional(node, field)


def _optional(node: dict[str, Any], field: str) -> None:
    if field in node.get("required", []):
        node["required"].remove(field)


def _allow_variable(prop: dict[str, Any]) -> None:
    """Numbers and booleans may be written as ${VAR} (strings are expanded anyway)."""
    kinds = {prop.get("type")} | {alt.get("type") for alt in prop.get("anyOf", [])}
    if kinds & {"integer", "number", "boolean"}:
        if "anyOf" in prop:
            prop["anyOf"].append(_VARIABLE)
        else:
            typed = {k: prop.pop(k) for k in list(prop) if k not in ("default", "description", "title")}
            prop["anyOf"] = [typed, _VARIABLE]


def _drop_titles(node: Any) -> None:
    # pydantic's titles repeat the field names ("Batch Size"); editors show the key already.
    if isinstance(node, dict):
        if isinstance(node.get("title"), str) and "properties" not in node:
            node.pop("title")
        for key, value in list(node.items()):
            if key != "properties":
                _drop_titles(value)
            else:
                for prop in value.values():
                    _drop_titles(prop)
    elif isinstance(node, list):
        for item in node:
            _drop_titles(item)
