"""The plan IR as the engine sees it: normal forms of the programs, pinning, canonical operand order and
hashing, JSON round trips, and the cost model."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from workers.compiler import MergePlan
from workers.compiler.cost import GPU_FLOPS, estimate_cost
from workers.compiler.plan import (
    PLAN_VERSION,
    DareNode,
    LinearNode,
    MagnitudePruneNode,
    ModuleStep,
    OperandNode,
    OrthNode,
    SvdNode,
    TiesNode,
    walk,
)

Compile = Callable[..., MergePlan]
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
K0 = "base_model.model.model.layers.0.self_attn.k_proj"


def step(plan: MergePlan, module: str) -> ModuleStep:
    return next(s for s in plan.steps if s.module == module)


def refs(plan: MergePlan, node: object) -> str:
    assert isinstance(node, OperandNode)
    return plan.operands[node.operand].ref


def test_a_linear_plan_is_a_linear_node_over_operands(compile_: Compile) -> None:
    plan = compile_("base + 0.5*code@1 - toxic")
    assert plan.plan_version == PLAN_VERSION == 1
    program = step(plan, Q0).program
    assert isinstance(program, LinearNode)
    terms = {refs(plan, node): (c, node) for c, node in program.terms}
    assert set(terms) == {"code@1", "toxic@1"}
    coefficient, code = terms["code@1"]
    assert coefficient == 0.5 and isinstance(code, OperandNode) and (code.scale, code.rank) == (2.0, 8)
    assert step(plan, Q0).path == "factored" and step(plan, Q0).rank == 16
    assert (step(plan, K0).out_features, step(plan, K0).in_features) == (32, 64)


def test_operands_are_pinned_and_sorted_by_content(compile_: Compile) -> None:
    plan = compile_("toxic + code@latest + math")
    assert [op.sha256 for op in plan.operands] == sorted(op.sha256 for op in plan.operands)
    code = next(op for op in plan.operands if op.adapter == "code")
    assert (code.version, code.ref, len(code.sha256)) == (2, "code@2", 64) and code.version_id > 0
    # The same operands spelled in another order give the very same programs (indexes follow content).
    other = compile_("math + toxic + code@2")
    assert other.operands == plan.operands and other.steps == plan.steps


def test_nested_linear_terms_are_fused_and_collected(compile_: Compile) -> None:
    plan = compile_('2*(code + 3*(math - toxic)) - 6*math + select(toxic, layers="0")')
    program = step(plan, Q0).program
    assert isinstance(program, LinearNode)
    assert {refs(plan, n): c for c, n in program.terms} == {"code@2": 2.0, "toxic@1": -5.0}


def test_a_single_call_is_the_root_and_weights_ride_on_inputs(compile_: Compile) -> None:
    plan = compile_("ties(0.7*code, 0.3*math, density=0.5, rank=6)")
    program = step(plan, Q0).program
    assert isinstance(program, TiesNode)
    assert program.density == 0.5 and program.majority == "total" and program.refactor_rank == 6
    assert sorted((w, refs(plan, n)) for w, n in program.inputs) == [(0.3, "math@1"), (0.7, "code@2")]
    assert step(plan, Q0).path == "dense" and plan.strategy == "ties"


def test_single_input_slots_unwrap_and_keep_a_weighted_linear(compile_: Compile) -> None:
    plan = compile_("svd(code, rank=2) + magnitude_prune(0.5*math, density=0.1)")
    program = step(plan, Q0).program
    assert isinstance(program, LinearNode)
    svd = next(n for _c, n in program.terms if isinstance(n, SvdNode))
    prune = next(n for _c, n in program.terms if isinstance(n, MagnitudePruneNode))
    assert isinstance(svd.input, OperandNode) and svd.rank == 2 and svd.energy is None
    assert isinstance(prune.input, LinearNode) and prune.input.terms[0][0] == 0.5


def test_orth_against_is_sorted_and_dropped_where_missing(compile_: Compile) -> None:
    plan = compile_("orth(code, against=(toxic, attn, math))")
    q_program = step(plan, Q0).program
    assert isinstance(q_program, OrthNode) and len(q_program.against) == 3
    keys = [plan.operands[n.operand].sha256 for n in q_program.against if isinstance(n, OperandNode)]
    assert keys == sorted(keys)
    k_program = step(plan, K0).program  # attn has no k_proj
    assert isinstance(k_program, OrthNode) and len(k_program.against) == 2


def test_dare_carries_its_seed_and_inputs_in_canonical_order(compile_: Compile) -> None:
    one, two = compile_("dare(code, math, density=0.3, seed=7)"), compile_("dare(math, code, density=0.3, seed=7)")
    assert one.steps == two.steps and one.hash() == two.hash()
    program = step(one, Q0).program
    assert isinstance(program, DareNode) and program.seed == 7 and program.rescale is True


def test_max_rank_wraps_a_factored_result_in_svd(compile_: Compile) -> None:
    plan = compile_("code + math", max_rank=10)
    program = step(plan, Q0).program
    assert isinstance(program, SvdNode) and program.rank == 10 and isinstance(program.input, LinearNode)
    assert plan.max_rank == 10 and step(plan, Q0).rank == 10


def test_an_empty_result_has_empty_linear_programs(compile_: Compile) -> None:
    plan = compile_("attn - attn")
    assert plan.operands == () and len(plan.steps) == 4
    assert all(s.program == LinearNode() and s.rank == 1 and s.path == "factored" for s in plan.steps)
    assert plan.warnings[0].startswith("the expression cancels out")


def test_operands_that_vanish_everywhere_are_dropped_and_reindexed(compile_: Compile) -> None:
    plan = compile_('code + select(toxic, layers="7")')
    assert [op.ref for op in plan.operands] == ["code@2"]
    assert {n.operand for s in plan.steps for n in walk(s.program) if isinstance(n, OperandNode)} == {0}
    assert plan.hash() == compile_("code").hash()


def test_lineage_weights(compile_: Compile) -> None:
    def weights(text: str) -> dict[str, float]:
        return {op.ref: op.weight for op in compile_(text).operands}

    assert weights("0.5*code - toxic") == {"code@2": 0.5, "toxic@1": -1.0}
    assert weights("ties(0.7*code, 0.3*math, density=0.5)") == {"code@2": 0.7, "math@1": 0.3}
    assert weights('2*select(code, layers="0")') == {"code@2": 2.0}
    assert weights("code + 0.5*svd(code + math, rank=2)") == {"code@2": 1.0, "math@1": 1.0}


def test_the_hash_covers_semantics_not_spelling(compile_: Compile) -> None:
    base = compile_("code - toxic")
    assert compile_("base + code - toxic").hash() == base.hash()
    assert compile_("-(toxic - code)").hash() == base.hash()
    assert compile_("code - toxic", max_rank=16).hash() == base.hash()  # the cap was not reached
    assert compile_("code - toxic", max_rank=11).hash() != base.hash()  # rank 12 is truncated
    assert compile_("code@1 - toxic").hash() != base.hash()
    assert compile_("code - 1.0000000000001*toxic").hash() == base.hash()  # within 12 significant digits
    assert compile_("code - 1.0001*toxic").hash() != base.hash()
    payload = base.canonical_payload()
    assert "code - toxic" not in json.dumps(payload)  # text, weights and warnings are not covered


def test_json_round_trip_keeps_every_node_kind(compile_: Compile) -> None:
    plan = compile_(
        "svd(ties(code, math, density=0.5) + dare(toxic, density=0.3, seed=1), rank=4)"
        " + orth(magnitude_prune(code, density=0.2), against=math)"
        " + dare_ties(code, toxic, density=0.4, seed=3)"
    )
    kinds = {node.kind for s in plan.steps for node in walk(s.program)}
    assert kinds == {"linear", "svd", "ties", "dare", "dare_ties", "orth", "magnitude_prune", "operand"}
    restored = MergePlan.model_validate(json.loads(json.dumps(plan.model_dump(mode="json"))))
    assert restored == plan and restored.hash() == plan.hash()


def test_the_cost_model(compile_: Compile) -> None:
    plan = compile_("code@1")  # rank 8, fp32: each module reads 8·(out+in)·4 bytes
    assert plan.cost.bytes_read == sum(8 * (s.out_features + s.in_features) * 4 for s in plan.steps)
    assert plan.cost.device_class == "cpu" and plan.cost.flops > 0 and plan.cost.peak_bytes > 0
    half = compile_("half")
    assert half.cost.bytes_read == plan.cost.bytes_read // 2  # fp16 factors, same ranks and shapes
    dense = compile_("ties(code, math, density=0.5)")
    assert dense.cost.flops > 50 * compile_("code + math").cost.flops
    assert dense.cost.peak_bytes > compile_("code + math").cost.peak_bytes


def test_large_dense_plans_are_routed_to_a_gpu() -> None:
    big = 4096
    leaf = OperandNode(operand=0, scale=1.0, rank=16)
    dense = ModuleStep(
        module="m",
        out_features=big,
        in_features=big,
        path="dense",
        rank=16,
        program=TiesNode(inputs=((1.0, leaf),), density=0.5, refactor_rank=16),
    )
    factored = dense.model_copy(update={"path": "factored", "program": LinearNode(terms=((1.0, leaf),))})
    assert estimate_cost([dense] * 64, [2]).device_class == "gpu"
    assert estimate_cost([dense] * 64, [2]).flops > GPU_FLOPS
    assert estimate_cost([factored] * 64, [2]).device_class == "cpu"


@pytest.mark.parametrize("max_rank", [0, -1])
def test_max_rank_must_be_positive(compile_: Compile, max_rank: int) -> None:
    with pytest.raises(ValueError):
        compile_("code", max_rank=max_rank)
