"""The case files: ``tests/compiler/cases/*.yaml``, each a list of entries compiled against the real registry.

An entry names an expression (``expr``) and either plan facts or an error:

- ``normalized``: the plan's normalised expression, exactly;
- ``strategy``, ``dtype``: the plan's fields; ``operands``: ``{ref: weight}``, the exact set;
- ``steps``: the number of module steps; ``path``: every step's path; ``root``: every program's root kind;
- ``rank``: every step's output rank, or ``{module suffix: rank}`` for the steps whose name ends so;
- ``warnings``: substrings that must each appear in some warning (``[]``: there must be no warning);
- ``same_hash`` / ``different_hash``: another expression whose plan hash must be equal / differ;
- ``max_rank``: compile with this cap (default 1024);
- ``error``: the ``CompileError`` code; ``column``: its 1-based column; ``message``: a substring of it.

Every entry also checks that the normalised expression compiles to the same hash (the canonical form is a
fixed point) and that the plan survives a JSON round trip with its hash.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.compiler import CompileError, MergePlan

Compile = Callable[..., MergePlan]

CASES_DIR = Path(__file__).parent / "cases"
PLAN_KEYS = {"normalized", "strategy", "dtype", "operands", "steps", "path", "root", "rank", "warnings"}
KEYS = PLAN_KEYS | {"expr", "same_hash", "different_hash", "max_rank", "error", "column", "message", "note"}


def load_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in sorted(CASES_DIR.glob("*.yaml")):
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert isinstance(entries, list), path
        for index, entry in enumerate(entries):
            unknown = set(entry) - KEYS
            assert not unknown, f"{path.name}[{index}]: unknown keys {unknown}"
            cases.append((f"{path.stem}[{index}] {entry['expr']!r}"[:100], entry))
    return cases


CASES = load_cases()


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", [c for _id, c in CASES], ids=[i for i, _c in CASES])
def test_case(compile_: Compile, case: dict[str, Any]) -> None:
    max_rank = case.get("max_rank", 1024)
    if "error" in case:
        with pytest.raises(CompileError) as caught:
            compile_(case["expr"], max_rank=max_rank)
        error = caught.value
        assert error.code == case["error"], error.render()
        if "column" in case:
            assert error.span.column == case["column"], error.render()
        if "message" in case:
            assert case["message"] in error.message, error.render()
        assert not (PLAN_KEYS & set(case)), "an error case states plan facts"
        return
    plan = compile_(case["expr"], max_rank=max_rank)
    check_facts(plan, case)
    again = compile_(plan.normalized, max_rank=max_rank)
    assert again.hash() == plan.hash(), f"normalized {plan.normalized!r} compiles to another plan"
    restored = MergePlan.model_validate_json(plan.model_dump_json())
    assert restored == plan and restored.hash() == plan.hash()
    if "same_hash" in case:
        assert compile_(case["same_hash"], max_rank=max_rank).hash() == plan.hash()
    if "different_hash" in case:
        assert compile_(case["different_hash"], max_rank=max_rank).hash() != plan.hash()


def check_facts(plan: MergePlan, case: dict[str, Any]) -> None:
    if "normalized" in case:
        assert plan.normalized == case["normalized"]
    for key in ("strategy", "dtype"):
        if key in case:
            assert getattr(plan, key) == case[key], key
    if "operands" in case:
        assert {op.ref: op.weight for op in plan.operands} == pytest.approx(case["operands"])
    if "steps" in case:
        assert len(plan.steps) == case["steps"]
    if "path" in case:
        assert {s.path for s in plan.steps} == {case["path"]}
    if "root" in case:
        assert {s.program.kind for s in plan.steps} == {case["root"]}
    if "rank" in case:
        wanted = case["rank"]
        if isinstance(wanted, dict):
            for suffix, rank in wanted.items():
                found = {s.rank for s in plan.steps if s.module.endswith(suffix)}
                assert found == {rank}, f"{suffix}: ranks {found}"
        else:
            assert {s.rank for s in plan.steps} == {wanted}
    if "warnings" in case:
        if not case["warnings"]:
            assert plan.warnings == ()
        for expected in case["warnings"]:
            assert any(expected in w for w in plan.warnings), plan.warnings
