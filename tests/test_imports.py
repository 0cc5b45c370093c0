"""Imports run downwards: no import cycle among the modules of src/xlora (DESIGN.md, "Imports run downwards").

Every ``import`` / ``from ... import`` anywhere in a module counts: at the top, inside functions (lazy
imports), and under ``if TYPE_CHECKING:`` (a type-only import still says which module knows about
which; none is needed to break a cycle, so none is exempt). A package's ``__init__.py`` is the package
itself. ``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one, else to
``pkg``. The parent package that Python runs before a submodule is not an edge: ``xlora.formats.original``
does not depend on ``xlora/formats/__init__.py`` unless it imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "xlora"


def module_files(src: Path = SRC, root: str = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module under ``src/root`` (packages by their ``__init__``)."""
    out = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module that ``name`` is or lies in (``xlora.saving.CONFIG_FILE`` -> ``xlora.saving``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path], root: str = ROOT) -> set[str]:
    """The modules of the package that ``module`` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {_owner(a.name, modules) for a in node.names if a.name.split(".")[0] == root}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..y import z
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != root:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else _owner(target, modules))
    return {m for m in found if m is not None and m != module}


def import_graph(src: Path = SRC, root: str = ROOT) -> dict[str, set[str]]:
    modules = module_files(src, root)
    return {m: imports_of(m, p, modules, root) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_src_xlora_has_no_import_cycle():
    graph = import_graph()
    assert {"xlora", "xlora.model", "xlora.saving", "xlora.formats", "xlora.serve.app"} <= set(graph)
    # the edges the layering rests on are seen (lazy and TYPE_CHECKING imports included)
    assert {"xlora.saving", "xlora.config"} <= graph["xlora.model"] and "xlora.formats" in graph["xlora.saving"]
    assert "xlora.model" in graph["xlora.pretrained"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_former_cycles_are_gone_downwards():
    """The three cycles of issue 19 item 12, each broken in the direction DESIGN.md gives."""
    g = import_graph()
    assert not {"xlora.model", "xlora.saving", "xlora", "xlora.pretrained"} & set().union(
        *(g[m] for m in g if m.startswith("xlora.formats")))  # formats return plain data
    assert "xlora.model" not in g["xlora.saving"] and "xlora.serve.app" not in g["xlora.serve.service"]
    assert "xlora.train.setup" not in g["xlora.train.fsdp"]
    assert g["xlora.serve.settings"] <= {"xlora.serve.batcher"} and g["xlora.train.errors"] == set()


def test_the_detector_finds_cycles_lazy_type_checking_and_relative(tmp_path):
    """Can fail: a synthetic package whose cycles hide in a function body, a TYPE_CHECKING block, a relative
    import and a package __init__; each is found and printed, and removing the edge clears it."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.low import X\n",
        "low.py": "X = 1\n",
        "high.py": "def f():\n    from pkg import mid\n    return mid\n",
        "mid.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import f\n",
        "sub/__init__.py": "from .leaf import Y\n",
        "sub/leaf.py": "from .. import low\nfrom pkg.sub import Y as Z\nY = 2\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.low"}, "pkg.low": set(), "pkg.high": {"pkg.mid"}, "pkg.mid": {"pkg.high"},
                     "pkg.sub": {"pkg.sub.leaf"}, "pkg.sub.leaf": {"pkg.low", "pkg.sub"}}
    assert find_cycle(graph) == ["pkg.high", "pkg.mid", "pkg.high"]
    (pkg / "mid.py").write_text("import typing\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.sub", "pkg.sub.leaf", "pkg.sub"]
    (pkg / "sub/leaf.py").write_text("from .. import low\nY = 2\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
    with pytest.raises(AssertionError, match=r"import cycle: pkg\.a -> pkg\.b -> pkg\.a"):
        cycle = find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}})
        assert cycle is None, "import cycle: " + " -> ".join(cycle)
