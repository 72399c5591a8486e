"""1×1 conv modules in plans: the kernel rides on each step, Linear plans keep their JSON and hashes byte for
byte, and a module that is a conv in one operand but a Linear in another is a compile error with a caret.

The registry here is real (SQLite, Alembic, ``register_folder``) with adapters over the tiny Llama layout whose
``q_proj`` modules are stored as 1×1 Conv2d LoRA (4-D factors); the compiler only sees the module rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator

import pytest

from bench.synthetic import TINY
from registry.catalog import RegistryCatalog
from tests.compiler.conftest import Registry, build_registry
from workers.compiler import CompileError, MergePlan, compile_expression
from workers.compiler.plan import (
    Cost,
    LinearNode,
    ModuleStep,
    OperandNode,
    PlannedOperand,
    TiesNode,
)

Compile = Callable[..., MergePlan]
CONV = tuple(name for name in TINY.modules() if name.endswith("q_proj"))
ADAPTERS: list[tuple[str, str, dict[str, object]]] = [
    ("conv_a", "conv_a", {"rank": 8, "alpha": 16, "seed": 21, "conv_modules": CONV}),
    ("conv_b", "conv_b", {"rank": 4, "alpha": 4, "seed": 22, "conv_modules": CONV}),
    ("lin", "lin", {"rank": 8, "alpha": 16, "seed": 23}),
    (
        "conv_v",  # v_proj only, as Linear: no clash with the conv q_proj modules
        "conv_v",
        {"rank": 2, "alpha": 2, "seed": 24, "modules": {n: s for n, s in TINY.modules().items() if "v_proj" in n}},
    ),
]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return build_registry(tmp_path_factory.mktemp("conv-registry"), ADAPTERS)


@pytest.fixture(scope="module")
def compile_(registry: Registry) -> Iterator[Compile]:
    session = registry.sessions()
    catalog = RegistryCatalog(session)

    def run(text: str, *, max_rank: int = 1024) -> MergePlan:
        return compile_expression(text, catalog, max_rank=max_rank)

    yield run
    session.close()


def kernels(plan: MergePlan) -> dict[str, tuple[int, int] | None]:
    return {step.module: step.kernel for step in plan.steps}


def expected_kernels() -> dict[str, tuple[int, int] | None]:
    return {name: (1, 1) if name in CONV else None for name in TINY.modules()}


def canonical_hash(plan: MergePlan) -> str:
    """sha256 of the canonical JSON, encoded in one go (what `MergePlan.hash` builds piecewise)."""
    payload = plan.canonical_payload()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize(
    "expression",
    ["conv_a - conv_b", "svd(conv_a + conv_b, rank=4)", "ties(conv_a, conv_b, density=0.5)", "conv_a + conv_v"],
)
def test_conv_modules_carry_their_kernel_into_the_steps(compile_: Compile, expression: str) -> None:
    plan = compile_(expression)
    assert kernels(plan) == expected_kernels()
    data = plan.model_dump(mode="json")
    for step in data["steps"]:
        if step["module"] in CONV:
            assert step["kernel"] == [1, 1]
        else:
            assert "kernel" not in step  # a Linear step's JSON is what it always was
    restored = MergePlan.model_validate(json.loads(json.dumps(data)))
    assert restored == plan and restored.hash() == plan.hash()
    assert MergePlan.model_validate_json(plan.model_dump_json()) == plan


def test_the_kernel_is_hashed_before_the_program(compile_: Compile) -> None:
    plan = compile_("conv_a - conv_b")
    steps = plan.canonical_payload()["steps"]
    assert isinstance(steps, list)
    for row, step in zip(steps, plan.steps, strict=True):
        assert (row[5] == [1, 1]) == (step.module in CONV) and len(row) == (7 if step.module in CONV else 6)
    assert plan.hash() == canonical_hash(plan)  # the piecewise hash is the hash of the canonical JSON
    as_linear = plan.model_copy(update={"steps": tuple(s.model_copy(update={"kernel": None}) for s in plan.steps)})
    assert as_linear.hash() != plan.hash()


def test_an_all_zero_result_keeps_the_kernels(compile_: Compile) -> None:
    plan = compile_("conv_a - conv_a")
    assert all(step.program == LinearNode() for step in plan.steps)
    assert kernels(plan) == expected_kernels()


def test_linear_plans_have_no_kernel_anywhere(compile_: Compile) -> None:
    plan = compile_("lin - 0.5*conv_v")
    assert all(step.kernel is None for step in plan.steps)
    assert '"kernel"' not in plan.model_dump_json() and "kernel" not in json.dumps(plan.model_dump(mode="json"))


def test_a_linear_plan_hash_and_json_are_pinned() -> None:
    """A hand-built Linear plan, hashed and dumped; the values were taken before conv modules existed."""
    operands = (
        PlannedOperand(ref="a@1", adapter="a", version=1, version_id=1, sha256="a" * 64, weight=1.0),
        PlannedOperand(ref="b@1", adapter="b", version=1, version_id=2, sha256="b" * 64, weight=-0.5),
    )
    a, b = OperandNode(operand=0, scale=2.0, rank=4), OperandNode(operand=1, scale=1.0, rank=4)
    common = {"out_features": 8, "in_features": 6}
    steps = (
        ModuleStep(
            module="base_model.model.x.q",
            **common,
            path="factored",
            rank=8,
            program=LinearNode(terms=((1.0, a), (-0.5, b))),
        ),
        ModuleStep(
            module="base_model.model.x.v",
            **common,
            path="dense",
            rank=4,
            program=TiesNode(inputs=((1.0, a), (1.0, b)), density=0.5, refactor_rank=4),
        ),
    )
    plan = MergePlan(
        expression="a - 0.5*b",
        normalized="a@1 - 0.5*b@1",
        strategy="linear",
        base_model="m",
        dtype="F32",
        task_type=None,
        max_rank=1024,
        operands=operands,
        steps=steps,
        cost=Cost(bytes_read=1, flops=2, peak_bytes=3, device_class="cpu"),
    )
    assert plan.hash() == "9e5780e96951c493fd9daa8f1abe895dfd249c3342d98f33beaad6d7eea2ca33"
    dumped = plan.model_dump_json().encode()
    assert hashlib.sha256(dumped).hexdigest() == "783c788462110aa3e84c141334fcb5986d606678f89278311c05281d4fc9aa29"
    conv = plan.model_copy(update={"steps": (steps[0].model_copy(update={"kernel": (1, 1)}), steps[1])})
    assert conv.hash() != plan.hash() and b'"kernel":[1,1]' in conv.model_dump_json().encode()


@pytest.mark.parametrize(
    ("expression", "column", "this", "that"),
    [
        ("conv_a + 0.5*lin", 14, "a Linear layer in lin@1", "a 1×1 Conv2d in conv_a@1"),
        ("lin - conv_b", 7, "a 1×1 Conv2d in conv_b@1", "a Linear layer in lin@1"),
        ("ties(conv_a, lin, density=0.5)", 14, "a Linear layer in lin@1", "a 1×1 Conv2d in conv_a@1"),
    ],
)
def test_a_conv_and_a_linear_module_of_one_name_do_not_mix(
    compile_: Compile, expression: str, column: int, this: str, that: str
) -> None:
    with pytest.raises(CompileError) as caught:
        compile_(expression)
    error = caught.value
    assert error.code == "kernel_mismatch" and error.column == column
    assert f"is {this} but {that}" in error.message and "different architectures" in error.message
    name = expression[column - 1 :].split(",")[0].split(" ")[0].split("*")[-1]
    rendered = error.render().splitlines()
    assert rendered[0].startswith("error[kernel_mismatch]: module 'base_model.model.model.layers.0.self_attn.q_proj'")
    assert rendered[1:] == [f"  {expression}", "  " + " " * (column - 1) + "^" * len(name)]
