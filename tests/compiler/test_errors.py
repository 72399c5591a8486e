"""Error rendering (caret under the span, on the right line) and version tags through a tag-aware catalog."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from registry.catalog import RegistryCatalog
from tests.compiler.conftest import Registry
from workers.compiler import CompileError, MergePlan, compile_expression
from workers.compiler.catalog import TaggedCatalog

Compile = Callable[..., MergePlan]


def error_of(compile_: Compile, text: str) -> CompileError:
    with pytest.raises(CompileError) as caught:
        compile_(text)
    return caught.value


def test_the_caret_sits_under_the_span(compile_: Compile) -> None:
    error = error_of(compile_, "0.7*math + 0.3*mathh")
    assert error.render().splitlines() == [
        "error[unknown_adapter]: unknown adapter 'mathh' (did you mean 'math'?)",
        "  0.7*math + 0.3*mathh",
        "                 ^^^^^",
    ]
    assert error.as_dict() | {"rendered": ""} == {
        "code": "unknown_adapter",
        "message": "unknown adapter 'mathh' (did you mean 'math'?)",
        "start": 15,
        "end": 20,
        "line": 1,
        "column": 16,
        "rendered": "",
    }


def test_multi_line_expressions_point_at_the_right_line(compile_: Compile) -> None:
    error = error_of(compile_, "code\n  + 0.5*mathh\n  - toxic")
    assert (error.line, error.column) == (2, 9)
    assert error.render().splitlines()[1:] == ["    + 0.5*mathh", "          ^^^^^"]


def test_an_error_at_the_end_points_past_the_text(compile_: Compile) -> None:
    error = error_of(compile_, "code +")
    assert error.render().splitlines()[1:] == ["  code +", "        ^"]


class TaggedRegistryCatalog(RegistryCatalog):
    """The registry catalog plus version tags (the registry has no tags yet; the protocol allows them)."""

    def __init__(self, registry: Registry, tags: dict[tuple[str, str], int]) -> None:
        super().__init__(registry.sessions())
        self._tags = tags

    def version_for_tag(self, name: str, tag: str) -> int | None:
        return self._tags.get((name, tag))


def test_tags_resolve_through_a_catalog_that_knows_them(registry: Registry) -> None:
    catalog = TaggedRegistryCatalog(registry, {("code", "stable"): 1, ("code", "broken"): 9})
    assert isinstance(catalog, TaggedCatalog)
    plan = compile_expression("code@stable + math", catalog)
    assert plan.normalized == "code@1 + math@1"
    assert compile_expression('code@"stable"', catalog).hash() == compile_expression("code@1", catalog).hash()
    with pytest.raises(CompileError) as caught:
        compile_expression("code@broken", catalog)  # a tag pointing at a version that does not exist
    assert caught.value.code == "unknown_version"
    with pytest.raises(CompileError) as caught:
        compile_expression("code@nightly", catalog)
    assert caught.value.code == "unknown_version" and "no version or tag 'nightly'" in caught.value.message


def test_a_catalog_without_tags_refuses_them_clearly(compile_: Compile) -> None:
    error = error_of(compile_, "code@stable")
    assert error.code == "unknown_version"
    assert "write @N, @vN or @latest (versions: 1, 2)" in error.message
