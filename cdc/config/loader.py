"""Load a pipeline YAML (version 1): every problem as ``FILE:LINE: message``, all at once.

The YAML reader (:mod:`cdc.config.yamlread`) gives plain data and a map ``data path -> line``;
pydantic validates the data (:mod:`cdc.config.models` and its sections) and its error locations
are translated back to lines. Rules that span sections (:mod:`cdc.config.rules`) run on whatever sections validated, so
they are reported alongside field errors, and a user fixes the file in one pass.

Entry points: :func:`load_pipeline` (a file) and :func:`load_pipeline_text` (tests).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cdc.config.connections import sqlite_directory_problem, sqlite_path
from cdc.config.common import LOADER
from cdc.config.kafka import KafkaConfig, KafkaSecurity
from cdc.config.models import PipelineConfig, fill_defaults
from cdc.config.privacy import PrivacyConfig, TablePrivacy
from cdc.config.sinks import SinkConfig
from cdc.config.source import SourceConfig
from cdc.config.names import TableRef, parse_or_none
from cdc.config.rules import cross_check
from cdc.config.yamlread import MAX_FILE_BYTES, DataPath, Lines, Reader, dotted
from cdc.errors import ConfigError

# Values that may hold a password: a message about them never quotes the value.
_SECRET_KEYS = {("source", "postgres"), ("sinks", None, "url"), ("privacy", "hash_key"), ("kafka", "security", "password")}


def _is_secret(path: DataPath) -> bool:
    return any(len(path) == len(k) and all(p is None or p == q for p, q in zip(k, path)) for k in _SECRET_KEYS)


def _model_at(path: DataPath) -> type[BaseModel] | None:
    if path == ():
        return PipelineConfig
    if path == ("source",):
        return SourceConfig
    if path == ("kafka",):
        return KafkaConfig
    if path == ("kafka", "security"):
        return KafkaSecurity
    if len(path) == 2 and path[0] == "sinks":
        return SinkConfig
    if path == ("privacy",):
        return PrivacyConfig
    if len(path) == 3 and path[:2] == ("privacy", "tables"):
        return TablePrivacy
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


def _format_pydantic(error: Any, lines: Lines) -> tuple[int, str]:
    """One pydantic error as (line, "dotted.path: message"), choosing the line by error kind."""
    loc = tuple(error["loc"])
    kind = error["type"]
    is_key = bool(loc) and loc[-1] == "[key]"
    path = loc[:-1] if is_key else loc
    if kind == "extra_forbidden":
        line = lines.locate(path, key=True)
        where, message = dotted(path), _unknown_key_message(path)
    elif kind == "missing":
        line = lines.locate(path[:-1], key=True)  # the mapping that lacks it
        where, message = dotted(path), "required key is missing"
    else:
        line = lines.locate(path, key=is_key)
        where = dotted(path)
        message = re.sub(r" or instance of \w+", "", error["msg"])  # pydantic internals, not YAML
        if kind in ("value_error", "assertion_error"):
            message = re.sub(r"^(Value|Assertion) error, ", "", message)
        else:
            value = error.get("input")
            if (isinstance(value, (str, int, float, bool)) or value is None) and not _is_secret(path):
                message += f" (got {value!r})"
        if is_key:
            message = f"key {path[-1]!r}: {message}"
            where = dotted(path[:-1])
    return (line or 1, f"{where}: {message}")


def load_pipeline(path: str | Path, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """Load and validate a pipeline YAML file. Raises ConfigError with every problem found."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:  # before reading it: the file may be far larger than memory
            raise ConfigError([f"{path}:1: the file has {size} bytes; a pipeline file may have at most {MAX_FILE_BYTES}"])
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
    reader = Reader(filename, os.environ if env is None else env)
    data = reader.read(text)  # raises on syntax errors: nothing else can be checked then
    lines = Lines(reader.lines, reader.key_lines)
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
                    problems.append((lines.locate(at, key=True) or 1, f"{dotted(at)}: {_unknown_key_message(at)}"))
                sink = {**sink, "name": str(name)}  # a non-string key is reported once, as a key error
            sinks[name] = sink
        data["sinks"] = sinks
    data = fill_defaults(data)

    context = {LOADER: True}
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
    privacy_keys, privacy_problems = _privacy_keys(data)
    for where, message in privacy_problems:
        problems.append((lines.locate(where, key=True) or 1, message))
    if config is not None:
        pipeline, tables, kafka, sinks = config.pipeline, list(config.source.tables), config.kafka, config.sinks
    else:
        pipeline = data.get("pipeline") if valid(("pipeline",)) else None
        # Table entries one by one, so one bad entry does not hide e.g. a topic collision of others.
        raw_tables = data.get("source", {}).get("tables") if isinstance(data.get("source"), dict) else None
        tables = [parse_or_none(raw) for raw in raw_tables] if isinstance(raw_tables, list) else []
        kafka = _try(KafkaConfig, data.get("kafka"), context) if valid(("kafka",)) else None
        sinks = {}
        if isinstance(data.get("sinks"), dict):
            for name, raw in data["sinks"].items():
                sink = _try(SinkConfig, raw, context) if valid(("sinks", name)) else None
                if sink is not None:
                    sinks[name] = sink
    for where, message in cross_check(pipeline, tables, kafka, sinks, list(privacy_keys)):
        if len(where) == 4 and where[0] == "sinks" and isinstance(where[3], TableRef):
            where = table_paths.get((where[1], where[3]), where[:3])
        if len(where) == 3 and where[:2] == ("privacy", "tables") and isinstance(where[2], TableRef):
            where = ("privacy", "tables", privacy_keys[where[2]])
        problems.append((lines.locate(where, key=True) or 1, message))

    # A SQLite file is created on first use, its directory never: a typo there would start an
    # empty replica somewhere unexpected.
    for name, sink in sinks.items():
        path = sqlite_path(sink.url, file_path.parent)
        problem = sqlite_directory_problem(path) if path is not None else None
        if problem:
            at = ("sinks", name, "url")
            problems.append((lines.locate(at, key=False) or 1, f"{dotted(at)}: {problem}"))

    if problems:
        problems.sort(key=lambda p: p[0])  # stable: same-line problems keep discovery order
        raise ConfigError([f"{filename}:{line}: {message}" for line, message in problems])

    assert config is not None
    config._display_name = filename
    config._lines = reader.lines
    config._key_lines = reader.key_lines
    config._table_paths = table_paths
    config._privacy_keys = privacy_keys
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
            ref = parse_or_none(raw)
            if ref is not None:
                paths.setdefault((None, ref), ("source", "tables", i))
    sinks = data.get("sinks")
    if isinstance(sinks, dict):
        for name, sink in sinks.items():
            if isinstance(sink, dict) and isinstance(sink.get("tables"), dict):
                for raw in sink["tables"]:
                    ref = parse_or_none(raw)
                    if ref is not None:
                        paths.setdefault((name, ref), ("sinks", name, "tables", raw))
    return paths


def _privacy_keys(data: dict[str, Any]) -> tuple[dict[TableRef, Any], list[tuple[DataPath, str]]]:
    """privacy.tables: each table -> its key as written, and keys that name one table twice."""
    keys: dict[TableRef, Any] = {}
    problems: list[tuple[DataPath, str]] = []
    privacy = data.get("privacy")
    tables = privacy.get("tables") if isinstance(privacy, dict) else None
    if isinstance(tables, dict):
        for raw in tables:
            ref = parse_or_none(raw)
            if ref is None:
                continue  # reported by the model
            if ref in keys:
                problems.append((("privacy", "tables", raw), f"privacy.tables: {raw!r} names {ref} again (also {keys[ref]!r})"))
                continue
            keys[ref] = raw
    return keys, problems
