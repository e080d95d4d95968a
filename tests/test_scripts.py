"""The scripts (benchmarks, fuzzing, the demo home) import the package lazily, inside the
functions a run reaches: a moved or renamed name breaks `make bench` only minutes into a run.
Every ``from M import N`` in them, nested ones included, must resolve."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
OURS = ("aiid_proxy", "addons")


def _imports(path: Path) -> list[tuple[str, str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in OURS:
                found += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith(OURS)]
    return found


@pytest.mark.parametrize("script", [pytest.param(p, id=p.name) for p in SCRIPTS])
def test_every_import_of_a_script_resolves(script: Path) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    missing = []
    for module, name, line in _imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{script.name}:{line}: {module}: {e}")
            continue
        if name and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")  # a submodule
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert missing == []


def test_the_scripts_import_the_package_at_all() -> None:
    """The check above has something to check."""
    assert sum(len(_imports(p)) for p in SCRIPTS) >= 5
