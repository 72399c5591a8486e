"""Deterministic randomness for the engine: DARE's drop masks and the randomized SVD's test matrices.

Every random draw is keyed, never taken from a global RNG. A key is hashed with SHA-256 (stable across
processes, Python versions and machines, unlike ``hash()``) into the seed of a CPU ``torch.Generator``.
Random numbers are always drawn on the CPU and then moved to the tensors' device, so a CPU worker and a
CUDA worker see bit-identical masks.

DARE's mask over a module's ΔW (flattened row-major, ``out × in``) is cut into chunks of
:data:`MASK_CHUNK` elements; chunk ``c`` is drawn from its own generator keyed by
``(seed, module, operand index, c)``. Chunks can therefore be drawn in parallel threads and the mask
does not depend on the thread count. Changing :data:`MASK_CHUNK` or the key layout changes every mask:
they are part of the plan's semantics (``DARE_RNG_VERSION``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import Tensor

DARE_RNG_VERSION = 1
MASK_CHUNK = 1 << 22
"""Elements per independently seeded chunk of a DARE mask (4 Mi; a 4096×4096 ΔW is 4 chunks)."""

_SEED_MASK = (1 << 63) - 1


def stable_seed(*parts: str | int) -> int:
    """A 63-bit seed from ``parts``, identical on every machine and Python version.

    Each part is encoded with its type and length, so ``("a", 1)`` and ``("a1",)`` never collide.
    """
    digest = hashlib.sha256()
    for part in parts:
        tag = b"i" if isinstance(part, int) else b"s"
        data = str(part).encode("utf-8")
        digest.update(tag + len(data).to_bytes(4, "big") + data)
    return int.from_bytes(digest.digest()[:8], "big") & _SEED_MASK


def dare_generator(seed: int, module: str, index: int, chunk: int = 0) -> torch.Generator:
    """The CPU generator for DARE's mask of operand ``index`` in ``module`` (one chunk of it).

    ``module`` is the PEFT module name as it appears in the plan (``base_model.model.…q_proj``) and
    ``index`` the operand's position in the plan's operand list, so the mask of an operand does not depend
    on where it appears in an expression, on the order modules are processed in, or on the worker.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stable_seed("graft.dare", DARE_RNG_VERSION, seed, module, index, chunk))
    return generator


def dare_keep_mask(
    shape: tuple[int, ...] | torch.Size,
    density: float,
    *,
    seed: int,
    module: str,
    index: int,
    device: torch.device | str | None = None,
    threads: int | None = None,
) -> Tensor:
    """Boolean mask, ``True`` where DARE keeps the entry: independent Bernoulli(``density``) per entry.

    Entry ``j`` (row-major) is kept iff ``u_j < density`` with ``u_j ~ U[0, 1)`` (fp32) drawn on the CPU;
    the mask is then moved to ``device``. ``density >= 1`` keeps everything, ``density <= 0`` nothing.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    if density >= 1.0:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    if density <= 0.0:
        return torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    mask = torch.empty(numel, dtype=torch.bool)
    chunks = range((numel + MASK_CHUNK - 1) // MASK_CHUNK)
    # Inference mode is thread-local: pool threads must re-enter the caller's mode, or filling a mask
    # allocated under the executor's inference_mode is refused as an in-place update of an inference tensor.
    inference = torch.is_inference_mode_enabled()

    def fill(chunk: int) -> None:
        start = chunk * MASK_CHUNK
        stop = min(start + MASK_CHUNK, numel)
        with torch.inference_mode(inference):
            uniform = torch.rand(stop - start, generator=dare_generator(seed, module, index, chunk))
            torch.lt(uniform, density, out=mask[start:stop])

    workers = min(len(chunks), threads or os.cpu_count() or 1)
    if workers <= 1:
        for chunk in chunks:
            fill(chunk)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fill, chunks))
    return mask.reshape(tuple(shape)).to(device or "cpu")


@lru_cache(maxsize=32)
def _cpu_gaussian(rows: int, cols: int, seed: int) -> Tensor:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stable_seed("graft.gaussian", rows, cols, seed))
    return torch.randn(rows, cols, generator=generator)


def gaussian_test_matrix(rows: int, cols: int, *, seed: int = 0, device: torch.device | str | None = None) -> Tensor:
    """A seeded standard-normal ``rows × cols`` fp32 matrix, drawn on the CPU (cached) and moved to ``device``."""
    return _cpu_gaussian(rows, cols, seed).to(device or "cpu")


@lru_cache(maxsize=32)
def _cpu_sample_indices(numel: int, count: int) -> Tensor:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stable_seed("graft.sample", numel, count))
    return torch.randint(0, numel, (count,), generator=generator)


def sample_indices(numel: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """``count`` seeded uniform positions in ``[0, numel)`` (with replacement), cached on the CPU."""
    return _cpu_sample_indices(numel, count).to(device or "cpu")
