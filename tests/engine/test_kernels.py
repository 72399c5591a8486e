"""The factored kernels (workers/engine/kernels.py) and the factored analysis (workers/engine/analysis.py).

Everything is checked against the dense computation in float64: ΔW = B @ A formed here, full SVDs of small
matrices, brute-force counts.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.analysis import (
    analyze_module,
    cosine_matrix,
    cosine_similarity,
    effective_rank,
    factored_inner,
    factored_norm,
    sign_conflicts,
    stable_rank,
)
from workers.engine.dense import orth_dense
from workers.engine.kernels import (
    column_basis,
    concat_factors,
    orth_factors,
    singular_values,
    truncate_factors,
    truncate_factors_to_energy,
)


def factors(
    seed: int, out_f: int, in_f: int, rank: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out_f, rank, generator=g) * 0.02
    a = torch.randn(rank, in_f, generator=g) / in_f**0.5
    return b.to(dtype), a.to(dtype)


def dense(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.double() @ a.double()


# -- linear combination and truncation ----------------------------------------------------------------------


def test_concat_upcasts_half_precision_and_is_exact() -> None:
    b1, a1 = factors(1, 24, 16, 4, torch.bfloat16)
    b2, a2 = factors(2, 24, 16, 3, torch.float16)
    b, a = concat_factors([(0.5, b1, a1), (-2.0, b2, a2)])
    assert b.dtype == a.dtype == torch.float32 and b.shape == (24, 7) and a.shape == (7, 16)
    expected = 0.5 * dense(b1, a1) - 2.0 * dense(b2, a2)
    assert torch.allclose(dense(b, a), expected, atol=1e-7)


def test_a_minus_a_truncates_to_nothing() -> None:
    b, a = factors(3, 40, 30, 6)
    cb, ca = concat_factors([(1.0, b, a), (-1.0, b, a)])
    cut = truncate_factors(cb, ca, 4)
    assert float(torch.linalg.norm(dense(cut.b, cut.a))) <= 1e-6 * float(torch.linalg.norm(dense(b, a)))


def test_spectrum_is_that_of_the_product() -> None:
    b, a = factors(4, 50, 35, 9)
    expected = torch.linalg.svdvals(dense(b, a))[:9]
    assert torch.allclose(singular_values(b, a).double(), expected, rtol=1e-4, atol=1e-9)
    spectrum = truncate_factors(b, a, 3).spectrum
    assert spectrum is not None and torch.allclose(spectrum.double(), expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("energy", [0.3, 0.8, 0.95, 1.0])
def test_truncation_to_energy_keeps_the_smallest_sufficient_rank(energy: float) -> None:
    b, a = factors(5, 60, 45, 12)
    b = b * torch.logspace(0, -1.5, 12)
    sigma2 = torch.linalg.svdvals(dense(b, a)).square()
    share = torch.cumsum(sigma2, 0) / sigma2.sum()
    expected = int(torch.nonzero(share >= energy - 1e-6)[0]) + 1
    cut = truncate_factors_to_energy(b, a, energy)
    assert cut.rank in (expected, expected + 1)  # fp32 vs fp64 at an exact boundary
    assert cut.retained >= energy - 1e-5
    assert truncate_factors_to_energy(b, a, energy, max_rank=2).rank == min(2, cut.rank)


def test_truncation_to_energy_rejects_out_of_range() -> None:
    b, a = factors(6, 8, 8, 2)
    with pytest.raises(ValueError):
        truncate_factors_to_energy(b, a, 0.0)
    with pytest.raises(ValueError):
        truncate_factors_to_energy(b, a, 1.5)


# -- orth (O-LoRA) ----------------------------------------------------------------------------------------


def test_column_basis_ignores_duplicates_and_rank_deficiency() -> None:
    b1, _ = factors(7, 64, 8, 5)
    b2, _ = factors(8, 64, 8, 3)
    deficient = b1[:, :2] @ torch.randn(2, 4)  # 4 columns spanning 2 directions inside span(b1)
    basis = column_basis([b1, b2, b1, deficient])
    assert basis is not None and basis.shape == (64, 8)
    assert torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-5)
    projected = torch.cat([b1, b2], 1) - basis @ (basis.T @ torch.cat([b1, b2], 1))
    assert float(projected.abs().max()) <= 1e-6
    assert column_basis([]) is None and column_basis([torch.zeros(64, 3)]) is None


def test_orth_projects_out_the_other_column_spaces() -> None:
    b, a = factors(9, 64, 48, 6)
    others = [factors(10 + i, 64, 48, 4)[0] for i in range(3)]
    nb, na = orth_factors(b, a, others)
    assert nb.shape == b.shape and torch.equal(na, a)
    for other in others:
        assert float((other.T @ nb).abs().max()) <= 1e-6 * float(other.abs().max() * b.abs().max()) * 64
    again, _ = orth_factors(nb, na, others)  # a projection: idempotent
    assert torch.allclose(again, nb, atol=1e-7)
    # Factored and dense agree.
    assert torch.allclose(dense(nb, na).float(), orth_dense(b.double() @ a.double(), others).float(), atol=1e-7)


def test_orth_against_nothing_is_identity_and_against_itself_is_zero() -> None:
    b, a = factors(11, 32, 16, 4)
    same_b, same_a = orth_factors(b, a, [])
    assert torch.equal(same_b, b) and torch.equal(same_a, a)
    zero_b, _ = orth_factors(b, a, [b])
    assert float(zero_b.abs().max()) <= 1e-6 * float(b.abs().max())


# -- analysis -------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    out_f=st.integers(1, 40),
    in_f=st.integers(1, 40),
    r1=st.integers(1, 8),
    r2=st.integers(1, 8),
)
def test_factored_inner_and_cosine_equal_dense(seed: int, out_f: int, in_f: int, r1: int, r2: int) -> None:
    b1, a1 = factors(seed, out_f, in_f, r1)
    b2, a2 = factors(seed + 1, out_f, in_f, r2)
    d1, d2 = dense(b1, a1), dense(b2, a2)
    inner = float((d1 * d2).sum())
    scale = float(d1.norm() * d2.norm())
    assert factored_inner(b1, a1, b2, a2) == pytest.approx(inner, abs=1e-12 + 1e-9 * scale)
    assert factored_norm(b1, a1) == pytest.approx(float(d1.norm()), rel=1e-9)
    assert cosine_similarity((b1, a1), (b2, a2)) == pytest.approx(inner / scale, abs=1e-9)


def test_cosine_of_correlated_adapters_and_the_matrix() -> None:
    b, a = factors(12, 64, 64, 8)
    nb, na = factors(13, 64, 64, 8)
    mixed = (torch.cat([b, 0.5 * nb], 1), torch.cat([a, na], 0))
    cos = cosine_similarity((b, a), mixed)
    d, m = dense(b, a), dense(*mixed)
    assert cos == pytest.approx(float((d * m).sum() / (d.norm() * m.norm())), abs=1e-9)
    assert cosine_similarity((b, a), (-b, a)) == pytest.approx(-1.0, abs=1e-9)
    assert cosine_similarity((b, a), (torch.zeros_like(b), a)) == 0.0
    matrix = cosine_matrix([(b, a), (nb, na), mixed])
    assert torch.allclose(matrix, matrix.T) and torch.allclose(matrix.diagonal(), torch.ones(3, dtype=torch.float64))
    assert float(matrix[0, 2]) == pytest.approx(cos, abs=1e-12)


def test_effective_and_stable_rank() -> None:
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert stable_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(1.5)
    assert stable_rank(torch.zeros(2)) == 0.0
    b, a = factors(14, 48, 40, 6)
    s = singular_values(b, a)
    assert 1.0 <= effective_rank(s) <= 6.0 + 1e-9 and 1.0 <= stable_rank(s) <= 6.0 + 1e-9


def test_sign_conflicts_match_a_brute_force_count() -> None:
    g = torch.Generator().manual_seed(15)
    deltas = [torch.randn(30, 20, generator=g) for _ in range(3)]
    deltas[1][deltas[1].abs() < 0.5] = 0.0  # some zeros, so overlaps vary
    found = sign_conflicts(deltas)
    stacked = torch.stack(deltas)
    positive, negative = (stacked > 0).sum(0), (stacked < 0).sum(0)
    assert found.total == 600
    assert found.overlapping == int(((positive + negative) >= 2).sum())
    assert found.conflicting == int(((positive > 0) & (negative > 0)).sum())
    assert 0.0 < found.rate < 1.0
    # A negative weight flips one input's signs: agreement becomes conflict.
    same = [deltas[0], deltas[0].clone()]
    assert sign_conflicts(same).rate == 0.0 and sign_conflicts(same, [1.0, -1.0]).rate == 1.0
    trimmed = sign_conflicts(deltas, density=0.1)
    assert trimmed.overlapping < found.overlapping


def test_analyze_module() -> None:
    operands = [factors(20 + i, 40, 24, 4) for i in range(3)]
    report = analyze_module(operands, conflict_density=0.5)
    assert len(report.norms) == 3 and report.cosines.shape == (3, 3)
    assert all(1.0 <= r <= 4.0 + 1e-9 for r in report.effective_ranks)
    assert report.conflicts is not None and report.conflicts.total == 40 * 24
    assert 0.0 <= report.max_abs_cosine <= 1.0
    assert math.isclose(report.norms[0], float(dense(*operands[0]).norm()), rel_tol=1e-9)
    assert analyze_module(operands[:1]).max_abs_cosine == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_factored_kernels_on_cuda_match_cpu() -> None:
    b, a = factors(30, 256, 192, 24)
    cpu = truncate_factors(b, a, 8)
    gpu = truncate_factors(b.cuda(), a.cuda(), 8)
    assert torch.allclose((gpu.b @ gpu.a).cpu(), cpu.b @ cpu.a, atol=1e-6)
    others = [factors(31, 256, 192, 4)[0]]
    nb, _ = orth_factors(b.cuda(), a.cuda(), [o.cuda() for o in others])
    assert torch.allclose(nb.cpu(), orth_factors(b, a, others)[0], atol=1e-6)
