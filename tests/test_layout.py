"""The package keeps its shape: rooms of one concept, and data flowing one way (cli -> wings -> core)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "xlora"
WINGS = ("train", "serve", "analysis", "demo")
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "assets" not in p.parts)


def dotted(path: Path) -> str:
    parts = ("xlora", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``xlora...`` module imported anywhere in ``path`` (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xlora"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from xlora import demo` style
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("xlora"))
    return found


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def test_no_module_outgrows_its_room():
    big = {dotted(p): n for p in modules() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert big == {}, f"modules over {MAX_MODULE_LINES} lines: split them by concept"


@pytest.mark.parametrize("wing", ["serve", "train"])
def test_no_long_function_in_the_wings_that_change_most(wing):
    long = {}
    for path in sorted((SRC / wing).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{dotted(path)}:{node.lineno} {node.name}"] = n
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines: give each step its own function"


def test_data_flows_one_way():
    """The core imports no wing; train, serve and analysis never import each other (the demo, an
    application like the CLI, may use them); only the CLI (cli, commands) and ``__main__`` sit above all."""
    wrong = []
    for path in modules():
        me = dotted(path)
        if me in ("xlora.cli", "xlora.commands", "xlora.__main__"):
            continue
        mine = wing_of(me)
        for target in imports(path):
            other = wing_of(target)
            if target in ("xlora.cli", "xlora.commands") or (other is not None and other != mine and mine != "demo"):
                wrong.append(f"{me} imports {target}")
    assert wrong == []


def test_the_layout_checks_can_fail(tmp_path):
    """The checks above see what they must: a long function, a big module and a wrong import."""
    bad = tmp_path / "bad.py"
    bad.write_text("from xlora.serve.app import create_app\n" + "def f():\n" + "    x = 1\n" * 70)
    assert "xlora.serve.app" in imports(bad)
    tree = ast.parse(bad.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert fn.end_lineno - fn.lineno + 1 == 71 > MAX_FUNCTION_LINES
    assert wing_of("xlora.serve.app") == "serve" and wing_of("xlora.model") is None
