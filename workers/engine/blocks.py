"""Blockwise elementwise work over large dense tensors.

The dense kernels walk a module's ΔW in contiguous blocks instead of whole-tensor ops:

- on the CPU a block (256 Ki fp32 = 1 MiB) stays in cache across the several ops applied to it, and no
  ΔW-sized temporary is allocated (each fresh multi-MiB allocation costs page faults, which dominate
  elementwise work on small VMs);
- on CUDA, blocks of 64 Mi elements keep launches few while bounding temporaries to a few hundred MiB.
"""

from __future__ import annotations

import torch

CPU_BLOCK = 1 << 18
CUDA_BLOCK = 1 << 26


def block_size(device: torch.device) -> int:
    return CPU_BLOCK if device.type == "cpu" else CUDA_BLOCK


def blocks(numel: int, device: torch.device) -> list[slice]:
    """Contiguous slices covering ``range(numel)`` for flattened tensors on ``device``."""
    size = block_size(device)
    return [slice(start, min(start + size, numel)) for start in range(0, numel, size)]
