"""Non-linear merge strategies on dense ΔW, selected through one table (:data:`STRATEGIES`).

Every kernel takes the inputs' dense ΔW (one module; fp32, fp16 or bf16, any device), their weights, the
operands' keys (for DARE's masks) and the options, and returns the merged ΔW in fp32 on the inputs'
device. Kernels never modify their inputs, unless the caller passes ``reuse_inputs=True`` for temporaries
(the result is the same; one ΔW-sized buffer per input is saved).

Semantics (see ``docs/semantics.md``, "Non-linear strategies"): a weight is part of its input, exactly as
``0.7*code`` is an adapter value in an expression; ``τᵢ = wᵢ·ΔWᵢ``. Then

- ``magnitude_prune``: ``Σ trim(τᵢ)``, ``trim`` keeping the ``int(density·n)`` largest ``|τᵢ|``;
- ``ties``: trim each ``τᵢ``; elect a sign per entry from the trimmed ``τᵢ`` (``total``: sign of their sum,
  ``frequency``: sign of the sum of their signs; a tie elects ``+``); the result is the mean of the
  trimmed entries whose sign is the elected one (zero where none is);
- ``dare``: ``Σ mᵢ⊙τᵢ / density`` (without ``/ density`` when ``rescale`` is off), ``mᵢ`` Bernoulli(density)
  masks keyed by ``(seed, module, key_i)`` (:func:`workers.engine.rng.dare_keep_mask`);
- ``dare_ties``: ``ties`` without trimming, applied to ``mᵢ⊙τᵢ / density``;
- ``linear``: ``Σ τᵢ`` (for dense children of a linear node).

Where PEFT's ``merge_utils`` agrees (equal positive weights for TIES, DARE at density 1 or with the same
masks), the results are equal to it; ``tests/engine/test_strategies.py`` checks both the agreement and the
documented differences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

from workers.engine.blocks import block_size, blocks
from workers.engine.rng import dare_keep_mask
from workers.engine.threshold import keep_count, kth_largest_abs

Majority = Literal["total", "frequency"]
MAJORITY_METHODS: tuple[Majority, ...] = ("total", "frequency")


class Strategy(StrEnum):
    LINEAR = "linear"
    MAGNITUDE_PRUNE = "magnitude_prune"
    TIES = "ties"
    DARE = "dare"
    DARE_TIES = "dare_ties"


@dataclass(frozen=True)
class StrategyOptions:
    """Every option any strategy reads; each strategy declares which ones it uses (``StrategySpec.options``)."""

    density: float = 1.0
    majority: Majority = "total"
    seed: int = 0
    rescale: bool = True
    module: str = ""
    """The PEFT module name: part of DARE's mask key."""


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _check(inputs: Sequence[Tensor], weights: Sequence[float] | None) -> list[float]:
    if not inputs:
        raise ValueError("a strategy needs at least one input")
    shape, device = inputs[0].shape, inputs[0].device
    for x in inputs[1:]:
        if x.shape != shape:
            raise ValueError(f"inputs differ in shape: {tuple(shape)} and {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"inputs live on different devices: {device} and {x.device}")
    if weights is None:
        return [1.0] * len(inputs)
    if len(weights) != len(inputs):
        raise ValueError(f"{len(inputs)} inputs but {len(weights)} weights")
    return [float(w) for w in weights]


def _check_density(density: float, *, positive: bool = False) -> None:
    if not 0.0 <= density <= 1.0 or (positive and density == 0.0):
        bound = "(0, 1]" if positive else "[0, 1]"
        raise ValueError(f"density must be in {bound}, got {density}")


def _keys(keys: Sequence[int] | None, count: int) -> list[int]:
    if keys is None:
        return list(range(count))
    if len(keys) != count:
        raise ValueError(f"{count} inputs but {len(keys)} keys")
    return [int(k) for k in keys]


# -- building blocks ----------------------------------------------------------------------------------------


def _owned(x: Tensor, reuse: bool) -> Tensor:
    """``x`` as fp32; ``x`` itself when it may be overwritten (``reuse``, fp32, contiguous), else a copy."""
    if reuse and x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)


def trim(x: Tensor, density: float, weight: float = 1.0, *, reuse_input: bool = False) -> Tensor:
    """``weight·x`` with all but its ``int(density·numel)`` largest-magnitude entries set to zero (fp32).

    The entries kept are those with ``|x| ≥`` the exact k-th largest ``|x|`` (:mod:`workers.engine.threshold`):
    exactly ``k`` of them unless entries tie with the threshold, in which case all tied entries are kept.
    With ``reuse_input`` an fp32 contiguous ``x`` is overwritten with the result (no ΔW-sized allocation).
    """
    _check_density(density)
    n = x.numel()
    k = keep_count(n, density)
    threshold = kth_largest_abs(x, k) if 0 < k < n else None
    out = _owned(x, reuse_input)
    if k >= n:
        return out.mul_(weight) if weight != 1.0 else out
    if threshold is None:
        return out.zero_()
    flat = out.view(-1)
    size = min(block_size(out.device), n)
    magnitude = torch.empty(size, device=out.device)
    keep = torch.empty(size, dtype=torch.bool, device=out.device)
    for span in blocks(n, out.device):
        width = span.stop - span.start
        block, mag, kp = flat[span], magnitude[:width], keep[:width]
        torch.ge(torch.abs(block, out=mag), threshold, out=kp)
        block.mul_(kp)  # (multiplying by a mask is much faster than masked_fill_ on the CPU)
        if weight != 1.0:
            block.mul_(weight)
    return out


def dropped(
    x: Tensor,
    density: float,
    weight: float,
    *,
    seed: int,
    module: str,
    key: int,
    rescale: bool,
    reuse_input: bool = False,
) -> Tensor:
    """DARE on one input: ``weight·x`` with entries dropped by the keyed mask, rescaled by ``1/density`` (fp32)."""
    _check_density(density, positive=rescale)
    factor = weight / density if rescale and density > 0.0 else weight
    out = _owned(x, reuse_input)
    if density < 1.0:
        out.mul_(dare_keep_mask(x.shape, density, seed=seed, module=module, index=key, device=x.device))
    return out.mul_(factor) if factor != 1.0 else out


def _distinct(inputs: Sequence[Tensor], reuse: bool) -> list[bool]:
    """Per input, whether it may be overwritten: only with ``reuse``, and only if no other input shares its storage."""
    pointers = [x.untyped_storage().data_ptr() for x in inputs]
    return [reuse and pointers.count(pointer) == 1 for pointer in pointers]


@dataclass(frozen=True)
class _Part:
    """One input of a sign election, prepared block by block: ``weight·x``, kept where ``|x| ≥ threshold``
    (when given) and where ``mask`` (when given), nothing at all when ``empty``."""

    x: Tensor
    weight: float = 1.0
    threshold: Tensor | None = None
    mask: Tensor | None = None
    empty: bool = False


def elect_and_merge(kept: Sequence[Tensor], majority: Majority = "total", *, out: Tensor | None = None) -> Tensor:
    """TIES's sign election and disjoint mean over already trimmed, weighted inputs (same shape and device).

    The elected sign of an entry is ``+`` when the score (``total``: Σ τᵢ; ``frequency``: Σ sign τᵢ) is ``≥ 0``,
    as in PEFT. The result is the mean of the ``τᵢ`` whose sign equals the elected one; zeros never count.
    ``out`` may be one of ``kept`` (each block is read in full before its result is written).
    """
    return _elect_and_merge([_Part(t) for t in kept], majority, out)


def _elect_and_merge(parts: Sequence[_Part], majority: Majority, out: Tensor | None) -> Tensor:
    """The blockwise election: each input's block is prepared (weighted, trimmed or masked) into a small fp32
    buffer, so no ΔW-sized temporary is ever allocated; only ``out`` is (unless given)."""
    if majority not in MAJORITY_METHODS:
        raise ValueError(f"majority must be one of {MAJORITY_METHODS}, got {majority!r}")
    first = parts[0].x
    device, numel = first.device, first.numel()
    out = torch.empty(first.shape, device=device) if out is None else out
    target = out.view(-1)
    flats = [p.x.reshape(-1) for p in parts]
    masks = [None if p.mask is None else p.mask.reshape(-1) for p in parts]
    size = min(block_size(device), numel)
    buffers = [torch.empty(size, device=device) for _ in parts]
    score, sign, product, total, count = (torch.empty(size, device=device) for _ in range(5))
    ones = torch.ones(size, device=device)
    flag = torch.empty(size, dtype=torch.bool, device=device)
    for span in blocks(numel, device):
        width = span.stop - span.start
        sc, sg, pr, tot, cnt, fl = (t[:width] for t in (score, sign, product, total, count, flag))
        blocks_ = []
        for part, flat, mask, buffer in zip(parts, flats, masks, buffers, strict=True):
            block = buffer[:width]
            if part.empty:
                block.zero_()
            else:
                block.copy_(flat[span])
                if part.threshold is not None:
                    block.mul_(torch.ge(torch.abs(block, out=pr), part.threshold, out=fl))
                if mask is not None:
                    block.mul_(mask[span])
                if part.weight != 1.0:
                    block.mul_(part.weight)
            blocks_.append(block)
        if majority == "total":
            sc.copy_(blocks_[0])
            for block in blocks_[1:]:
                sc.add_(block)
        else:
            torch.sign(blocks_[0], out=sc)
            for block in blocks_[1:]:
                sc.add_(torch.sign(block, out=pr))
        # The elected sign: +1 where the score is ≥ 0 (PEFT's rule). A score of −0.0 only arises when every
        # part is zero, where nothing agrees and the result is 0 whichever sign is elected.
        torch.copysign(ones[:width], sc, out=sg)
        tot.zero_()
        cnt.zero_()
        for block in blocks_:
            torch.mul(block, sg, out=pr)  # > 0 exactly where the part agrees with the elected sign
            cnt.add_(torch.gt(pr, 0.0, out=fl))
            tot.add_(pr.clamp_(min=0.0))
        tot.mul_(sg)
        torch.div(tot, cnt.clamp_(min=1.0), out=target[span])
    return out


def _output_buffer(inputs: Sequence[Tensor], reuse: list[bool]) -> Tensor | None:
    """The first input, when it may be overwritten and is fp32 and contiguous: the result can go there."""
    first = inputs[0]
    if reuse[0] and first.dtype == torch.float32 and first.is_contiguous():
        return first
    return None


# -- the kernels --------------------------------------------------------------------------------------------


def linear(inputs: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """``Σ wᵢ·xᵢ`` in fp32, in the given order."""
    ws = _check(inputs, weights)
    out = _fp32(inputs[0]) * ws[0]
    for x, w in zip(inputs[1:], ws[1:], strict=True):
        out.add_(_fp32(x), alpha=w)
    return out


def magnitude_prune(
    inputs: Sequence[Tensor], weights: Sequence[float] | None = None, *, density: float, reuse_inputs: bool = False
) -> Tensor:
    """``Σ trim(wᵢ·xᵢ)``: each input keeps its ``int(density·n)`` largest-magnitude entries, then they add up.

    ``reuse_inputs``: the (fp32, contiguous) inputs may be overwritten, saving one ΔW-sized buffer per input.
    """
    ws = _check(inputs, weights)
    reuse = _distinct(inputs, reuse_inputs)
    out = trim(inputs[0], density, ws[0], reuse_input=reuse[0])
    for x, w, r in zip(inputs[1:], ws[1:], reuse[1:], strict=True):
        out.add_(trim(x, density, w, reuse_input=r))
    return out


def ties(
    inputs: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float = 1.0,
    majority: Majority = "total",
    reuse_inputs: bool = False,
) -> Tensor:
    """TIES-merging on ΔW: trim each weighted input, elect signs on the weighted inputs, disjoint mean.

    One exact threshold per input, then one blockwise pass that trims, weights, elects and averages: no
    ΔW-sized temporary besides the result. ``reuse_inputs``: the result may be written over the first
    input (when it is fp32 and contiguous).
    """
    ws = _check(inputs, weights)
    _check_density(density)
    numel = inputs[0].numel()
    k = keep_count(numel, density)
    parts = [
        _Part(x, w, threshold=kth_largest_abs(x, k) if 0 < k < numel else None, empty=k == 0)
        for x, w in zip(inputs, ws, strict=True)
    ]
    return _elect_and_merge(parts, majority, _output_buffer(inputs, _distinct(inputs, reuse_inputs)))


def dare(
    inputs: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float,
    seed: int,
    module: str,
    keys: Sequence[int] | None = None,
    rescale: bool = True,
    reuse_inputs: bool = False,
) -> Tensor:
    """DARE: drop each entry of each input with probability ``1 − density`` (keyed masks), rescale, add up.

    Inputs are summed in the order of their keys, so permuting ``inputs`` together with ``weights`` and
    ``keys`` gives a bit-identical result. ``reuse_inputs`` as for :func:`ties`.
    """
    ws = _check(inputs, weights)
    ks = _keys(keys, len(inputs))
    reuse = _distinct(inputs, reuse_inputs)
    out: Tensor | None = None
    for i in sorted(range(len(inputs)), key=lambda i: ks[i]):
        part = dropped(
            inputs[i], density, ws[i], seed=seed, module=module, key=ks[i], rescale=rescale, reuse_input=reuse[i]
        )
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def dare_ties(
    inputs: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    density: float,
    seed: int,
    module: str,
    keys: Sequence[int] | None = None,
    majority: Majority = "total",
    reuse_inputs: bool = False,
) -> Tensor:
    """DARE-TIES: DARE's keyed drop and ``1/density`` rescale per input, then TIES's sign election and mean."""
    ws = _check(inputs, weights)
    ks = _keys(keys, len(inputs))
    _check_density(density, positive=True)
    order = sorted(range(len(inputs)), key=lambda i: ks[i])
    parts = [
        _Part(
            inputs[i],
            ws[i] / density,
            mask=None
            if density >= 1.0
            else dare_keep_mask(
                inputs[i].shape, density, seed=seed, module=module, index=ks[i], device=inputs[i].device
            ),
        )
        for i in order
    ]
    reuse = _distinct(inputs, reuse_inputs)
    return _elect_and_merge(parts, majority, _output_buffer([inputs[i] for i in order], [reuse[i] for i in order]))


# -- the table ----------------------------------------------------------------------------------------------

Kernel = Callable[[Sequence[Tensor], Sequence[float], Sequence[int], StrategyOptions, bool], Tensor]
"""``(inputs, weights, keys, options, reuse_inputs) → merged ΔW``."""


@dataclass(frozen=True)
class StrategySpec:
    strategy: Strategy
    kernel: Kernel
    options: frozenset[str]
    """The :class:`StrategyOptions` fields the kernel reads."""
    random: bool
    """Whether the result depends on ``seed``/``module``/keys (DARE's masks)."""
    summary: str


def _run_linear(
    xs: Sequence[Tensor], ws: Sequence[float], _ks: Sequence[int], _o: StrategyOptions, _reuse: bool
) -> Tensor:
    return linear(xs, ws)


def _run_magnitude_prune(
    xs: Sequence[Tensor], ws: Sequence[float], _ks: Sequence[int], o: StrategyOptions, reuse: bool
) -> Tensor:
    return magnitude_prune(xs, ws, density=o.density, reuse_inputs=reuse)


def _run_ties(xs: Sequence[Tensor], ws: Sequence[float], _ks: Sequence[int], o: StrategyOptions, reuse: bool) -> Tensor:
    return ties(xs, ws, density=o.density, majority=o.majority, reuse_inputs=reuse)


def _run_dare(xs: Sequence[Tensor], ws: Sequence[float], ks: Sequence[int], o: StrategyOptions, reuse: bool) -> Tensor:
    return dare(xs, ws, density=o.density, seed=o.seed, module=o.module, keys=ks, rescale=o.rescale, reuse_inputs=reuse)


def _run_dare_ties(
    xs: Sequence[Tensor], ws: Sequence[float], ks: Sequence[int], o: StrategyOptions, reuse: bool
) -> Tensor:
    return dare_ties(
        xs, ws, density=o.density, seed=o.seed, module=o.module, keys=ks, majority=o.majority, reuse_inputs=reuse
    )


STRATEGIES: Mapping[Strategy, StrategySpec] = MappingProxyType(
    {
        spec.strategy: spec
        for spec in (
            StrategySpec(Strategy.LINEAR, _run_linear, frozenset(), False, "Σ wᵢ·ΔWᵢ, dense"),
            StrategySpec(
                Strategy.MAGNITUDE_PRUNE,
                _run_magnitude_prune,
                frozenset({"density"}),
                False,
                "keep each input's top-density entries by magnitude, then add",
            ),
            StrategySpec(
                Strategy.TIES,
                _run_ties,
                frozenset({"density", "majority"}),
                False,
                "trim by magnitude, elect sign (total|frequency), disjoint mean",
            ),
            StrategySpec(
                Strategy.DARE,
                _run_dare,
                frozenset({"density", "seed", "module", "rescale"}),
                True,
                "drop with probability 1-density (keyed masks), rescale by 1/density, add",
            ),
            StrategySpec(
                Strategy.DARE_TIES,
                _run_dare_ties,
                frozenset({"density", "seed", "module", "majority"}),
                True,
                "DARE's drop and rescale, then TIES's sign election and disjoint mean",
            ),
        )
    }
)


def apply_strategy(
    strategy: Strategy | str,
    inputs: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    keys: Sequence[int] | None = None,
    options: StrategyOptions | None = None,
    reuse_inputs: bool = False,
) -> Tensor:
    """Run ``strategy`` (an enum member or its name) through :data:`STRATEGIES`.

    ``keys`` are the inputs' operand indices in the plan (DARE's mask keys); they default to positions.
    ``reuse_inputs``: the inputs are temporaries the kernel may overwrite (fp32, contiguous ones are), which
    saves one ΔW-sized buffer per input; the result is the same.
    """
    spec = STRATEGIES[Strategy(strategy)]
    ws = _check(inputs, weights)
    return spec.kernel(inputs, ws, _keys(keys, len(inputs)), options or StrategyOptions(), reuse_inputs)
