"""``graft plan`` (the dry run) and ``graft functions``, as a new user would try them — with typos."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from api.cli import app
from bench.synthetic import write_demo_adapters
from workers.compiler import FUNCTIONS

Graft = Callable[..., Result]


@pytest.fixture(scope="module")
def graft(tmp_path_factory: pytest.TempPathFactory) -> Graft:
    """The CLI over an embedded home with the demo adapters (code, math, toxic) registered."""
    root = tmp_path_factory.mktemp("dry-run")
    patch = pytest.MonkeyPatch()
    patch.setenv("GRAFT_HOME", str(root / "home"))
    patch.delenv("GRAFT_DATABASE_URL", raising=False)
    runner = CliRunner()

    def run(*args: str, expect: int = 0) -> Result:
        result = runner.invoke(app, list(args))
        assert result.exit_code == expect, f"exit {result.exit_code}\nstdout:{result.stdout}\nstderr:{result.stderr}"
        return result

    for folder in write_demo_adapters(root / "adapters"):
        run("register", str(folder), "--name", folder.name)
    yield run  # type: ignore[misc]
    patch.undo()


def test_plan_shows_the_normalized_expression_operands_ranks_cost_and_hash(graft: Graft) -> None:
    out = graft("plan", "base + code - 0.5*toxic").stdout
    assert "normalized  code@1 - 0.5*toxic@1" in out
    assert "code@1  weight 1" in out and "toxic@1  weight -0.5" in out
    assert "14 (14 factored, 0 dense)" in out
    assert "q_proj" in out and "64x64" in out and "16" in out  # the module table: kind, shape, rank
    assert "device cpu" in out and "plan hash" in out


def test_plan_json_is_the_plan_with_its_hash(graft: Graft) -> None:
    data = json.loads(graft("plan", "ties(0.7*code, 0.3*math, density=0.5)", "--json").stdout)
    assert data["plan_version"] == 1 and data["strategy"] == "ties"
    assert len(data["plan_hash"]) == 64 and data["cost"]["device_class"] in ("cpu", "gpu")
    assert data["steps"][0]["path"] == "dense" and data["steps"][0]["program"]["kind"] == "ties"


def test_plan_shows_warnings(graft: Graft) -> None:
    out = graft("plan", "code - code").stdout
    assert "warning:" in out and "cancels out" in out


@pytest.mark.parametrize(
    ("expression", "code", "hint", "underlined"),
    [
        ("0.7*math + 0.3*mathh", "unknown_adapter", "did you mean 'math'?", "mathh"),
        ("tie(code, math, density=0.5)", "unknown_function", "did you mean 'ties'?", "tie"),
        ("ties(code, math, densty=0.5)", "unknown_keyword", "did you mean 'density'?", "densty"),
        ("ties(code, math, density=1.5)", "out_of_bounds", "(0, 1]", "1.5"),
        ("code * math", "type_error", "multiply an adapter by a number", "math"),
        ("code@7", "unknown_version", "it has 1", "code@7"),
        ("code +", "syntax", "ends too early", ""),
    ],
)
def test_errors_show_a_caret_and_a_suggestion(
    graft: Graft, expression: str, code: str, hint: str, underlined: str
) -> None:
    lines = graft("plan", expression, expect=2).stderr.splitlines()
    assert lines[0].startswith(f"error[{code}]:") and hint in lines[0]
    assert lines[1] == f"  {expression}"
    caret = lines[2]
    start = caret.index("^")
    if underlined:
        assert lines[1][start:].startswith(underlined) and caret.count("^") == len(underlined)


def test_functions_lists_the_table(graft: Graft) -> None:
    out = graft("functions").stdout
    for spec in FUNCTIONS.values():
        assert spec.signature() in out and spec.example in out
    assert "density" in out and "(0, 1]" in out
    data = json.loads(graft("functions", "--json").stdout)
    assert {f["name"] for f in data} == set(FUNCTIONS)
    ties = next(f for f in data if f["name"] == "ties")
    density = next(p for p in ties["params"] if p["name"] == "density")
    assert density == {
        "name": "density",
        "type": "float",
        "required": True,
        "default": None,
        "bounds": "(0, 1]",
        "choices": None,
        "doc": density["doc"],
    }


def test_plan_runs_nothing(graft: Graft, tmp_path: Path) -> None:
    graft("plan", "svd(code + math, rank=4)")
    listed = {row["adapter"] for row in json.loads(graft("list", "--json").stdout)}
    assert listed == {"code", "math", "toxic"}
