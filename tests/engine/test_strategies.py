"""The dense strategies (workers/engine/strategies.py): PEFT parity where the semantics agree, the documented
differences where they do not, algebraic properties, and DARE's determinism.

PEFT's ``merge_utils`` functions are called on the very same tensors. They agree with ours when every weight
is the same positive number (TIES, DARE-TIES: PEFT elects signs before weighting, we after), for any weights
for magnitude pruning and DARE (weights commute with their masks), and for DARE only with the same masks —
PEFT draws from the global RNG, so the parity tests hand PEFT our keyed masks through ``torch.bernoulli``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from workers.engine.rng import dare_keep_mask
from workers.engine.strategies import (
    STRATEGIES,
    Strategy,
    StrategyOptions,
    apply_strategy,
    dare,
    dare_ties,
    elect_and_merge,
    linear,
    magnitude_prune,
    ties,
    trim,
)

TOL = 1e-5
MODULE = "base_model.model.model.layers.3.mlp.down_proj"


def deltas(seed: int, count: int = 3, shape: tuple[int, int] = (96, 160)) -> list[torch.Tensor]:
    """ΔW of rank-8 adapters with their typical scale, so the numbers are realistic."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape[0], 8, generator=g) * 0.02) @ (torch.randn(8, shape[1], generator=g) / shape[1] ** 0.5)
        for _ in range(count)
    ]


def close(ours: torch.Tensor, reference: torch.Tensor, tol: float = TOL) -> bool:
    scale = float(reference.abs().max()) or 1.0
    return float((ours - reference).abs().max()) <= tol * scale


@pytest.fixture(autouse=True)
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        yield


# -- parity with peft.utils.merge_utils ------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.7])
@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_ties_equals_peft_with_equal_positive_weights(weight: float, majority: str, density: float) -> None:
    xs = deltas(1)
    ours = ties(xs, [weight] * 3, density=density, majority=majority)  # type: ignore[arg-type]
    reference = merge_utils.ties(list(xs), torch.full((3,), weight), density, majority)  # type: ignore[arg-type]
    assert close(ours, reference)
    if weight in (1.0, 0.5):  # exact scalings: not a bit of rounding differs
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, -0.5, 2.0], [-0.3, 0.9, 0.25]])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_magnitude_prune_equals_peft_for_any_weights(weights: list[float], density: float) -> None:
    xs = deltas(2, len(weights))
    ours = magnitude_prune(xs, weights, density=density)
    reference = merge_utils.magnitude_prune(list(xs), torch.tensor(weights), density)
    assert close(ours, reference)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, -0.5, -0.5]])
def test_dare_at_density_one_equals_peft(weights: list[float]) -> None:
    xs = deltas(3)
    w = torch.tensor(weights)
    assert close(dare(xs, weights, density=1.0, seed=1, module=MODULE), merge_utils.dare_linear(list(xs), w, 1.0))
    if len(set(weights)) == 1:
        reference = merge_utils.dare_ties(list(xs), w, 1.0, "total")
        assert close(dare_ties(xs, weights, density=1.0, seed=1, module=MODULE), reference)


class KeyedBernoulli:
    """Stands in for ``torch.bernoulli`` inside PEFT: hands out our keyed masks, operand by operand."""

    def __init__(self, shape: torch.Size, density: float, seed: int, keys: list[int]) -> None:
        self.masks = [dare_keep_mask(shape, density, seed=seed, module=MODULE, index=k).float() for k in keys]

    def __call__(self, probabilities: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.masks.pop(0)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.8])
def test_dare_and_dare_ties_equal_peft_given_the_same_masks(monkeypatch: pytest.MonkeyPatch, density: float) -> None:
    xs = deltas(4)
    keys = [0, 1, 2]
    weights = [1.0, -0.5, 2.0]
    monkeypatch.setattr(torch, "bernoulli", KeyedBernoulli(xs[0].shape, density, 9, keys))
    reference = merge_utils.dare_linear(list(xs), torch.tensor(weights), density)
    assert close(dare(xs, weights, density=density, seed=9, module=MODULE, keys=keys), reference)

    monkeypatch.setattr(torch, "bernoulli", KeyedBernoulli(xs[0].shape, density, 9, keys))
    reference = merge_utils.dare_ties(list(xs), torch.full((3,), 0.6), density, "frequency")
    ours = dare_ties(xs, [0.6] * 3, density=density, seed=9, module=MODULE, keys=keys, majority="frequency")
    assert close(ours, reference)


# -- where we differ from PEFT, on purpose ------------------------------------------------------------------


def test_signs_are_elected_after_weighting_unlike_peft() -> None:
    """ties(a, −b): we elect on (a, −b); PEFT elects on (a, b) and then mixes signs in the mean."""
    a, b = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert float(ties([a, b], [1.0, -1.0])) == 2.0  # τ = (2, −1): + wins, only 2 agrees
    peft = merge_utils.ties([a, b], torch.tensor([1.0, -1.0]), 1.0)
    assert float(peft) == 0.5  # elected on (2, 1): both "agree", then (2 − 1) / 2
    # Unequal positive weights: a weight can overturn an election.
    a, b = torch.tensor([[1.0]]), torch.tensor([[-3.0]])
    assert float(ties([a, b], [3.0, 1.0])) == 3.0  # τ = (3, −3): sum 0 elects +
    assert float(merge_utils.ties([a, b], torch.tensor([3.0, 1.0]), 1.0)) == -3.0  # (1, −3) elects −


def test_weights_are_scalars_of_the_inputs() -> None:
    """ties(λ·x) = λ·ties(x) for λ > 0, as 0.7*code is an adapter value; mergekit's normalised mean is not."""
    xs = deltas(5)
    for lam in (0.25, 4.0):  # exact scalings
        assert torch.equal(ties([lam * x for x in xs], density=0.4), lam * ties(xs, density=0.4))
        assert torch.equal(ties(xs, [lam] * 3, density=0.4), lam * ties(xs, density=0.4))


# -- algebraic properties ------------------------------------------------------------------------------------


def test_one_input_at_density_one_is_the_input() -> None:
    (x,) = deltas(6, 1)
    for weight in (1.0, -0.5):
        assert torch.equal(ties([x], [weight]), weight * x)
        assert torch.equal(magnitude_prune([x], [weight], density=1.0), weight * x)
        assert torch.equal(dare([x], [weight], density=1.0, seed=0, module=MODULE), weight * x)
        assert torch.equal(dare_ties([x], [weight], density=1.0, seed=0, module=MODULE), weight * x)


def test_density_one_reduces_to_the_linear_combination() -> None:
    xs = deltas(7)
    weights = [0.5, -1.0, 2.0]
    expected = linear(xs, weights)
    assert close(magnitude_prune(xs, weights, density=1.0), expected)
    assert close(dare(xs, weights, density=1.0, seed=3, module=MODULE), expected)
    assert torch.equal(dare_ties(xs, [1.0] * 3, density=1.0, seed=3, module=MODULE), ties(xs, density=1.0))


def test_a_minus_a_is_zero() -> None:
    (x,) = deltas(8, 1)
    assert torch.count_nonzero(linear([x, x], [1.0, -1.0])) == 0
    assert torch.count_nonzero(magnitude_prune([x, x], [1.0, -1.0], density=0.3)) == 0
    # The same operand twice (one key): the same mask, so DARE cancels exactly too.
    assert torch.count_nonzero(dare([x, x], [1.0, -1.0], density=0.3, seed=1, module=MODULE, keys=[0, 0])) == 0


def test_trim_keeps_exactly_k_and_ties_respects_it() -> None:
    xs = deltas(9)
    k = int(0.2 * xs[0].numel())
    for x in xs:
        kept = trim(x, 0.2, -2.0)
        assert int(torch.count_nonzero(kept)) == k
        nonzero = kept != 0
        assert torch.equal(kept[nonzero], -2.0 * x[nonzero])
    merged = ties(xs, density=0.2)
    union = torch.stack([trim(x, 0.2) != 0 for x in xs]).any(0)
    assert not bool((merged != 0)[~union].any())  # nothing appears outside the trimmed supports


def test_total_and_frequency_elections_differ_as_defined() -> None:
    """Entry: (+3, −1, −1). total: sum +1 elects +, result 3. frequency: two − against one +, result −1."""
    xs = [torch.tensor([[3.0]]), torch.tensor([[-1.0]]), torch.tensor([[-1.0]])]
    assert float(ties(xs, majority="total")) == 3.0
    assert float(ties(xs, majority="frequency")) == -1.0
    # An exact tie elects +, as in PEFT; entries where every input is zero stay zero.
    assert float(elect_and_merge([torch.tensor([2.0]), torch.tensor([-2.0])])) == 2.0
    assert float(elect_and_merge([torch.zeros(1), torch.zeros(1)])) == 0.0


def naive_ties(xs: list[torch.Tensor], weights: list[float], density: float, majority: str) -> torch.Tensor:
    """Our documented semantics, written plainly (float64, topk for the trim)."""
    taus = []
    for x, w in zip(xs, weights, strict=True):
        tau = (w * x).double().reshape(-1)
        k = int(density * tau.numel()) if density < 1 else tau.numel()
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[torch.topk(x.double().reshape(-1).abs(), k).indices] = True
        taus.append(torch.where(keep, tau, 0.0))
    stacked = torch.stack(taus)
    score = stacked.sum(0) if majority == "total" else stacked.sign().sum(0)
    sign = torch.where(score >= 0, 1.0, -1.0)
    agree = stacked * sign > 0
    return ((stacked * agree).sum(0) / agree.sum(0).clamp(min=1)).reshape(xs[0].shape)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    weights=st.lists(st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 1e-3), min_size=1, max_size=4),
    density=st.floats(0.01, 1.0),
    majority=st.sampled_from(["total", "frequency"]),
)
def test_ties_matches_its_plain_definition(seed: int, weights: list[float], density: float, majority: str) -> None:
    xs = deltas(seed, len(weights), (24, 40))
    ours = ties(xs, weights, density=density, majority=majority)  # type: ignore[arg-type]
    expected = naive_ties(xs, weights, density, majority)
    mismatched = (ours.double() - expected).abs() > 1e-5 * float(expected.abs().max() or 1.0)
    # fp32 vs fp64 sums can flip an election only where the score is ~0: allow a vanishing few.
    assert int(mismatched.sum()) <= 2


# -- DARE determinism ------------------------------------------------------------------------------------------


def test_dare_is_deterministic_across_calls_and_operand_order() -> None:
    xs = deltas(10)
    weights = [1.0, -0.5, 0.25]
    first = dare(xs, weights, density=0.3, seed=42, module=MODULE, keys=[0, 1, 2])
    assert torch.equal(first, dare(xs, weights, density=0.3, seed=42, module=MODULE, keys=[0, 1, 2]))
    order = [2, 0, 1]
    permuted = dare(
        [xs[i] for i in order], [weights[i] for i in order], density=0.3, seed=42, module=MODULE, keys=order
    )
    assert torch.equal(first, permuted)
    ties_first = dare_ties(xs, [1.0] * 3, density=0.3, seed=42, module=MODULE, keys=[0, 1, 2])
    ties_permuted = dare_ties([xs[i] for i in order], [1.0] * 3, density=0.3, seed=42, module=MODULE, keys=order)
    assert torch.equal(ties_first, ties_permuted)
    assert not torch.equal(first, dare(xs, weights, density=0.3, seed=43, module=MODULE, keys=[0, 1, 2]))
    assert not torch.equal(first, dare(xs, weights, density=0.3, seed=42, module=MODULE + "x", keys=[0, 1, 2]))


def test_dare_is_unbiased_and_rescales() -> None:
    x = torch.ones(400, 500)
    out = dare([x], density=0.25, seed=1, module=MODULE)
    assert set(torch.unique(out).tolist()) == {0.0, 4.0}
    assert abs(float(out.mean()) - 1.0) <= 5 * (0.75 / 0.25 / x.numel()) ** 0.5
    plain = dare([x], density=0.25, seed=1, module=MODULE, rescale=False)
    assert torch.equal(plain * 4.0, out)


# -- dtypes, validation, the table ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_run_in_fp32(dtype: torch.dtype) -> None:
    xs = [x.to(dtype) for x in deltas(11)]
    upcast = [x.float() for x in xs]
    for name in Strategy:
        options = StrategyOptions(density=0.4, seed=1, module=MODULE)
        ours = apply_strategy(name, xs, [1.0, 0.5, -1.0], options=options)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, apply_strategy(name, upcast, [1.0, 0.5, -1.0], options=options))


@pytest.mark.parametrize("name", list(Strategy))
def test_reusing_inputs_gives_the_same_result_and_never_touches_others(name: Strategy) -> None:
    xs = deltas(15)
    options = StrategyOptions(density=0.3, seed=2, module=MODULE)
    expected = apply_strategy(name, xs, [1.0, -0.5, 2.0], options=options)
    copies = [x.clone() for x in xs]
    assert torch.equal(apply_strategy(name, copies, [1.0, -0.5, 2.0], options=options, reuse_inputs=True), expected)
    untouched = [x.clone() for x in xs]
    apply_strategy(name, untouched, [1.0, -0.5, 2.0], options=options)
    assert all(torch.equal(a, b) for a, b in zip(untouched, xs, strict=True))
    # The same tensor twice: overwritten at most once, so the result is still right.
    twice = xs[0].clone()
    doubled = apply_strategy(name, [twice, twice], [1.0, 0.5], keys=[0, 1], options=options, reuse_inputs=True)
    assert torch.equal(doubled, apply_strategy(name, [xs[0], xs[0]], [1.0, 0.5], keys=[0, 1], options=options))


def test_validation() -> None:
    xs = deltas(12, 2)
    with pytest.raises(ValueError, match="shape"):
        ties([xs[0], xs[1][:5]])
    with pytest.raises(ValueError, match="weights"):
        ties(xs, [1.0])
    with pytest.raises(ValueError, match="density"):
        ties(xs, density=1.5)
    with pytest.raises(ValueError, match="density"):
        dare(xs, density=0.0, seed=0, module=MODULE)
    with pytest.raises(ValueError, match="keys"):
        dare(xs, density=0.5, seed=0, module=MODULE, keys=[0])
    with pytest.raises(ValueError, match="majority"):
        ties(xs, majority="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        ties([])
    assert torch.count_nonzero(dare(xs, density=0.0, seed=0, module=MODULE, rescale=False)) == 0


def test_the_strategy_table() -> None:
    assert set(STRATEGIES) == set(Strategy)
    option_names = {f.name for f in fields(StrategyOptions)}
    for strategy, spec in STRATEGIES.items():
        assert spec.strategy is strategy and spec.options <= option_names and spec.summary
        assert spec.random == ("seed" in spec.options)
    xs = deltas(13)
    options = StrategyOptions(density=0.3, majority="frequency", seed=5, module=MODULE)
    assert torch.equal(
        apply_strategy("ties", xs, [1.0, 2.0, 1.0], options=options),
        ties(xs, [1.0, 2.0, 1.0], density=0.3, majority="frequency"),
    )
    assert torch.equal(
        apply_strategy(Strategy.DARE_TIES, xs, keys=[4, 5, 6], options=options),
        dare_ties(xs, density=0.3, seed=5, module=MODULE, keys=[4, 5, 6], majority="frequency"),
    )
    with pytest.raises(ValueError):
        apply_strategy("median", xs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_strategies_on_cuda_agree_with_cpu() -> None:
    xs = deltas(14, 4, (512, 384))
    options = StrategyOptions(density=0.2, seed=3, module=MODULE)
    for name in Strategy:
        cpu = apply_strategy(name, xs, options=options)
        gpu = apply_strategy(name, [x.cuda() for x in xs], options=options)
        assert close(gpu.cpu(), cpu, 1e-5), name
