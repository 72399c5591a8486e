"""The dense path: form a module's ΔW in fp32 on the worker's device, and re-factor a dense ΔW to low rank.

Non-linear strategies (TIES, DARE, …) need ΔW itself. It is formed here from LoRA factors (fp16/bf16 are
upcast, products accumulate in fp32), handed to a strategy kernel, and re-factored to the target rank with
a randomized SVD (Halko, Martinsson & Tropp 2011, algorithm 4.4: range finder with subspace iteration).
A full SVD of ΔW is never taken: the work is a few ``ΔW @ (n × ℓ)`` products and the QR/SVD of
``ℓ``-column matrices, with ``ℓ = rank + oversampling``.

The retained energy is exact for what is returned: the result is ``P·ΔW`` for an orthogonal projector
``P``, so ``‖ΔW − PΔW‖² = ‖ΔW‖² − ‖PΔW‖²``, and ``‖ΔW‖_F`` is computed from ΔW itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from workers.engine.blocks import blocks
from workers.engine.kernels import Truncation, column_basis, rank_for_energy
from workers.engine.rng import gaussian_test_matrix

LOW_RETAINED_ENERGY = 0.5
"""Below this share of ΔW's energy kept by a re-factoring, plans and reports should warn: the rank is too
small for what the strategy produced (TIES/DARE outputs are generally far from low-rank)."""

DEFAULT_POWER_ITERATIONS = 2
"""Subspace iterations. With the default oversampling the Frobenius error stays within 1% of the optimal
(Eckart–Young) error on TIES/DARE outputs of low-rank adapters; see ``tests/engine/test_kernels_dense.py``."""

_ENERGY_START_RANK = 32


def default_oversampling(rank: int) -> int:
    """Extra columns of the range finder: ``max(10, rank)`` (ℓ = 2·rank for ranks ≥ 10)."""
    return max(10, rank)


def as_fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def form_delta(b: Tensor, a: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · (B @ A)`` as a dense fp32 tensor on ``b``'s device (fp16/bf16 factors are upcast first).

    The scale multiplies the product, so ``form_delta(b, a, s) + form_delta(b, a, −s)`` is exactly zero.
    """
    delta = as_fp32(b) @ as_fp32(a).to(b.device)
    if scale != 1.0:
        delta.mul_(scale)
    return delta


def dense_linear(terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``Σ cᵢ·Xᵢ`` in fp32, summed in the given order, without modifying the inputs. ``terms`` must not be empty."""
    if not terms:
        raise ValueError("dense_linear needs at least one term")
    (first_c, first), *rest = terms
    out = as_fp32(first) * first_c if first_c != 1.0 or first.dtype != torch.float32 else first.clone()
    for coefficient, x in rest:
        out.add_(as_fp32(x), alpha=coefficient)
    return out


def frobenius_sq(x: Tensor) -> float:
    """``‖x‖²_F``, accumulated in fp64 block by block (no fp64 copy of ``x``)."""
    flat = x.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for span in blocks(flat.numel(), x.device):
        total += torch.linalg.vector_norm(flat[span], dtype=torch.float64).square()
    return float(total)


def _truncation(left: Tensor, s: Tensor, vh: Tensor, rank: int, total: float) -> Truncation:
    """Keep ``rank`` of the SVD ``left · diag(s) · vh``, √Σ on each side."""
    keep = min(rank, s.shape[0])
    root = torch.sqrt(s[:keep])
    kept = float(s[:keep].double().square().sum())
    return Truncation(left[:, :keep] * root, root[:, None] * vh[:keep], kept, total, spectrum=s)


def _orthonormal(y: Tensor) -> Tensor:
    q: Tensor = torch.linalg.qr(y).Q
    return q


def _range_basis(delta: Tensor, width: int, power_iterations: int, seed: int) -> Tensor:
    """Orthonormal ``m × width`` basis approximating ΔW's dominant column space (subspace iteration)."""
    omega = gaussian_test_matrix(delta.shape[1], width, seed=seed, device=delta.device)
    q = _orthonormal(delta @ omega)
    for _ in range(power_iterations):
        q = _orthonormal(delta @ _orthonormal(delta.T @ q))
    return q


def _exact_small(delta: Tensor, rank: int, total: float) -> Truncation:
    """Exact truncation when one side of ΔW is small (``min(m, n) ≤ 2ℓ``): SVD of the thin QR factor."""
    if delta.shape[0] >= delta.shape[1]:
        q, r = torch.linalg.qr(delta)  # ΔW = Q R, R = U Σ Vᵀ
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return _truncation(q @ u, s, vh, rank, total)
    q, r = torch.linalg.qr(delta.T)  # ΔW = Rᵀ Qᵀ, R = U Σ Vᵀ, so ΔW = V Σ (Q U)ᵀ
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    return _truncation(vh.T, s, (q @ u).T, rank, total)


def refactor(
    delta: Tensor,
    rank: int,
    *,
    oversampling: int | None = None,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    seed: int = 0,
) -> Truncation:
    """Rank-``rank`` factors ``(B, A)`` of a dense ``m × n`` ΔW, ``B @ A ≈ ΔW``, with √Σ split across both.

    Randomized SVD: ``Y = ΔW Ω`` (Ω Gaussian ``n × ℓ``, drawn on the CPU from ``seed`` so every device uses the
    same Ω), ``power_iterations`` rounds of re-orthonormalised subspace iteration, then the exact SVD of the
    small ``ℓ × n`` matrix ``QᵀΔW`` (through its QR: an ``ℓ × ℓ`` SVD). When ``min(m, n) ≤ 2ℓ`` the thin side
    is small enough for an exact SVD of its QR factor instead. ``retained`` is exact for the returned factors
    (see the module docstring).
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    delta = as_fp32(delta)
    total = frobenius_sq(delta)
    width = rank + (default_oversampling(rank) if oversampling is None else oversampling)
    if min(delta.shape) <= 2 * width:
        return _exact_small(delta, rank, total)
    q = _range_basis(delta, width, power_iterations, seed)
    # SVD of the ℓ × n matrix QᵀΔW through the QR of its transpose: only an ℓ × ℓ SVD remains.
    q2, r2 = torch.linalg.qr((q.T @ delta).T)  # QᵀΔW = R₂ᵀ Q₂ᵀ
    u, s, vh = torch.linalg.svd(r2.T, full_matrices=False)
    return _truncation(q @ u, s, vh @ q2.T, rank, total)


def refactor_to_energy(
    delta: Tensor,
    energy: float,
    *,
    max_rank: int | None = None,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    seed: int = 0,
) -> Truncation:
    """The smallest-rank factors keeping at least ``energy`` of ‖ΔW‖² (capped at ``max_rank``).

    Tries ranks 32, 64, 128, … with :func:`refactor`, stopping at the first whose kept singular values reach
    the target; the rank is then cut to the smallest that still does. With a cap, the result is the cap's
    truncation when the target needs more.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    delta = as_fp32(delta)
    limit = min(delta.shape) if max_rank is None else min(max_rank, min(delta.shape))
    rank = min(_ENERGY_START_RANK, limit)
    while True:
        cut = refactor(delta, rank, power_iterations=power_iterations, seed=seed)
        if cut.retained >= energy or rank >= limit:
            break
        rank = min(rank * 2, limit)
    assert cut.spectrum is not None
    kept_rank = cut.b.shape[1]
    needed = min(rank_for_energy(cut.spectrum.square(), cut.total_energy, energy), kept_rank)
    if needed == kept_rank:
        return cut
    kept = float(cut.spectrum[:needed].double().square().sum())
    return Truncation(cut.b[:, :needed], cut.a[:needed], kept, cut.total_energy, spectrum=cut.spectrum)


def orth_dense(delta: Tensor, against: Sequence[Tensor], *, rtol: float = 1e-6) -> Tensor:
    """``(I − QQᵀ)·ΔW``: ΔW with the column spaces of the ``against`` B factors projected out (O-LoRA)."""
    delta = as_fp32(delta)
    basis = column_basis(against, rtol=rtol)
    if basis is None:
        return delta.clone()
    return delta - basis @ (basis.T @ delta)


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F`` (0 when both are zero, ∞ when only ``exact`` is)."""
    denominator = math.sqrt(frobenius_sq(exact))
    numerator = math.sqrt(frobenius_sq(as_fp32(approx) - as_fp32(exact)))
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator
