"""Merge kernels on factored (low-rank) modules: small pure functions over tensors, device-agnostic.

Conventions follow PEFT: a LoRA module is ``B @ A`` with ``B: (out, r)`` and ``A: (r, in)``. Nothing here
forms ``B @ A``: the cost is ``O((out + in)·R²)`` for a rank-``R`` input. Inputs may be fp16/bf16; the
arithmetic is fp32. Dense (non-linear) kernels live in :mod:`workers.engine.strategies` and
:mod:`workers.engine.dense`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def concat_factors(terms: Sequence[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The exact linear combination Σ cᵢ·Bᵢ@Aᵢ, kept factored.

    Returns ``B' = [c₁B₁ … cₙBₙ]`` and ``A' = [A₁; …; Aₙ]`` so that ``B' @ A' = Σ cᵢ Bᵢ Aᵢ`` exactly; the rank
    is the sum of ranks. ``terms`` must not be empty.
    """
    b = torch.cat([coefficient * _fp32(b_i) for coefficient, b_i, _a in terms], dim=1)
    a = torch.cat([_fp32(a_i) for _c, _b, a_i in terms], dim=0)
    return b, a


@dataclass(frozen=True)
class Truncation:
    """A rank-``rank`` factorisation and the share of ΔW's energy (squared Frobenius norm) it keeps.

    ``spectrum`` holds the singular values the truncation saw, descending (all of them on the factored path,
    the ℓ leading estimates on the randomized dense path), when known.
    """

    b: Tensor
    a: Tensor
    kept_energy: float
    total_energy: float
    spectrum: Tensor | None = None

    @property
    def retained(self) -> float:
        return 1.0 if self.total_energy == 0.0 else min(1.0, self.kept_energy / self.total_energy)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class _Core:
    """``B @ A = Q_b · core · Q_aᵀ`` with orthonormal ``Q_b``, ``Q_a`` and a small ``core = R_b R_aᵀ``."""

    q_b: Tensor
    q_a: Tensor
    u: Tensor
    s: Tensor
    vh: Tensor


def _core_svd(b: Tensor, a: Tensor) -> _Core:
    q_b, r_b = torch.linalg.qr(_fp32(b))
    q_a, r_a = torch.linalg.qr(_fp32(a).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return _Core(q_b, q_a, u, s, vh)


def _cut(core: _Core, keep: int) -> Truncation:
    root = torch.sqrt(core.s[:keep])
    new_b = (core.q_b @ core.u[:, :keep]) * root
    new_a = (root[:, None] * core.vh[:keep]) @ core.q_a.T
    energy = core.s.double().square()
    return Truncation(new_b, new_a, float(energy[:keep].sum()), float(energy.sum()), spectrum=core.s)


def truncate_factors(b: Tensor, a: Tensor, rank: int) -> Truncation:
    """Best rank-``rank`` approximation of ``b @ a`` (Eckart–Young) without forming it.

    QR of ``b`` and of ``aᵀ`` reduce the problem to the small ``R×R`` core ``R_b R_aᵀ``; its SVD gives the
    singular values of ``b @ a``. √Σ is split across both factors so neither dominates in fp16.
    """
    core = _core_svd(b, a)
    return _cut(core, min(rank, core.s.shape[0]))


def truncate_factors_to_energy(b: Tensor, a: Tensor, energy: float, *, max_rank: int | None = None) -> Truncation:
    """The smallest rank keeping at least ``energy`` of ‖B@A‖²_F (at most ``max_rank``), exactly, factored."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    core = _core_svd(b, a)
    squared = core.s.double().square()
    keep = rank_for_energy(squared, float(squared.sum()), energy)
    if max_rank is not None:
        keep = min(keep, max_rank)
    return _cut(core, max(1, min(keep, core.s.shape[0])))


def rank_for_energy(squared: Tensor, total: float, energy: float) -> int:
    """Smallest ``r ≥ 1`` with ``Σ_{i<r} squared[i] ≥ energy · total`` (``squared`` = σ², descending), else ``len``."""
    if total <= 0.0 or squared.numel() == 0:
        return 1
    reached = torch.nonzero(torch.cumsum(squared.double(), 0) >= energy * total)
    return int(reached[0]) + 1 if reached.numel() else int(squared.shape[0])


def singular_values(b: Tensor, a: Tensor) -> Tensor:
    """The singular values of ``b @ a`` (descending, ``min(R, out, in)`` of them), from the ``R×R`` core."""
    return _core_svd(b, a).s


def column_basis(factors: Sequence[Tensor], *, rtol: float = 1e-6) -> Tensor | None:
    """An orthonormal basis (``out × k``) of the span of the columns of ``factors`` (B factors), or ``None`` if empty.

    QR of the stacked factors, then the SVD of the small ``R`` factor drops directions whose singular value
    is below ``rtol`` times the largest, so duplicated or rank-deficient factors do not add spurious
    directions to the basis.
    """
    columns = [_fp32(f) for f in factors if f.numel()]
    if not columns:
        return None
    stacked = torch.cat(columns, dim=1)
    q, r = torch.linalg.qr(stacked)
    u, s, _vh = torch.linalg.svd(r, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    keep = int(torch.count_nonzero(s > rtol * s[0]))
    basis: Tensor = q @ u[:, :keep]
    return basis


def orth_factors(b: Tensor, a: Tensor, against: Sequence[Tensor], *, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """O-LoRA projection, factored: ``((I − QQᵀ)B, A)`` with ``Q`` a basis of the ``against`` B factors' columns.

    The result's column space is orthogonal to every ``against`` adapter's, so ``Bᵢᵀ B' = 0`` and the
    new update cannot move the outputs the others write to (reference §6.7). The rank is unchanged.
    """
    b = _fp32(b)
    basis = column_basis(against, rtol=rtol)
    if basis is None:
        return b.clone(), _fp32(a)
    return b - basis @ (basis.T @ b), _fp32(a)
