"""`pip install` gives a working package: every third-party module that fvdm imports at module
level (so importing that module fails without it) is one of pyproject.toml's dependencies."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declared_dependencies() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    names = re.findall(r'"([A-Za-z0-9_.-]+)', block)
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names}


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported by statements that run on import (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_module_level_imports_are_declared_dependencies():
    declared = declared_dependencies()
    dists = packages_distributions()
    missing = {}
    for path in sorted((ROOT / "python" / "fvdm").rglob("*.py")):
        for name in module_level_imports(path) - set(sys.stdlib_module_names) - {"fvdm", "__future__"}:
            provided_by = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(name, [name])}
            if not provided_by & declared:
                missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"
