"""The package's shape (docs/contributing.md, module map): no import cycles among cdc's modules, and
no module over 400 lines unless its docstring says why ("Over 400 lines: ...").

Imports are read from the source with ast, without importing anything. Only module-level imports
count (what runs when the module is imported): imports inside functions and under `if TYPE_CHECKING:`
are deliberate ways to defer a dependency and do not make a cycle at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cdc"
MAX_LINES = 400
REASON = "Over 400 lines:"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: at top level, or in a top-level
    try/except, with or if block (not `if TYPE_CHECKING:`); never in a function or class body."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With):
            pending.extend(node.body)
    return found


def _imported_modules(name: str, path: Path) -> set[str]:
    """The cdc modules `name` imports at module level. `from a import b` counts as importing a.b
    when that is a module, else a."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in MODULES)
            continue
        if node.level:  # relative: from the module's package, up `level - 1` more
            package = name.split(".") if is_package else name.split(".")[:-1]
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if target in MODULES:
                out.add(target)
            elif base in MODULES:
                out.add(base)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    return {name: _imported_modules(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def long_modules_without_reason() -> list[str]:
    out = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and REASON not in docstring:
            out.append(f"{name} ({lines} lines)")
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level imports):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_over_400_lines_without_a_reason_in_its_docstring():
    found = long_modules_without_reason()
    assert not found, f"modules over {MAX_LINES} lines whose docstring has no '{REASON} ...':\n" + "\n".join(found)


# The checker itself, on graphs small enough to see the answer.
@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycles_finds_every_loop_and_only_loops(graph, expected):
    assert cycles(graph) == expected


def test_imports_in_functions_and_under_type_checking_do_not_count():
    tree = ast.parse(
        "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cdc.a\n"
        "try:\n    import cdc.b\nexcept ImportError:\n    pass\ndef f():\n    import cdc.c\n"
    )
    names = sorted(alias.name for node in _module_level_imports(tree) for alias in node.names)
    assert names == ["TYPE_CHECKING", "cdc.b", "os"]
