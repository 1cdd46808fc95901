"""YAML -> plain Python data, with the line of every value and key, for FILE:LINE messages.

The YAML is *composed* (node tree with marks) rather than loaded, then turned into plain data plus
a map ``data path -> line``; ``${VAR}`` references in strings are expanded on the way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from cdc.config.envvars import expand
from cdc.errors import ConfigError

# A pipeline file is a page or two of YAML. The limits stop a file that is huge, or that is small but
# whose aliases expand to billions of values ("billion laughs": 9 levels of 9 aliases), before it
# takes a machine's memory: each alias use is expanded into a copy of what it names.
MAX_FILE_BYTES = 1024 * 1024
MAX_VALUES = 100_000

DataPath = tuple[Any, ...]  # keys (str, or whatever YAML gave) and list indexes, from the document root


class Lines:
    """Line lookup: ``values`` has the line of every node, ``keys`` the line of each mapping key."""

    def __init__(self, values: dict[DataPath, int], keys: dict[DataPath, int]):
        self.values, self.keys = values, keys

    def locate(self, path: DataPath, key: bool) -> int | None:
        """Line of ``path`` (its key line if ``key``), else the key line of the closest ancestor."""
        if key and path in self.keys:
            return self.keys[path]
        if path in self.values:
            return self.values[path]
        while path:
            path = path[:-1]
            if path in self.keys:
                return self.keys[path]
            if path in self.values:
                return self.values[path]
        return None


_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted(path: DataPath) -> str:
    """``('sinks', 'replica', 'tables', 'public.x')`` -> ``sinks.replica.tables[public.x]``."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _SIMPLE_KEY.fullmatch(part):
            out += ("." if out else "") + part
        else:
            out += f"[{part}]"
    return out or "(top level)"


class Reader:
    """Turns a composed YAML node tree into plain data, recording lines and collecting problems."""

    def __init__(self, filename: str, env: Mapping[str, str]):
        self.filename = filename
        self.env = env
        self.lines: dict[DataPath, int] = {}
        self.key_lines: dict[DataPath, int] = {}
        self.problems: list[tuple[int, str]] = []
        # Paths already reported here (unset ${VAR}, recursive alias): pydantic's knock-on errors for
        # them would be noise.
        self.reported: list[DataPath] = []
        self._constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self._active: set[int] = set()
        self._values = 0  # nodes turned into data so far, counting every alias use anew

    def problem(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    def read(self, text: str) -> Any:
        if len(text) > MAX_FILE_BYTES:
            raise ConfigError([f"{self.filename}:1: the file has {len(text)} characters; a pipeline file may have at "
                               f"most {MAX_FILE_BYTES}"])
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            detail = e.problem or e.context or "syntax error"
            if e.context and e.problem and e.context_mark and e.context_mark.line + 1 != line:
                detail += f" ({e.context} at line {e.context_mark.line + 1})"
            raise ConfigError([f"{self.filename}:{line}: invalid YAML: {detail}"]) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"{self.filename}:1: invalid YAML: {e}"]) from None
        finally:
            loader.dispose()
        if node is None:
            raise ConfigError([f"{self.filename}:1: the file is empty; expected a mapping with {TOP_KEYS}"])
        if not isinstance(node, yaml.MappingNode):
            line = node.start_mark.line + 1
            raise ConfigError([f"{self.filename}:{line}: top level must be a mapping with {TOP_KEYS}, got {kind(node)}"])
        return self.node(node, ())

    def node(self, node: yaml.Node, path: DataPath) -> Any:
        line = node.start_mark.line + 1
        self._values += 1
        if self._values > MAX_VALUES:
            raise ConfigError([
                f"{self.filename}:{line}: YAML aliases expand to more than {MAX_VALUES} values (the anchor at this "
                "line is repeated too often); write the values out, or use fewer nested aliases"
            ])
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.ScalarNode):
            before = len(self.problems)
            value = self.scalar(node)
            if len(self.problems) > before:
                self.reported.append(path)
            return self.expand(value, path, line) if isinstance(value, str) else value
        if id(node) in self._active:  # `&a [*a]`: would recurse forever
            self.problem(line, f"{dotted(path)}: recursive YAML alias")
            self.reported.append(path)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.node(item, path + (i,)) for i, item in enumerate(node.value)]
            return self.mapping(node, path)
        finally:
            self._active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: DataPath) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_line, f"{dotted(path)}: mapping keys must be plain values, got {kind(key_node)}")
                continue
            key = self.scalar(key_node)
            if key in result:
                first = self.key_lines[path + (key,)]
                self.problem(key_line, f"{dotted(path + (key,))}: duplicate key {key!r} (first at line {first})")
                continue
            self.key_lines[path + (key,)] = key_line
            result[key] = self.node(value_node, path + (key,))
        # Merged keys come after explicit ones so that explicit keys win, as YAML specifies.
        for merge in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    self.problem(source.start_mark.line + 1, f"{dotted(path)}: '<<' must merge a mapping")
                    continue
                merged = self.mapping(source, path)
                for key, value in merged.items():
                    result.setdefault(key, value)
        return result

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:  # e.g. an unknown !tag
            mark = getattr(e, "problem_mark", None) or node.start_mark
            self.problem(mark.line + 1, f"invalid YAML value: {getattr(e, 'problem', None) or e}")
        except Exception:  # PyYAML's constructors crash on some malformed tagged values (!!timestamp x)
            self.problem(node.start_mark.line + 1, f"invalid YAML value {node.value!r} for tag {node.tag}")
        return None

    def expand(self, value: str, path: DataPath, line: int) -> str:
        expanded, problems = expand(value, self.env, dotted(path))
        for message in problems:
            self.problem(line, message)
        if problems:
            self.reported.append(path)
        return expanded


TOP_KEYS = "pipeline:, source:, kafka:, sinks:"


def kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(type(node), "a single value")
