"""The function table: complete entries, examples that compile, and a positive and a negative case file
entry for every function; the parser knows no function name."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.compiler.test_cases import CASES
from workers.compiler import FUNCTIONS, CompileError, MergePlan
from workers.compiler.functions import REQUIRED

Compile = Callable[..., MergePlan]
COMPILER = Path(__file__).parents[2] / "workers" / "compiler"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_entry_is_documented_and_typed(name: str) -> None:
    spec = FUNCTIONS[name]
    assert spec.name == name and spec.doc.endswith(".") and spec.example.startswith(name)
    for param in spec.params:
        assert param.doc and param.type in ("adapter", "adapters", "float", "int", "str", "bool")
        if param.default is not REQUIRED and param.default is not None:
            assert isinstance(param.default, bool | int | float | str)
        if param.type in ("float", "int") and param.low is not None and param.high is not None:
            assert param.low <= param.high
    assert spec.signature().startswith(f"{name}(")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_example_compiles(compile_: Compile, name: str) -> None:
    plan = compile_(FUNCTIONS[name].example)
    assert plan.steps


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_function_has_positive_and_negative_cases(name: str) -> None:
    calls = [case for _id, case in CASES if re.search(rf"(^|[^a-z_]){name}\(", case["expr"])]
    assert any("error" not in case for case in calls), f"no positive case for {name}"
    assert any("error" in case for case in calls), f"no negative case for {name}"


def test_the_grammar_and_parser_name_no_function() -> None:
    for path in (COMPILER / "grammar.lark", COMPILER / "parser.py"):
        source = path.read_text(encoding="utf-8")
        for name in FUNCTIONS:
            assert not re.search(rf"[\"']{name}[\"']", source), f"{path.name} names {name}"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_an_unknown_keyword_lists_the_parameters(compile_: Compile, name: str) -> None:
    spec = FUNCTIONS[name]
    with pytest.raises(CompileError) as caught:
        compile_(f"{name}(code, nonsense=1)")
    error = caught.value
    assert error.code in ("unknown_keyword", "missing_argument", "arity")
    if error.code == "unknown_keyword":
        assert all(p.name in error.message for p in spec.params)
