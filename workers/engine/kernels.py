"""Merge kernels: small pure functions over tensors (fp32 in, fp32 out), device-agnostic.

Conventions follow PEFT: a LoRA module is ``B @ A`` with ``B: (out, r)`` and ``A: (r, in)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def concat_factors(terms: Sequence[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The exact linear combination Σ cᵢ·Bᵢ@Aᵢ, kept factored.

    Returns ``B' = [c₁B₁ … cₙBₙ]`` and ``A' = [A₁; …; Aₙ]`` so that ``B' @ A' = Σ cᵢ Bᵢ Aᵢ`` exactly; the rank
    is the sum of ranks. ``terms`` must not be empty.
    """
    b = torch.cat([coefficient * b_i for coefficient, b_i, _a in terms], dim=1)
    a = torch.cat([a_i for _c, _b, a_i in terms], dim=0)
    return b, a


@dataclass(frozen=True)
class Truncation:
    """A rank-``rank`` factorisation and the share of ΔW's energy (squared Frobenius norm) it keeps."""

    b: Tensor
    a: Tensor
    kept_energy: float
    total_energy: float

    @property
    def retained(self) -> float:
        return 1.0 if self.total_energy == 0.0 else self.kept_energy / self.total_energy


def truncate_factors(b: Tensor, a: Tensor, rank: int) -> Truncation:
    """Best rank-``rank`` approximation of ``b @ a`` (Eckart–Young) without forming it.

    QR of ``b`` and of ``aᵀ`` reduce the problem to the small ``R×R`` core ``R_b R_aᵀ``; its SVD gives the
    singular values of ``b @ a``. √Σ is split across both factors so neither dominates in fp16.
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = min(rank, s.shape[0])
    root = torch.sqrt(s[:keep])
    new_b = (q_b @ u[:, :keep]) * root
    new_a = (root[:, None] * vh[:keep]) @ q_a.T
    energy = s.square()
    return Truncation(new_b, new_a, float(energy[:keep].sum()), float(energy.sum()))
