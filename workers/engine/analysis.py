"""Interference analysis between adapters, module by module, mostly without forming ΔW.

- Inner products, norms and cosines in factored form: ``⟨B₁A₁, B₂A₂⟩_F = tr((B₁ᵀB₂)(A₂A₁ᵀ))``, which costs
  ``O((out + in)·r₁·r₂)`` instead of ``O(out·in·r)``. The small Gram products are taken in fp64.
- Singular values from the ``R×R`` QR core (:func:`workers.engine.kernels.singular_values`), hence the
  entropy effective rank (Roy & Vetterli 2007) and the stable rank.
- The sign-conflict rate TIES would see needs the dense ΔW (on request only).

``graft analyze`` and the plan's warnings build on :func:`analyze_module`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.engine.blocks import blocks
from workers.engine.kernels import singular_values
from workers.engine.strategies import trim

Factors = tuple[Tensor, Tensor]
"""``(B, A)`` with ``B @ A`` the module's ΔW (scale already folded in)."""


def factored_inner(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> float:
    """``⟨B₁A₁, B₂A₂⟩_F = tr((B₁ᵀB₂)(A₂A₁ᵀ)) = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)``, without forming either product."""
    left = b1.to(torch.float64).T @ b2.to(device=b1.device, dtype=torch.float64)
    right = a1.to(torch.float64) @ a2.to(device=a1.device, dtype=torch.float64).T
    return float((left * right).sum())


def factored_norm(b: Tensor, a: Tensor) -> float:
    """``‖B A‖_F``, factored."""
    return math.sqrt(max(0.0, factored_inner(b, a, b, a)))


def cosine_similarity(first: Factors, second: Factors) -> float:
    """Cosine of the angle between two ΔW (Frobenius inner product), factored; 0 when either is zero."""
    norms = factored_norm(*first) * factored_norm(*second)
    if norms == 0.0:
        return 0.0
    return factored_inner(*first, *second) / norms


def cosine_matrix(operands: Sequence[Factors]) -> Tensor:
    """The symmetric ``n × n`` matrix of pairwise cosines (fp64, CPU), one Gram computation per pair."""
    n = len(operands)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = factored_inner(*operands[i], *operands[j])
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    outer = norms[:, None] * norms[None, :]
    return torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1.0), 0.0)


def effective_rank(s: Tensor) -> float:
    """Entropy effective rank ``exp(−Σ pᵢ log pᵢ)``, ``pᵢ = σᵢ / Σσ`` (Roy & Vetterli); 0 for a zero matrix."""
    s = s.double().clamp(min=0.0)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(s: Tensor) -> float:
    """``‖·‖²_F / ‖·‖²₂ = Σσ² / σ₁²``; 0 for a zero matrix."""
    s = s.double()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    return float(s.square().sum() / s[0] ** 2)


@dataclass(frozen=True)
class SignConflicts:
    """Of the entries where at least two inputs are non-zero (``overlapping``), how many disagree in sign."""

    overlapping: int
    conflicting: int
    total: int

    @property
    def rate(self) -> float:
        return 0.0 if self.overlapping == 0 else self.conflicting / self.overlapping


def sign_conflicts(
    deltas: Sequence[Tensor], weights: Sequence[float] | None = None, *, density: float = 1.0
) -> SignConflicts:
    """The sign conflicts TIES would see: trim each weighted ΔW at ``density``, then count, entry by entry."""
    ws = [1.0] * len(deltas) if weights is None else list(weights)
    kept = [trim(d, density, w).reshape(-1) for d, w in zip(deltas, ws, strict=True)]
    overlapping = conflicting = 0
    first = kept[0]
    for span in blocks(first.numel(), first.device):
        positive = torch.zeros(span.stop - span.start, dtype=torch.int32, device=first.device)
        negative = torch.zeros_like(positive)
        for part in kept:
            block = part[span]
            positive.add_(block > 0)
            negative.add_(block < 0)
        overlapping += int(torch.count_nonzero((positive + negative) >= 2))
        conflicting += int(torch.count_nonzero((positive > 0) & (negative > 0)))
    return SignConflicts(overlapping, conflicting, first.numel())


@dataclass(frozen=True)
class ModuleAnalysis:
    norms: tuple[float, ...]
    cosines: Tensor
    """``n × n`` pairwise cosine similarities (fp64)."""
    effective_ranks: tuple[float, ...]
    stable_ranks: tuple[float, ...]
    conflicts: SignConflicts | None = None

    @property
    def max_abs_cosine(self) -> float:
        n = self.cosines.shape[0]
        if n < 2:
            return 0.0
        off = self.cosines - torch.diag(torch.diagonal(self.cosines))
        return float(off.abs().max())


def analyze_module(
    operands: Sequence[Factors],
    *,
    conflict_density: float | None = None,
    weights: Sequence[float] | None = None,
) -> ModuleAnalysis:
    """Norms, pairwise cosines and ranks of the operands' ΔW in one module (factored); with
    ``conflict_density``, also the sign-conflict rate TIES would see at that density (forms ΔW)."""
    spectra = [singular_values(b, a) for b, a in operands]
    conflicts = None
    if conflict_density is not None and len(operands) >= 2:
        deltas = [b.float() @ a.float() for b, a in operands]
        conflicts = sign_conflicts(deltas, weights, density=conflict_density)
    return ModuleAnalysis(
        norms=tuple(factored_norm(b, a) for b, a in operands),
        cosines=cosine_matrix(operands),
        effective_ranks=tuple(effective_rank(s) for s in spectra),
        stable_ranks=tuple(stable_rank(s) for s in spectra),
        conflicts=conflicts,
    )
