"""The code stays readable: short functions, bounded branching, no import circles.

Limits: a function (or method) in medreason/ or jobs/ is at most 80 lines long and at most 15 in
cyclomatic complexity (radon's count). Ordered rule lists are the exception, named below with
why: splitting them would scatter one ordered decision over several places.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("medreason", "jobs")
MAX_LINES = 80
MAX_COMPLEXITY = 15

# "module:qualified.name" -> why it may exceed the limits.
EXCEPTIONS: dict[str, str] = {}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.AST]]:
    out: list[tuple[str, ast.AST]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            out.append((name, node))
            out += _functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, f"{prefix}{node.name}.")
    return out


def _key(path: Path, name: str) -> str:
    return f"{path.relative_to(REPO).with_suffix('').as_posix().replace('/', '.')}:{name}"


def test_functions_are_at_most_80_lines() -> None:
    too_long = []
    for path in _sources():
        for name, node in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES and _key(path, name) not in EXCEPTIONS:
                too_long.append(f"{_key(path, name)} ({length} lines)")
    assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)


def test_cyclomatic_complexity_is_at_most_15() -> None:
    radon = pytest.importorskip("radon.complexity")
    too_complex = []
    for path in _sources():
        for block in radon.cc_visit(path.read_text(encoding="utf-8")):
            items = [block] + list(getattr(block, "closures", []))
            if hasattr(block, "methods"):
                items += list(block.methods)
            for item in items:
                name = f"{item.classname}.{item.name}" if getattr(item, "classname", None) else item.name
                if item.complexity > MAX_COMPLEXITY and _key(path, name) not in EXCEPTIONS:
                    too_complex.append(f"{_key(path, name)} (complexity {item.complexity})")
    too_complex = sorted(set(too_complex))
    assert not too_complex, "functions above complexity 15:\n" + "\n".join(too_complex)


def test_no_import_circles() -> None:
    """The graph of absolute imports between the project's own modules has no cycle (imports
    inside functions count too: they are circles that only show later)."""
    modules = [
        info.name
        for pkg in PACKAGES
        for info in pkgutil.walk_packages([str(REPO / pkg)], prefix=f"{pkg}.")
    ]
    assert modules
    graph: dict[str, set[str]] = {}
    for mod in modules:
        path = REPO / (mod.replace(".", "/") + ".py")
        if not path.exists():
            path = REPO / mod.replace(".", "/") / "__init__.py"
        deps = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If)
                      and getattr(n.test, "id", getattr(n.test, "attr", None)) == "TYPE_CHECKING"]:
            guard.body = []  # imports for type hints only never run
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[mod] = {d for d in deps if d in modules}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, stack + [node])

    for mod in sorted(graph):
        visit(mod, [])
    assert not cycles, "import circles:\n" + "\n".join(sorted(set(cycles)))
