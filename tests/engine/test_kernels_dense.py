"""The dense path: exact magnitude thresholds, ΔW formation, randomized re-factoring and keyed randomness.

References are computed here independently: ``torch.topk`` for thresholds, a full ``torch.linalg.svd`` in
float64 for the optimal (Eckart–Young) truncation error, ``peft.utils.merge_utils.ties`` to produce the
realistic non-low-rank matrices that TIES hands to the re-factoring.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine import threshold as threshold_module
from workers.engine.dense import (
    LOW_RETAINED_ENERGY,
    dense_linear,
    form_delta,
    frobenius_sq,
    refactor,
    refactor_to_energy,
    relative_error,
)
from workers.engine.rng import (
    MASK_CHUNK,
    dare_generator,
    dare_keep_mask,
    gaussian_test_matrix,
    stable_seed,
)
from workers.engine.threshold import DIRECT_LIMIT, keep_count, kth_largest_abs, magnitude_threshold, topk_mask

# -- exact thresholds -------------------------------------------------------------------------------------------


def reference_kth(x: torch.Tensor, k: int) -> float:
    return float(torch.topk(x.reshape(-1).abs().float(), k).values.min())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from([1, 7, 1000, DIRECT_LIMIT + 1, 300_000]),
    fraction=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "integers", "sparse", "heavy"]),
)
def test_kth_largest_is_exact(seed: int, n: int, fraction: float, kind: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "integers":  # massive ties
        x = torch.randint(-5, 6, (n,), generator=g).float()
    elif kind == "sparse":  # mostly exact zeros, as after DARE
        x = x * (torch.rand(n, generator=g) < 0.05)
    elif kind == "heavy":  # a few huge entries
        x = x**7
    k = max(1, min(n, round(fraction * n)))
    assert float(kth_largest_abs(x, k)) == reference_kth(x, k)


@pytest.mark.parametrize("density", [1e-5, 0.01, 0.2, 0.5, 0.9, 0.99999])
def test_threshold_keeps_exactly_k_on_a_large_low_rank_delta(density: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(768, 16, generator=g) @ torch.randn(16, 1024, generator=g)  # 786k entries, structured
    k = keep_count(x.numel(), density)
    threshold = magnitude_threshold(x, density)
    assert threshold is not None and float(threshold) == reference_kth(x, k)
    mask = topk_mask(x, density)
    assert int(mask.sum()) == k  # no ties in continuous data: exactly k
    kept, dropped = x.abs()[mask], x.abs()[~mask]
    assert dropped.numel() == 0 or float(kept.min()) > float(dropped.max())


def test_ties_at_the_threshold_are_all_kept() -> None:
    x = torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.0])
    mask = topk_mask(x, 0.5)  # k = 3: 3 and three tied 2s
    assert mask.tolist() == [True, True, True, True, False, False]
    assert topk_mask(x, 0.0).sum() == 0 and topk_mask(x, 1.0).all()
    assert magnitude_threshold(x, 0.0) is None


def test_half_precision_inputs_and_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 400, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        assert float(kth_largest_abs(low, 1234)) == reference_kth(low, 1234)
    with pytest.raises(ValueError):
        kth_largest_abs(x, 0)
    with pytest.raises(ValueError):
        kth_largest_abs(x, x.numel() + 1)


@pytest.mark.parametrize("bias", ["low", "high"])
def test_a_misleading_sample_costs_time_never_exactness(monkeypatch: pytest.MonkeyPatch, bias: str) -> None:
    """Force the sample to be the smallest (or largest) entries: the counts reject the bracket, which moves."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400_000, generator=g)
    order = torch.argsort(x.abs())
    picked = order[:5000] if bias == "low" else order[-5000:]

    def biased(numel: int, count: int, device: torch.device | str | None = None) -> torch.Tensor:
        return picked[torch.arange(count) % picked.numel()].to(device or "cpu")

    monkeypatch.setattr(threshold_module, "sample_indices", biased)
    for k in (1, 1000, 200_000, 399_999):
        assert float(kth_largest_abs(x, k)) == reference_kth(x, k)


def test_keep_count_follows_peft() -> None:
    assert keep_count(10, 0.25) == 2 and keep_count(10, 1.0) == 10 and keep_count(10, 0.0) == 0
    assert keep_count(11_534_336, 0.2) == int(0.2 * 11_534_336)


# -- ΔW formation ---------------------------------------------------------------------------------------------


def test_form_delta_accumulates_in_fp32_and_cancels_exactly() -> None:
    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(64, 8, generator=g), torch.randn(8, 48, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        delta = form_delta(b.to(dtype), a.to(dtype), 0.5)
        assert delta.dtype == torch.float32
        assert relative_error(delta, 0.5 * (b.to(dtype).double() @ a.to(dtype).double())) <= 1e-6
    scale = 0.37
    assert torch.count_nonzero(form_delta(b, a, scale) + form_delta(b, a, -scale)) == 0
    total = dense_linear([(1.0, form_delta(b, a)), (-1.0, form_delta(b, a))])
    assert torch.count_nonzero(total) == 0
    with pytest.raises(ValueError):
        dense_linear([])


# -- re-factoring -------------------------------------------------------------------------------------------


def ties_output(seed: int, out_f: int, in_f: int, rank: int, count: int, density: float) -> torch.Tensor:
    """What TIES produces from ``count`` rank-``rank`` adapters: far from low-rank."""
    from peft.utils.merge_utils import ties

    g = torch.Generator().manual_seed(seed)
    deltas = [
        (torch.randn(out_f, rank, generator=g) * 0.02) @ (torch.randn(rank, in_f, generator=g) / in_f**0.5)
        for _ in range(count)
    ]
    merged: torch.Tensor = ties(deltas, torch.ones(count), density)
    return merged


def optimal_error(x: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(x.double())
    return math.sqrt(float(s[rank:].square().sum()))


@pytest.mark.parametrize(
    ("out_f", "in_f", "rank", "count", "density"),
    [(768, 512, 16, 3, 0.5), (512, 1024, 32, 4, 0.2), (1024, 384, 8, 2, 0.7)],
)
def test_refactor_error_is_within_one_percent_of_optimal(
    out_f: int, in_f: int, rank: int, count: int, density: float
) -> None:
    x = ties_output(out_f + in_f, out_f, in_f, rank, count, density)
    cut = refactor(x, rank)
    assert cut.b.shape == (out_f, rank) and cut.a.shape == (rank, in_f)
    error = math.sqrt(frobenius_sq((cut.b @ cut.a).double() - x.double()))
    assert error <= 1.01 * optimal_error(x, rank)
    # The reported energy is exact for the returned factors: ‖ΔW − BA‖² = ‖ΔW‖² − kept.
    assert cut.total_energy == pytest.approx(frobenius_sq(x.double()), rel=1e-6)
    assert error**2 == pytest.approx(cut.total_energy - cut.kept_energy, rel=1e-3)
    assert 0.0 < cut.retained < 1.0


def test_refactor_recovers_a_low_rank_matrix_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 12, generator=g) @ torch.randn(12, 700, generator=g)
    cut = refactor(x, 12)
    assert relative_error(cut.b @ cut.a, x) <= 1e-5 and cut.retained == pytest.approx(1.0, abs=1e-6)
    again = refactor(x, 12)
    assert torch.equal(again.b, cut.b) and torch.equal(again.a, cut.a)
    # √Σ on both sides: B's column norms equal A's row norms.
    assert torch.allclose(cut.b.norm(dim=0), cut.a.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize(("shape", "rank"), [((40, 900), 10), ((900, 40), 10), ((64, 64), 25)])
def test_refactor_is_exact_when_a_side_is_thin(shape: tuple[int, int], rank: int) -> None:
    """``min(m, n) ≤ 2ℓ`` (ℓ = rank + oversampling): the exact SVD of the thin QR factor, not a randomized one."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, generator=g)
    cut = refactor(x, rank)
    error = math.sqrt(frobenius_sq((cut.b @ cut.a).double() - x.double()))
    assert error == pytest.approx(optimal_error(x, rank), rel=1e-4)


def test_refactor_of_zero_and_bad_rank() -> None:
    cut = refactor(torch.zeros(300, 200), 4)
    assert cut.retained == 1.0 and torch.count_nonzero(cut.b @ cut.a) == 0
    with pytest.raises(ValueError):
        refactor(torch.ones(3, 3), 0)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_refactor_to_energy(energy: float) -> None:
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(500, 80, generator=g))
    v, _ = torch.linalg.qr(torch.randn(400, 80, generator=g))
    sigma = torch.logspace(0, -2, 80)
    x = (u * sigma) @ v.T
    cut = refactor_to_energy(x, energy)
    share = torch.cumsum(sigma.double().square(), 0) / sigma.double().square().sum()
    needed = int(torch.nonzero(share >= energy)[0]) + 1
    assert cut.retained >= energy - 1e-4
    assert needed <= cut.rank <= needed + 1
    capped = refactor_to_energy(x, energy, max_rank=3)
    assert capped.rank == 3 and capped.retained < energy


def test_low_energy_warning_threshold_is_exposed() -> None:
    assert 0.0 < LOW_RETAINED_ENERGY < 1.0
    x = ties_output(8, 256, 256, 8, 4, 0.2)
    assert refactor(x, 8).retained < LOW_RETAINED_ENERGY  # TIES outputs are far from low-rank


# -- keyed randomness ---------------------------------------------------------------------------------------


def test_chunked_masks_fill_under_the_executors_inference_mode() -> None:
    """Regression: pool threads do not inherit inference mode; a large mask used to fail inside the executor."""
    shape = (3, MASK_CHUNK // 2 + 5)
    expected = dare_keep_mask(shape, 0.3, seed=5, module="m", index=1, threads=1)
    with torch.inference_mode():
        threaded = dare_keep_mask(shape, 0.3, seed=5, module="m", index=1, threads=2)
    assert torch.equal(threaded, expected)


def test_stable_seed_and_masks_are_pinned() -> None:
    """Changing the hash, the key layout or the chunking changes every DARE mask ever produced: these values
    must never move (a deliberate change bumps ``DARE_RNG_VERSION`` and this test)."""
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    assert stable_seed("graft.dare", 1, 7, module, 2, 0) == 0x4D2B8228CC503087
    mask = dare_keep_mask((4, 8), 0.5, seed=7, module=module, index=2)
    assert mask.reshape(-1).int().tolist() == [
        0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0,
    ]  # fmt: skip
    assert stable_seed("a", 1) != stable_seed("a1") and stable_seed(1) != stable_seed("1")


def test_dare_generator_depends_on_every_part_of_the_key() -> None:
    def draw(seed: int, module: str, index: int, chunk: int = 0) -> torch.Tensor:
        return torch.rand(8, generator=dare_generator(seed, module, index, chunk))

    base = draw(1, "m.q", 0)
    assert torch.equal(base, draw(1, "m.q", 0))
    for other in (draw(2, "m.q", 0), draw(1, "m.k", 0), draw(1, "m.q", 1), draw(1, "m.q", 0, 1)):
        assert not torch.equal(base, other)


def test_dare_masks_are_deterministic_chunked_and_thread_independent() -> None:
    shape = (3, MASK_CHUNK // 2 + 5)  # spans two chunks
    one = dare_keep_mask(shape, 0.3, seed=5, module="m", index=1, threads=1)
    many = dare_keep_mask(shape, 0.3, seed=5, module="m", index=1, threads=4)
    assert one.shape == shape and torch.equal(one, many)
    fraction = float(one.float().mean())
    n = one.numel()
    assert abs(fraction - 0.3) <= 5 * math.sqrt(0.3 * 0.7 / n)
    assert dare_keep_mask((4, 4), 1.0, seed=0, module="m", index=0).all()
    assert not dare_keep_mask((4, 4), 0.0, seed=0, module="m", index=0).any()


def test_gaussian_test_matrix_is_seeded() -> None:
    assert torch.equal(gaussian_test_matrix(20, 5, seed=1), gaussian_test_matrix(20, 5, seed=1))
    assert not torch.equal(gaussian_test_matrix(20, 5, seed=1), gaussian_test_matrix(20, 5, seed=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_path_on_cuda_agrees_with_cpu() -> None:
    x = ties_output(9, 768, 512, 16, 3, 0.5)
    assert float(kth_largest_abs(x.cuda(), 1000)) == reference_kth(x, 1000)
    cpu, gpu = refactor(x, 16), refactor(x.cuda(), 16)
    assert relative_error((gpu.b @ gpu.a).cpu(), cpu.b @ cpu.a) <= 1e-4
    mask = dare_keep_mask((512, 512), 0.3, seed=1, module="m", index=0, device="cuda")
    assert mask.is_cuda and torch.equal(mask.cpu(), dare_keep_mask((512, 512), 0.3, seed=1, module="m", index=0))
