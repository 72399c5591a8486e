"""Run a :class:`MergePlan` module by module: read the factors it needs, combine, write, free.

The executor gets the plan, the operands' file paths and an output folder. It reports progress through
a callback and checks for cancellation between modules. It never touches the DB or the network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.compiler.plan import LinearNode, MergePlan, ModuleStep, Node, OperandNode, SvdNode, walk
from workers.engine.kernels import concat_factors, truncate_factors, truncate_factors_to_energy
from workers.engine.peft_config import peft_config
from workers.engine.reader import OperandReader
from workers.engine.writer import TORCH_DTYPES, PeftFolderWriter

Progress = Callable[[int, int], None]


class Cancelled(Exception):
    """The caller asked to stop; nothing was written."""


class NotExecutable(Exception):
    """The plan uses a node kind this executor cannot run yet (checked before any file is opened)."""

    code = "not_executable"


_FACTORED_KINDS = frozenset({"operand", "linear", "svd"})


@dataclass(frozen=True)
class ExecutionReport:
    weights_path: Path
    seconds: float
    modules: int
    retained_energy: float
    """Share of the exact result's energy kept overall (1.0 when nothing was truncated)."""


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), else CPU. Every kernel runs on both."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Energy:
    """Retained-energy bookkeeping across the truncations of one plan."""

    def __init__(self) -> None:
        self.kept = 0.0
        self.total = 0.0


def _factored(node: Node, module: str, reader: OperandReader, energy: _Energy) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate an operand/linear/svd program in factored form: ``(B, A)`` with ``B @ A`` = the node's ΔW."""
    if isinstance(node, OperandNode):
        b, a = reader.factors(node.operand, module)
        return node.scale * b, a
    if isinstance(node, LinearNode):
        terms = []
        for coefficient, term in node.terms:
            if isinstance(term, OperandNode):  # fold the LoRA scale into the coefficient: one multiply
                b, a = reader.factors(term.operand, module)
                terms.append((coefficient * term.scale, b, a))
            else:
                b, a = _factored(term, module, reader, energy)
                terms.append((coefficient, b, a))
        return concat_factors(terms)
    assert isinstance(node, SvdNode)
    b, a = _factored(node.input, module, reader, energy)
    if node.energy is not None:
        cut = truncate_factors_to_energy(b, a, node.energy, max_rank=node.rank)
    else:
        cut = truncate_factors(b, a, node.rank if node.rank is not None else b.shape[1])
    energy.kept += cut.kept_energy
    energy.total += cut.total_energy
    return cut.b, cut.a


def _run_step(
    step: ModuleStep, reader: OperandReader, device: torch.device, energy: _Energy
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(step.program, LinearNode) and not step.program.terms:
        # Everything cancelled: a rank-1 zero module keeps the folder loadable and the delta exactly zero.
        zeros_b = torch.zeros(step.out_features, 1, device=device)
        return zeros_b, torch.zeros(1, step.in_features, device=device)
    return _factored(step.program, step.module, reader, energy)


def check_executable(plan: MergePlan) -> None:
    """Raise :class:`NotExecutable` when a step needs a node kind this executor does not run yet."""
    for step in plan.steps:
        for node in walk(step.program):
            if node.kind not in _FACTORED_KINDS:
                raise NotExecutable(
                    f"strategy {node.kind!r} is not executable yet (module {step.module}); "
                    "only linear combinations and svd() run in this version"
                )


def execute_plan(
    plan: MergePlan,
    operand_paths: list[Path],
    out_dir: Path,
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> ExecutionReport:
    """Write the plan's result as a PEFT folder in ``out_dir``; ``operand_paths[i]`` is operand i's weights."""
    if len(operand_paths) != len(plan.operands):
        raise ValueError(f"plan has {len(plan.operands)} operands but {len(operand_paths)} paths were given")
    check_executable(plan)
    device = device or pick_device()
    started = time.perf_counter()
    writer = PeftFolderWriter(out_dir, TORCH_DTYPES[plan.dtype])
    energy = _Energy()
    try:
        with torch.inference_mode(), OperandReader(operand_paths, device) as reader:
            for index, step in enumerate(plan.steps):
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"cancelled before module {index + 1} of {len(plan.steps)}")
                b, a = _run_step(step, reader, device, energy)
                writer.add_module(step.module, b, a)
                del b, a
                if progress is not None:
                    progress(index + 1, len(plan.steps))
        metadata = {
            "format": "pt",
            "graft.expression": plan.expression,
            "graft.normalized": plan.normalized,
            "graft.plan_hash": plan.hash(),
            "graft.parents": json.dumps(
                [{"ref": o.ref, "sha256": o.sha256, "weight": o.weight} for o in plan.operands]
            ),
        }
        weights = writer.finish(peft_config(plan.base_model, plan.task_type, writer.ranks), metadata)
    except BaseException:
        writer.abort()
        raise
    return ExecutionReport(
        weights_path=weights,
        seconds=time.perf_counter() - started,
        modules=len(plan.steps),
        retained_energy=1.0 if energy.total == 0.0 else energy.kept / energy.total,
    )
