"""The layering rule of docs/architecture.md, enforced.

``fedsparse`` (core and runtime) never imports ``strategies`` or ``clients``; ``clients`` never
imports ``strategies`` and ``strategies`` never imports ``clients``. Methods are reached only
through entry points (:mod:`fedsparse.methods`). Checked two ways: every module of a package is
imported in a fresh interpreter and ``sys.modules`` must hold none of the forbidden packages, and
the source is scanned for import statements (at any depth, so a lazy import inside a function
counts too).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"fedsparse": {"strategies", "clients"}, "clients": {"strategies"}, "strategies": {"clients"}}


def _modules(package: str) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _imported_packages(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_a_package_pulls_in_no_forbidden_layer(package: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {_modules(package)!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not loaded & FORBIDDEN[package], f"importing {package} loads {sorted(loaded & FORBIDDEN[package])}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_crosses_a_layer(package: str) -> None:
    crossing = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imported_packages(path) & FORBIDDEN[package]
    }
    assert not crossing, f"imports that break the layering rule (docs/architecture.md): {crossing}"


def test_methods_are_discovered_through_entry_points() -> None:
    """Every built-in method comes from the ``fedsparse.methods`` entry points, and each one's
    client step resolves to a function in ``clients``."""
    from importlib.metadata import entry_points

    from fedsparse.methods import METHODS_GROUP, methods, train_step

    declared = {
        ep.name
        for ep in entry_points(group=METHODS_GROUP)
        if ep.dist is not None and ep.dist.metadata["Name"] == "fedsparse"
    }
    found = methods()
    assert declared and declared <= set(found)
    for name in declared:
        assert found[name].build.__module__.startswith("strategies."), name
        step = train_step(name)
        assert callable(step) and step.__module__.startswith("clients."), name
