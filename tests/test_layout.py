"""The package's shape: no import circle among its modules, small method files, no module over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import sparsecode

ROOT = Path(sparsecode.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (function-level imports included)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, or None (a package importing its own submodules is not a circle)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if n.startswith(m + "."):  # a module importing its parent package's __init__
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_circle_among_the_package_modules():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_the_circle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_method_files_are_short_and_no_module_is_long():
    long = {}
    for path in ROOT.rglob("*.py"):
        limit = 220 if path.parent.name in ("sae", "vq") else 420
        n = len(path.read_text().splitlines())
        if n > limit:
            long[str(path.relative_to(ROOT))] = n
    assert not long, long
