"""``${VAR}`` / ``${VAR:-default}`` / ``$${`` expansion inside YAML string values.

Expansion runs on parsed strings, never on YAML text: a value with ``: #`` stays one string.
Messages never quote the value: it may be a connection string with a password in it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ENV_RE = re.compile(
    r"\$\$\{"  # $${ -> literal ${
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"  # ${NAME} / ${NAME:-default}
    r"|\$\{"  # anything else starting with ${ is a mistake
)


def expand(value: str, env: Mapping[str, str], where: str) -> tuple[str, list[str]]:
    """``value`` expanded, and the problems found (messages naming ``where``, the dotted key)."""
    if "${" not in value:
        return value, []
    problems: list[str] = []

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group("name")
        if name is None:
            problems.append(
                f"{where}: malformed variable reference at character {m.start() + 1}: use ${{NAME}} or "
                "${NAME:-default}; write $${ for a literal ${"
            )
            return m.group(0)
        current = env.get(name)
        if m.group("default") is not None:
            return current if current else m.group("default")
        if current is None:
            problems.append(f"environment variable {name} is not set (used in {where})")
            return m.group(0)
        return current

    return ENV_RE.sub(replace, value), problems
