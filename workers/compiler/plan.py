"""The plan IR: what the engine runs. Frozen, versioned, JSON-serialisable, with a canonical hash.

A plan pins every operand to a version id and content hash, so running it again is reproducible and
its hash is a cache key. Each step describes one output module and the path that computes it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PLAN_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlannedOperand(_Frozen):
    """A pinned operand and its overall weight in the expression."""

    ref: str
    adapter: str
    version: int
    version_id: int
    sha256: str
    weight: float


class Term(_Frozen):
    """``coefficient · B @ A`` of one operand's module; the coefficient already includes the LoRA scale."""

    operand: int
    coefficient: float
    rank: int


class ModuleStep(_Frozen):
    module: str
    out_features: int
    in_features: int
    path: Literal["factored"] = "factored"
    terms: tuple[Term, ...]
    rank: int = Field(description="Output rank of this module after the step.")
    truncate_to: int | None = Field(default=None, description="Rank cap applied by QR+SVD truncation.")


class MergePlan(_Frozen):
    plan_version: int = PLAN_VERSION
    expression: str
    normalized: str
    strategy: str = "linear"
    base_model: str
    dtype: str
    task_type: str | None
    operands: tuple[PlannedOperand, ...]
    steps: tuple[ModuleStep, ...]
    warnings: tuple[str, ...] = ()

    def canonical_payload(self) -> dict[str, object]:
        """What the hash covers: the semantics, not the spelling (operand order, like terms, layout)."""
        weights: dict[str, float] = {}
        for op in self.operands:
            weights[op.sha256] = weights.get(op.sha256, 0.0) + op.weight
        steps = [
            {
                "m": s.module,
                "t": sorted((self.operands[t.operand].sha256, _canon(t.coefficient)) for t in s.terms),
                "cap": s.truncate_to,
            }
            for s in sorted(self.steps, key=lambda s: s.module)
        ]
        return {
            "v": self.plan_version,
            "strategy": self.strategy,
            "base": self.base_model,
            "dtype": self.dtype,
            "operands": sorted((sha, _canon(w)) for sha, w in weights.items() if _canon(w) != 0.0),
            "steps": steps,
        }

    def hash(self) -> str:
        blob = json.dumps(self.canonical_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _canon(value: float) -> float:
    """Round away float noise (0.1 + 0.2) so that equal expressions hash alike."""
    return float(f"{value:.12g}") + 0.0  # + 0.0 turns -0.0 into 0.0
