"""The package's layer map holds: the import-linter contracts of pyproject.toml pass, no two modules import each
other (directly or round a cycle, counting imports inside functions), and the imports left inside functions are
only those of optional or slow-to-import dependencies."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qrepro"
# dependencies a module may import inside a function: optional extras or slow imports only one feature needs
LAZY_OK = {"wandb", "submitit", "hydra_plugins", "matplotlib", "timm", "sklearn"}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> the qrepro modules it imports anywhere in its file, [(module, line, name) of function-local
    imports])."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    local = []
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    p = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(p + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            if node.col_offset > 0:
                local.append((m, node.lineno, names[0]))
            for n in names:
                t = resolve(n)
                if t and t != m:
                    edges[m].add(t)
    return edges, local


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (a package and its own submodule excepted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            a = sorted(comp)
            if len(a) > 1 and not (len(a) == 2 and a[1].startswith(a[0] + ".")):
                out.append(a)

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_counting_imports_inside_functions():
    edges, _ = _imports(_modules())
    assert len(edges) > 50 and edges["qrepro.train"]  # the graph was read
    assert _cycles(edges) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == []  # a package re-exporting its own submodule


def test_imports_inside_functions_are_only_optional_or_slow_dependencies():
    _, local = _imports(_modules())
    bad = [f"{m}:{line} imports {name}" for m, line, name in local if name.split(".")[0] not in LAZY_OK]
    assert bad == []


def test_import_linter_contracts_hold():
    pytest.importorskip("importlinter")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "Layers:" in r.stdout
