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

from workers.compiler.plan import MergePlan, ModuleStep
from workers.engine.kernels import concat_factors, truncate_factors
from workers.engine.peft_config import peft_config
from workers.engine.reader import OperandReader
from workers.engine.writer import TORCH_DTYPES, PeftFolderWriter

Progress = Callable[[int, int], None]


class Cancelled(Exception):
    """The caller asked to stop; nothing was written."""


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


def _run_step(
    step: ModuleStep, reader: OperandReader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    if not step.terms:
        # Everything cancelled: a rank-1 zero module keeps the folder loadable and the delta exactly zero.
        zeros_b = torch.zeros(step.out_features, 1, device=device)
        return zeros_b, torch.zeros(1, step.in_features, device=device), 0.0, 0.0
    terms = []
    for term in step.terms:
        b, a = reader.factors(term.operand, step.module)
        terms.append((term.coefficient, b, a))
    b, a = concat_factors(terms)
    if step.truncate_to is not None:
        cut = truncate_factors(b, a, step.truncate_to)
        return cut.b, cut.a, cut.kept_energy, cut.total_energy
    return b, a, 0.0, 0.0


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
    device = device or pick_device()
    started = time.perf_counter()
    writer = PeftFolderWriter(out_dir, TORCH_DTYPES[plan.dtype])
    kept = total = 0.0
    try:
        with torch.inference_mode(), OperandReader(operand_paths, device) as reader:
            for index, step in enumerate(plan.steps):
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"cancelled before module {index + 1} of {len(plan.steps)}")
                b, a, step_kept, step_total = _run_step(step, reader, device)
                writer.add_module(step.module, b, a)
                kept, total = kept + step_kept, total + step_total
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
        retained_energy=1.0 if total == 0.0 else kept / total,
    )
