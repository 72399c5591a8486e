"""The cost model: bytes read, FLOPs, peak working memory, and the device class to queue the plan on.

Estimates, not measurements — good to the right order of magnitude, which is what routing needs:

- **bytes read**: each operand's factors for each module it appears in (``rank·(out+in)·itemsize``),
  read once per step;
- **FLOPs**: factored linear combinations scale the concatenated B (``out·R``); ``svd`` does two thin QRs
  and a small core SVD (``2(out+in)R² + 10R³`` plus rebuilding the factors); ``orth`` a QR of the basis
  and a projection; dense kinds form each input's ΔW (``2·out·in·r``), run the kernel (``~20·out·in`` per
  input) and re-factor with a randomized SVD (``~12·out·in·(k+10)``);
- **peak bytes**: the largest single step's fp32 working set (the executor holds one module at a time);
- **device class**: ``gpu`` when the plan has dense steps and more than :data:`GPU_FLOPS` FLOPs,
  else ``cpu`` (factored merges are memory-bound and cheap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workers.compiler.plan import (
    Cost,
    DareNode,
    DareTiesNode,
    LinearNode,
    MagnitudePruneNode,
    ModuleStep,
    Node,
    OperandNode,
    OrthNode,
    SvdNode,
    TiesNode,
    operand_nodes,
)

GPU_FLOPS = 1e11
"""Above this many FLOPs of dense work, a plan is routed to a GPU worker."""
FP32 = 4
_KERNEL_FLOPS_PER_ENTRY = 20
_OVERSAMPLE = 10
_POWER_ITERATIONS = 2


@dataclass(frozen=True)
class _Estimate:
    rank: int
    flops: float
    work_bytes: float


class _StepCost:
    def __init__(self, out_features: int, in_features: int) -> None:
        self.out = out_features
        self.inp = in_features

    def estimate(self, node: Node) -> _Estimate:
        out, inp = self.out, self.inp
        if isinstance(node, OperandNode):
            return _Estimate(node.rank, out * node.rank, FP32 * (out + inp) * node.rank)
        if isinstance(node, LinearNode):
            rank, flops, work = 0, 0.0, 0.0
            for _c, term in node.terms:  # operand terms inline: linear nodes can have hundreds of them
                if isinstance(term, OperandNode):
                    rank += term.rank
                    flops += out * term.rank
                    work += FP32 * (out + inp) * term.rank
                else:
                    part = self.estimate(term)
                    rank, flops, work = rank + part.rank, flops + part.flops, work + part.work_bytes
            rank = max(1, rank)
            return _Estimate(rank, flops + out * rank, work + FP32 * (out + inp) * rank)
        if isinstance(node, SvdNode):
            inner = self.estimate(node.input)
            r = inner.rank
            keep = min(r, node.rank or r)
            flops = 2.0 * (out + inp) * r * r + 10.0 * r**3 + 2.0 * (out + inp) * r * keep
            return _Estimate(keep, inner.flops + flops, inner.work_bytes + 2 * FP32 * (out + inp) * r)
        if isinstance(node, OrthNode):
            inner = self.estimate(node.input)
            others = [self.estimate(a) for a in node.against]
            basis = sum(o.rank for o in others)
            flops = 2.0 * out * basis * basis + 4.0 * out * basis * inner.rank
            work = inner.work_bytes + sum(o.work_bytes for o in others) + FP32 * out * basis
            return _Estimate(inner.rank, inner.flops + sum(o.flops for o in others) + flops, work)
        inputs = [node.input] if isinstance(node, MagnitudePruneNode) else [n for _w, n in node.inputs]
        assert isinstance(node, MagnitudePruneNode | TiesNode | DareNode | DareTiesNode)
        parts = [self.estimate(n) for n in inputs]
        dense = float(out * inp)
        k = node.refactor_rank
        flops = sum(p.flops + 2.0 * dense * p.rank for p in parts)
        flops += _KERNEL_FLOPS_PER_ENTRY * dense * len(parts)
        flops += (2 * _POWER_ITERATIONS + 2) * 2.0 * dense * (k + _OVERSAMPLE)
        work = max(p.work_bytes for p in parts) + FP32 * dense * (len(parts) + 3)
        return _Estimate(k, flops, work)


def estimate_cost(steps: Sequence[ModuleStep], itemsizes: Sequence[int]) -> Cost:
    """The plan's cost; ``itemsizes[i]`` is the bytes per element of operand i's stored factors."""
    bytes_read = 0
    flops = 0.0
    peak = 0.0
    dense = False
    # Modules often share one program object (see ``lower.ProgramMemo``): its width-independent sums are
    # computed once, keyed by identity (the steps hold every program alive, so ids are not reused).
    shared: dict[int, tuple[int, int] | None] = {}
    for step in steps:
        width = step.out_features + step.in_features
        program = step.program
        key = id(program)
        if key not in shared:
            shared[key] = _flat_sums(program, itemsizes)
        flat = shared[key]
        if flat is not None:
            # The common flat case, inline: plans can hold hundreds of thousands of terms.
            rank, weighted = flat
            bytes_read += width * weighted
            flops += 2.0 * step.out_features * rank
            peak = max(peak, 2.0 * FP32 * width * rank)
            continue
        seen: set[int] = set()
        for node in operand_nodes(program):
            if node.operand not in seen:
                seen.add(node.operand)
                bytes_read += node.rank * width * itemsizes[node.operand]
        found = _StepCost(step.out_features, step.in_features).estimate(program)
        flops += found.flops
        peak = max(peak, found.work_bytes)
        dense = dense or step.path == "dense"
    return Cost(
        bytes_read=bytes_read,
        flops=int(flops),
        peak_bytes=int(peak),
        device_class="gpu" if dense and flops > GPU_FLOPS else "cpu",
    )


def _flat_sums(program: Node, itemsizes: Sequence[int]) -> tuple[int, int] | None:
    """For a linear node over operand leaves only: (Σ rank, Σ rank·itemsize); else None.

    Terms of a flat linear node are distinct operands (like terms are collected), so each is read once.
    """
    if not isinstance(program, LinearNode):
        return None
    rank = weighted = 0
    for _c, node in program.terms:
        if not isinstance(node, OperandNode):
            return None
        rank += node.rank
        weighted += node.rank * itemsizes[node.operand]
    return rank, weighted
