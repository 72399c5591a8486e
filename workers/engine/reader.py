"""Streaming access to operand adapters: one module's factors at a time, through ``safe_open``."""

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
        """``(B, A)`` of ``module`` in operand ``operand``, as fp32 on the reader's device."""
        handle = self._handles[operand]
        a = handle.get_tensor(f"{module}.lora_A.weight")
        b = handle.get_tensor(f"{module}.lora_B.weight")
        return (
            b.to(device=self._device, dtype=torch.float32),
            a.to(device=self._device, dtype=torch.float32),
        )
