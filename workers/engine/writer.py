"""Streaming writer of a PEFT adapter folder.

Tensors are appended to a data file as they are produced and freed; ``finish`` writes the safetensors
header in front and the config beside it. Peak memory is one module, whatever the adapter's size.
A 1×1 Conv2d module's factors are written 4-D, as PEFT's Conv2d LoRA stores them: A (r, in, 1, 1), B (out, r, 1, 1).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
TORCH_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class PeftFolderWriter:
    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        self.folder = folder
        self.dtype = dtype
        folder.mkdir(parents=True, exist_ok=True)
        self._data_path = folder / ".tensors.partial"
        self._data = self._data_path.open("wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self.ranks: dict[str, int] = {}

    def _append(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        self._data.write(raw.tobytes())
        end = self._offset + raw.nbytes
        self._entries[name] = {
            "dtype": _ST_DTYPES[self.dtype],
            "shape": list(data.shape),
            "data_offsets": [self._offset, end],
        }
        self._offset = end

    def add_module(self, module: str, b: torch.Tensor, a: torch.Tensor, kernel: tuple[int, int] | None = None) -> None:
        """Append one module's factors (``b: (out, r)``, ``a: (r, in)``).

        ``kernel=(1, 1)``: the module is a 1×1 Conv2d, and the factors are written as ``(r, in, 1, 1)`` and
        ``(out, r, 1, 1)`` (views of the same data).
        """
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{module}: B is {tuple(b.shape)} but A is {tuple(a.shape)}")
        if kernel is not None:
            if tuple(kernel) != (1, 1):
                kh, kw = kernel
                raise ValueError(f"{module}: only 1×1 conv factors can be written, not a {kh}×{kw} kernel")
            a, b = a[:, :, None, None], b[:, :, None, None]
        self._append(f"{module}.lora_A.weight", a)
        self._append(f"{module}.lora_B.weight", b)
        self.ranks[module] = int(a.shape[0])

    def finish(self, config: dict[str, Any], metadata: dict[str, str]) -> Path:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json``; return the weights path."""
        self._data.close()
        header: dict[str, Any] = {"__metadata__": metadata, **self._entries}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        weights = self.folder / WEIGHTS_FILE
        with weights.open("wb") as out, self._data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 1 << 20)
        os.unlink(self._data_path)
        (self.folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        return weights

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)
