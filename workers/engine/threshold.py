"""Exact magnitude thresholds (the k-th largest |x|) without sorting or ``kthvalue`` over the whole tensor.

``torch.kthvalue``/``torch.topk`` over one huge slice are slow everywhere and pathological on CUDA (one
thread block walks the whole tensor); a full sort costs ``O(n log n)`` and ``n`` words of memory. Here:

1. **Sample.** Take ``m ≈ n^(2/3)`` entries of ``|x|`` at seeded random positions and sort them (small).
2. **Bracket.** Read off the sample quantiles ``lo ≤ hi`` around the target rank, with a margin of four
   binomial standard deviations plus a constant.
3. **Count and gather in one pass.** Walking ``x`` in blocks: ``above = #(|x| > hi)`` and the band
   ``{|x| : lo ≤ |x| ≤ hi}`` (about ``8·n/√m`` entries: under 2% of ``n``). The k-th largest value lies in the
   band iff ``above < k ≤ above + |band|``. Otherwise the bracket moves the way the counts say and widens
   (at most twice, then to an unbounded side, which always verifies): the result never depends on the
   sample, only the time does.
4. **Select in the band.** Its ``(k − above)``-th largest entry, exactly (NumPy's introselect on the CPU, a
   sort of the band on CUDA, where ``kthvalue`` runs on one thread block).

The result equals ``torch.topk(|x|, k).values.min()`` bit for bit. ``|x| ≥ threshold`` keeps exactly ``k``
entries when no other entry ties with the threshold value, and every tied entry otherwise (ties are kept
together, never broken by position). Cost: one blockwise pass over ``x`` (two or three in the rare retry)
plus ``O(n^(2/3) log n)`` on the sample, all on the tensor's device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from workers.engine.blocks import block_size, blocks
from workers.engine.rng import sample_indices

DIRECT_LIMIT = 1 << 16
"""Tensors this small select directly: the bracketing would cost more than it saves."""
_MIN_SAMPLE = 1 << 12
_MAX_SAMPLE = 1 << 20
_RETRIES = 2


def keep_count(numel: int, density: float) -> int:
    """Entries a pruning at ``density`` keeps: ``int(density · numel)`` (PEFT's rule), clipped to ``[0, numel]``."""
    if density >= 1.0:
        return numel
    return max(0, int(density * numel))


def _select_largest(values: Tensor, k: int) -> Tensor:
    """The exact k-th largest (1-based) of a 1-D tensor small enough to select in directly (0-dim result)."""
    count = values.numel()
    if values.device.type == "cpu":
        array = values.numpy()
        return torch.tensor(np.partition(array, count - k)[count - k], dtype=values.dtype)
    return torch.sort(values).values[count - k]


def _sorted_sample(flat: Tensor, count: int) -> Tensor:
    """``|x|`` at ``count`` seeded random positions, sorted ascending (on the CPU, in NumPy: much faster there)."""
    n = flat.numel()
    if flat.device.type == "cpu":
        picked = np.abs(flat.numpy()[sample_indices(n, count).numpy()])
        picked.sort()
        return torch.from_numpy(picked)
    return torch.sort(flat[sample_indices(n, count, flat.device)].abs()).values


def _magnitudes(x: Tensor) -> Tensor:
    flat = x.reshape(-1)
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.to(torch.float32)
    return flat


def kth_largest_abs(x: Tensor, k: int) -> Tensor:
    """The exact ``k``-th largest entry of ``|x|`` (1-based, ``1 ≤ k ≤ numel``), as a 0-dim tensor on ``x``'s device.

    fp16/bf16 inputs are compared in fp32 (exactly: the conversion is exact). ``x`` is not modified.
    """
    flat = _magnitudes(x)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= DIRECT_LIMIT:
        return _select_largest(flat.abs(), k)

    m = min(n, max(_MIN_SAMPLE, min(_MAX_SAMPLE, round(n ** (2.0 / 3.0)))))
    sample = _sorted_sample(flat, m)
    # In ascending order the target sits at rank n − k (0-based), expected at sample position q·m.
    q = (n - k) / n
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_pos, hi_pos = math.floor(q * m - margin), math.ceil(q * m + margin)

    def at(position: int) -> float:
        if position < 0:
            return -math.inf
        if position >= m:
            return math.inf
        return float(sample[position])

    lo, hi = at(lo_pos), at(hi_pos)
    for attempt in range(_RETRIES + 1):
        above, band = _count_and_band(flat, lo, hi)
        last = attempt >= _RETRIES - 1
        step = margin * 4 ** (attempt + 1)
        if above >= k:  # the k-th largest lies above the bracket
            lo_pos, hi_pos = hi_pos, math.ceil(hi_pos + step)
            lo, hi = hi, (math.inf if last else at(hi_pos))
        elif above + band.numel() < k:  # it lies below
            lo_pos, hi_pos = math.floor(lo_pos - step), lo_pos
            lo, hi = (-math.inf if last else at(lo_pos)), lo
        else:
            return _select_largest(band, k - above).to(flat.device)
    raise AssertionError("unreachable: an unbounded bracket always holds the k-th largest value")


def _count_and_band(flat: Tensor, lo: float, hi: float) -> tuple[int, Tensor]:
    """``#(|x| > hi)`` and the entries of ``|x|`` in ``[lo, hi]``, in one blockwise pass."""
    device = flat.device
    size = min(block_size(device), flat.numel())
    magnitude = torch.empty(size, dtype=flat.dtype, device=device)
    greater = torch.empty(size, dtype=torch.bool, device=device)
    in_band = torch.empty(size, dtype=torch.bool, device=device)
    above = flat.new_zeros((), dtype=torch.int64)
    parts: list[Tensor] = []
    for span in blocks(flat.numel(), device):
        width = span.stop - span.start
        mag, gt, band = magnitude[:width], greater[:width], in_band[:width]
        torch.abs(flat[span], out=mag)
        torch.gt(mag, hi, out=gt)
        above += torch.count_nonzero(gt)
        torch.ge(mag, lo, out=band)
        band.logical_and_(gt.logical_not_())
        parts.append(mag[band])
    return int(above), torch.cat(parts)


def magnitude_threshold(x: Tensor, density: float) -> Tensor | None:
    """The smallest |x| a magnitude pruning at ``density`` keeps (0-dim), or ``None`` when it keeps nothing."""
    k = keep_count(x.numel(), density)
    if k == 0:
        return None
    return kth_largest_abs(x, k)


def topk_mask(x: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``int(density · numel)`` largest-magnitude entries of ``x`` (ties at the threshold kept)."""
    k = keep_count(x.numel(), density)
    if k >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    threshold = kth_largest_abs(x, k)
    return x.abs() >= threshold
