"""Limits give clear errors, never a ``RecursionError``: length, nesting, operand count; and long but legal
expressions compile without deep recursion."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from registry.catalog import RegistryCatalog
from tests.compiler.conftest import build_registry
from workers.compiler import CompileError, MergePlan, compile_expression
from workers.compiler.parser import MAX_DEPTH, MAX_SOURCE_CHARS
from workers.compiler.resolve import MAX_OPERANDS

Compile = Callable[..., MergePlan]
ONE_MODULE = {"base_model.model.model.layers.0.self_attn.q_proj": (8, 8)}


@contextmanager
def shallow_stack(headroom: int) -> Iterator[None]:
    """Run with only ``headroom`` frames of stack left: proves a pass does not recurse per token."""
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + headroom)
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def expect(compile_: Compile, text: str, code: str) -> CompileError:
    with pytest.raises(CompileError) as caught:
        compile_(text)
    assert caught.value.code == code, caught.value.render()
    return caught.value


def test_text_over_the_limit_is_refused(compile_: Compile) -> None:
    text = "code + " * (MAX_SOURCE_CHARS // 7 + 1) + "math"
    assert len(text) > MAX_SOURCE_CHARS
    error = expect(compile_, text, "too_long")
    assert str(MAX_SOURCE_CHARS) in error.message and error.span.column == MAX_SOURCE_CHARS + 1


def test_a_long_flat_sum_compiles_without_recursing(compile_: Compile) -> None:
    text = "+".join(["code", "math"] * 999)  # 9 990 characters, 1 998 terms
    assert len(text) <= MAX_SOURCE_CHARS
    with shallow_stack(120):
        plan = compile_(text)
    assert plan.normalized == "999*code@2 + 999*math@1"


def test_a_long_run_of_signs_compiles_without_recursing(compile_: Compile) -> None:
    with shallow_stack(120):
        assert compile_("-" * 5001 + "code").normalized == "-code@2"
        assert compile_("+-" * 2500 + "code").normalized == "code@2"


def test_nesting_up_to_the_limit_compiles(compile_: Compile) -> None:
    assert compile_("(" * MAX_DEPTH + "code" + ")" * MAX_DEPTH).normalized == "code@2"
    nested = "svd(" * (MAX_DEPTH - 1) + "code + math" + ", rank=4)" * (MAX_DEPTH - 1)
    plan = compile_(nested)
    assert plan.steps[0].rank == 4
    assert MergePlan.model_validate_json(plan.model_dump_json()).hash() == plan.hash()


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_DEPTH + 1) + "code" + ")" * (MAX_DEPTH + 1),
        "svd(" * (MAX_DEPTH + 1) + "code" + ", rank=4)" * (MAX_DEPTH + 1),
        "-(" * 3000 + "code" + ")" * 3000,
        "(" * 5000,
    ],
    ids=["parentheses", "calls", "signs and parentheses", "unclosed"],
)
def test_nesting_over_the_limit_is_refused(compile_: Compile, text: str) -> None:
    error = expect(compile_, text, "too_deep")
    opened = [i for i, char in enumerate(text) if char == "("]
    assert error.span.start == opened[MAX_DEPTH]  # the first parenthesis over the limit
    assert str(MAX_DEPTH) in error.message


def test_parentheses_inside_quotes_do_not_count(compile_: Compile) -> None:
    error = expect(compile_, '"' + "(" * 100 + '"', "unknown_adapter")
    assert error.span.column == 1


SMALL_LIMIT = 8


@pytest.fixture(scope="module")
def bulk_catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryCatalog]:
    """One adapter with SMALL_LIMIT + 1 versions (one tiny module each)."""
    root: Path = tmp_path_factory.mktemp("bulk")
    adapters = [
        ("bulk", f"v{i}", {"rank": 1, "alpha": 1, "seed": i, "modules": ONE_MODULE}) for i in range(SMALL_LIMIT + 1)
    ]
    registry = build_registry(root, adapters)
    session = registry.sessions()
    yield RegistryCatalog(session)
    session.close()


def test_the_operand_limit_is_256() -> None:
    assert MAX_OPERANDS == 256


def test_more_operands_than_the_limit_are_refused(
    bulk_catalog: RegistryCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal, with the limit patched down to SMALL_LIMIT: registering 257 versions would cost seconds
    of DB work per test run, and the mechanism does not depend on the number."""
    monkeypatch.setattr("workers.compiler.resolve.MAX_OPERANDS", SMALL_LIMIT)
    refs = [f"bulk@{n}" for n in range(1, SMALL_LIMIT + 2)]
    plan = compile_expression(" + ".join(refs[:SMALL_LIMIT]), bulk_catalog)
    assert len(plan.operands) == SMALL_LIMIT and plan.steps[0].rank == SMALL_LIMIT
    text = " + ".join(refs)
    with pytest.raises(CompileError) as caught:
        compile_expression(text, bulk_catalog)
    assert caught.value.code == "too_many_operands"
    assert caught.value.span.start == text.index(refs[-1])
    assert f"more than {SMALL_LIMIT} distinct adapters" in caught.value.message
    # Referring to the same versions again and again is not more operands.
    assert len(compile_expression(" + ".join(refs[:3] * 100), bulk_catalog).operands) == 3
