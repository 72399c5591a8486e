"""Streaming access to operand adapters: one module's factors at a time, through ``safe_open``.

Factors come back as matrices whatever layer they belong to: a 1×1 Conv2d's 4-D factors, A (rank, in, 1, 1) and
B (out, rank, 1, 1), are read as their 2-D views (rank, in) and (out, rank), whose product is the conv's ΔW.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open


class OperandReader:
    """Opens each operand's safetensors file once (memory-mapped) and reads factors on demand."""

    def __init__(self, paths: list[Path], device: torch.device) -> None:
        self._paths = paths
        self._device = device
        self._stack = ExitStack()
        self._handles: list[Any] = []

    def __enter__(self) -> OperandReader:
        for path in self._paths:
            self._handles.append(self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu")))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()
        self._handles.clear()

    def factors(self, operand: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of ``module`` in operand ``operand``, as fp32 matrices on the reader's device."""
        handle = self._handles[operand]
        a = as_matrix(handle.get_tensor(f"{module}.lora_A.weight"), f"{module}.lora_A.weight")
        b = as_matrix(handle.get_tensor(f"{module}.lora_B.weight"), f"{module}.lora_B.weight")
        return (
            b.to(device=self._device, dtype=torch.float32),
            a.to(device=self._device, dtype=torch.float32),
        )


def as_matrix(factor: torch.Tensor, name: str) -> torch.Tensor:
    """A LoRA factor as a matrix: 2-D unchanged, a 1×1 conv's ``(m, n, 1, 1)`` as its ``(m, n)`` view (no copy)."""
    if factor.dim() == 2:
        return factor
    if factor.dim() == 4 and factor.shape[2:] == (1, 1):
        return factor.view(factor.shape[0], factor.shape[1])
    raise ValueError(f"{name} is {list(factor.shape)}: only 2-D factors and 1×1 conv factors can be merged")
