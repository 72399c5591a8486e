"""The compiled plan means what the expression says: run through the real pipeline
(``compile_expression`` → merge job → ``workers.pipeline.run_merge_job``), every module of the stored result
equals the expression evaluated directly on dense float64 ΔW matrices by the small interpreter below.

The interpreter shares nothing with the compiler's lowering: it reads each adapter's files, forms
ΔW = s·B·A with PEFT's rules (alpha/r, alpha/√r under rsLoRA, rank_pattern/alpha_pattern), and evaluates
the parsed expression module by module — sums, scalars, ``lerp``, ``select`` and ``svd`` (a full dense SVD,
Eckart–Young's optimum, which the factored engine must match).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.synthetic import TINY
from registry import repositories as repo
from registry.catalog import RegistryCatalog
from registry.db import session_scope
from registry.services import merges
from tests.compiler.conftest import ATTN_MODULES, Registry, build_registry
from workers.compiler import MergePlan, compile_expression
from workers.compiler import ast as A
from workers.compiler.functions import FUNCTIONS
from workers.compiler.parser import parse
from workers.engine.executor import check_executable
from workers.pipeline import run_merge_job

ADAPTERS: list[tuple[str, str, dict[str, object]]] = [
    ("code", "code", {"rank": 8, "alpha": 16, "seed": 21}),
    ("math", "math", {"rank": 6, "alpha": 3, "seed": 22}),
    ("toxic", "toxic", {"rank": 4, "alpha": 8, "seed": 23}),
    ("attn", "attn", {"rank": 5, "alpha": 10, "seed": 24, "modules": ATTN_MODULES}),
    (
        "rs",
        "rs",
        {
            "rank": 4,
            "alpha": 8,
            "seed": 25,
            "use_rslora": True,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"v_proj": 3},
        },
    ),
]
PREFIX = "base_model.model."
Deltas = dict[str, torch.Tensor]

# -- the reference interpreter ------------------------------------------------------------------------------------


def _pattern(pattern: dict[str, object], module: str, default: object) -> object:
    name = module.removeprefix(PREFIX)
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def folder_deltas(folder: Path) -> Deltas:
    """ΔW = s·B·A in float64 for each module of a PEFT folder."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            rank = int(_pattern(config.get("rank_pattern") or {}, module, config["r"]))  # type: ignore[call-overload]
            alpha = float(_pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))  # type: ignore[arg-type]
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            b = tensors[f"{module}.lora_B.weight"].double()
            deltas[module] = scale * (b @ tensors[key].double())
    return deltas


def truncate(delta: torch.Tensor, rank: int | None, energy: float | None) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = s.shape[0] if rank is None else min(rank, s.shape[0])
    if energy is not None:
        cumulative = torch.cumsum(s.square(), 0) / s.square().sum()
        keep = min(keep, int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype))) + 1)
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


class Interpreter:
    """Evaluates an expression on one module's dense deltas; ``None`` is a zero delta."""

    def __init__(self, deltas: dict[str, Deltas], module: str) -> None:
        self.deltas = deltas
        self.module = module

    def value(self, node: A.Node) -> float | torch.Tensor | None:
        if isinstance(node, A.Number):
            return float(node.value)
        if isinstance(node, A.Ref):
            return self.deltas[node.name].get(self.module)
        if isinstance(node, A.BaseModelRef):
            return None
        if isinstance(node, A.Neg):
            return _scale(self.value(node.operand), -1.0)
        if isinstance(node, A.Sum):
            total: float | torch.Tensor | None = None
            for op, item in node.items:
                total = _add(total, _scale(self.value(item), 1.0 if op == "+" else -1.0))
            return total
        if isinstance(node, A.Product):
            acc = self.value(node.items[0][1])
            for op, item in node.items[1:]:
                right = self.value(item)
                if op == "/":
                    assert isinstance(right, float)
                    acc = _scale(acc, 1.0 / right)
                else:
                    acc = _scale(right, acc) if isinstance(acc, float) else _scale(acc, right)  # type: ignore[arg-type]
            return acc
        assert isinstance(node, A.Call)
        args = [self.value(a) for a in node.args]
        kwargs = {k.name: k.value for k in node.kwargs}
        if node.name == "lerp":
            a, b, t = args
            assert isinstance(t, float)
            return _add(_scale(a, 1.0 - t), _scale(b, t))
        if node.name == "select":
            layers = kwargs.get("layers")
            modules = kwargs.get("modules")
            layer = int(re.search(r"\.layers\.(\d+)\.", self.module).group(1))  # type: ignore[union-attr]
            if isinstance(layers, A.Ref) and layer not in _layer_set(layers.name):
                return None
            if isinstance(modules, A.Ref) and not any(
                re.search(r"(^|\.)" + alt.replace(".", r"\.").replace("*", r"[^.]*") + "$", self.module)
                for alt in modules.name.split("|")
            ):
                return None
            return args[0]
        assert node.name == "svd"
        x = args[0]
        if x is None:
            return None
        rank = kwargs.get("rank")
        energy = kwargs.get("energy")
        assert isinstance(x, torch.Tensor)
        return truncate(
            x,
            int(rank.value) if isinstance(rank, A.Number) else None,
            float(energy.value) if isinstance(energy, A.Number) else None,
        )


def _layer_set(spec: str) -> set[int]:
    found: set[int] = set()
    for item in spec.split(","):
        low, _, high = item.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def _scale(value: float | torch.Tensor | None, factor: float) -> float | torch.Tensor | None:
    return None if value is None else value * factor


def _add(left: float | torch.Tensor | None, right: float | torch.Tensor | None) -> float | torch.Tensor | None:
    if left is None:
        return right
    return left if right is None else left + right


# -- running merges -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def semantic_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return build_registry(tmp_path_factory.mktemp("semantic-registry"), ADAPTERS)


@pytest.fixture(scope="module")
def reference_deltas(semantic_registry: Registry) -> dict[str, Deltas]:
    return {name: folder_deltas(semantic_registry.folders[key]) for name, key, _o in ADAPTERS}


def merge(registry: Registry, expression: str, target: str, max_rank: int = 1024) -> tuple[MergePlan, Deltas]:
    """Compile, queue and run a merge through the real pipeline; the result's ΔW per module (float64)."""
    with session_scope(registry.sessions) as session:
        plan = compile_expression(expression, RegistryCatalog(session), max_rank=max_rank)
        job = merges.create_job(session, expression, target, [], plan.model_dump(mode="json"), plan.hash())
        job_id = job.id
    outcome = run_merge_job(job_id, session_factory=registry.sessions, store=registry.store, device="cpu")
    with session_scope(registry.sessions) as session:
        version = repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id]
        config, key = dict(version.peft_config), version.artifact_key
    tensors = load_file(str(registry.store.path(key)))
    result = {}
    for name in tensors:
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            rank = int(_pattern(config.get("rank_pattern") or {}, module, config["r"]))  # type: ignore[call-overload]
            alpha = float(_pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))  # type: ignore[arg-type]
            assert alpha == rank and not config.get("use_rslora"), "the result's scale must be 1"
            result[module] = tensors[f"{module}.lora_B.weight"].double() @ tensors[name].double()
    return plan, result


def expected(deltas: dict[str, Deltas], expression: str) -> Iterator[tuple[str, torch.Tensor | None]]:
    tree = parse(expression)
    for module in sorted(TINY.modules()):
        value = Interpreter(deltas, module).value(tree)
        assert not isinstance(value, float)
        yield module, value


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - want) / max(float(torch.linalg.norm(want)), 1e-30))


CASES = [
    ("base + code - toxic", 1e-5),
    ("0.7*code + 0.3*math", 1e-5),
    ("lerp(code, math, 0.25) - toxic/2", 1e-5),
    ('select(code, layers="0") + select(math, layers="1")', 1e-5),
    ('select(code + attn, modules="q_proj|mlp.*") - 0.5*rs', 1e-5),
    ("2*code - code + attn - 3*(rs - toxic)", 1e-5),
    ("svd(code + math, rank=4)", 1e-4),
    ("svd(code - 2*rs, energy=0.9)", 1e-4),
    ('svd(select(attn, layers="1") + toxic, rank=3) + 0.5*math', 1e-4),
]


@pytest.mark.parametrize(("expression", "tolerance"), CASES, ids=[c[0] for c in CASES])
def test_the_plan_computes_the_expression(
    semantic_registry: Registry, reference_deltas: dict[str, Deltas], expression: str, tolerance: float
) -> None:
    plan, result = merge(semantic_registry, expression, f"sem{CASES.index((expression, tolerance))}")
    want = {module: value for module, value in expected(reference_deltas, expression) if value is not None}
    assert set(result) == set(want)
    for module, value in want.items():
        assert relative_error(result[module], value) <= tolerance, module
    assert {s.path for s in plan.steps} == {"factored"}


def test_max_rank_truncation_is_the_optimal_low_rank_result(
    semantic_registry: Registry, reference_deltas: dict[str, Deltas]
) -> None:
    plan, result = merge(semantic_registry, "code + math + toxic", "capped", max_rank=10)
    assert any("max_rank=10" in w for w in plan.warnings)
    for module, value in expected(reference_deltas, "svd(code + math + toxic, rank=10)"):
        assert value is not None
        assert relative_error(result[module], value) <= 1e-4, module


def test_a_cancelled_expression_gives_zero_modules(semantic_registry: Registry) -> None:
    plan, result = merge(semantic_registry, "attn - attn", "zero")
    assert plan.operands == () and set(result) == set(ATTN_MODULES)
    assert all(torch.count_nonzero(delta) == 0 for delta in result.values())


def test_every_function_in_the_table_lowers_to_programs_the_executor_runs(semantic_registry: Registry) -> None:
    """The compiler/engine contract: one example per table entry, each accepted by the executor's kind check."""
    examples = [
        "ties(code, math, density=0.5)",
        "dare(code, math, density=0.5, seed=3)",
        "dare_ties(code, math, density=0.5, seed=3)",
        "magnitude_prune(code, density=0.5)",
        "svd(code + math, rank=4)",
        "lerp(code, math, 0.3)",
        'select(code, layers="0")',
        "orth(code, against=(math,))",
    ]
    assert {e.split("(")[0] for e in examples} == set(FUNCTIONS), "add an example for every new function"
    with session_scope(semantic_registry.sessions) as session:
        catalog = RegistryCatalog(session)
        for expression in examples:
            check_executable(compile_expression(expression, catalog))
