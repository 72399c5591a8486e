"""The compiler is pure Python: it imports the standard library, lark and pydantic, and nothing else —
stricter than the import-linter contract (which lists forbidden packages), and without importing it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

COMPILER = Path(__file__).parents[2] / "workers" / "compiler"
ALLOWED = {"lark", "pydantic", "workers"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_compiler_imports_only_the_standard_library_lark_and_pydantic() -> None:
    sources = sorted(COMPILER.glob("*.py"))
    assert sources
    for path in sources:
        outside = {root for root in imported_roots(path) if root not in sys.stdlib_module_names} - ALLOWED
        assert not outside, f"{path.name} imports {outside}"
        workers = {
            node.module
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workers")
        }
        assert all(module.startswith("workers.compiler") for module in workers), f"{path.name}: {workers}"
