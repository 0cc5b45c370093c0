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


def long_functions(paths: list[Path]) -> dict[str, int]:
    """``{"file:line name": length}`` of the functions over :data:`MAX_FUNCTION_LINES` lines."""
    long = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.name}:{node.lineno} {node.name}"] = n
    return long


CLI = ("xlora.cli", "xlora.cli_flags", "xlora.commands")  # the command: nothing below may import it


def wrong_imports(named: list[tuple[str, Path]]) -> list[str]:
    """The imports of ``(module name, file)`` pairs that run against the data flow (see below)."""
    wrong = []
    for me, path in named:
        if me in (*CLI, "xlora.__main__"):
            continue
        mine = wing_of(me)
        for target in sorted(imports(path)):
            other = wing_of(target)
            if target in CLI or (other is not None and other != mine and mine != "demo"):
                wrong.append(f"{me} imports {target}")
    return wrong


@pytest.mark.parametrize("wing", ["serve", "train"])
def test_no_long_function_in_the_wings_that_change_most(wing):
    long = long_functions(sorted((SRC / wing).rglob("*.py")))
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines: give each step its own function"


def test_data_flows_one_way():
    """The core imports no wing; train, serve and analysis never import each other (the demo, an
    application like the CLI, may use them); only the CLI (cli, cli_flags, commands) and ``__main__`` sit above all."""
    assert wrong_imports([(dotted(p), p) for p in modules()]) == []


def test_the_layout_checks_can_fail(tmp_path):
    """The checks above see what they must: a long function and imports against the flow."""
    bad = tmp_path / "bad.py"
    bad.write_text("from xlora.serve.app import create_app\n" + "def f():\n" + "    x = 1\n" * 70)
    assert long_functions([bad]) == {"bad.py:2 f": 71}
    wrong = wrong_imports([("xlora.train.bad", bad), ("xlora.model", bad), ("xlora.serve.bad", bad),
                           ("xlora.demo.bad", bad)])
    assert "xlora.train.bad imports xlora.serve.app" in wrong and "xlora.model imports xlora.serve.app" in wrong
    assert {w.split(" imports ")[0] for w in wrong} == {"xlora.train.bad", "xlora.model"}  # serve, demo: allowed
