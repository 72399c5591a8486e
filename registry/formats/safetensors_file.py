"""Read a safetensors file's header and check its values, without torch.

The header is 8 bytes of little-endian length followed by JSON; tensors follow as raw bytes. Reading
it directly lets the registry validate uploads (shapes, dtypes, NaN/Inf) in any dtype, bf16 included,
one tensor at a time through a memory map.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from registry.errors import InvalidAdapter

MAX_HEADER_BYTES = 100 * 1024 * 1024

# For each float dtype: the unsigned view, and the exponent mask. An all-ones exponent is NaN or Inf.
_NONFINITE_MASKS: dict[str, tuple[type[np.unsignedinteger], int]] = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse the header of ``path`` or raise :class:`InvalidAdapter` saying what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise InvalidAdapter(f"{path.name} is not a safetensors file: it is shorter than 8 bytes")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise InvalidAdapter(f"{path.name} is not a valid safetensors file: its header length is corrupt")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidAdapter(f"{path.name} is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{path.name} is not a valid safetensors file: its header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidAdapter(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        if data_start + end > size or begin > end:
            raise InvalidAdapter(f"{path.name}: tensor {name!r} points past the end of the file (truncated?)")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    return SafetensorsHeader(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})


def count_nonfinite(path: Path, info: TensorInfo) -> int:
    """Number of NaN/Inf values in one float tensor, read through a memory map."""
    view_dtype, mask = _NONFINITE_MASKS[info.dtype]
    count = (info.end - info.start) // np.dtype(view_dtype).itemsize
    if count == 0:
        return 0
    values = np.memmap(path, dtype=view_dtype, mode="r", offset=info.start, shape=(count,))
    return int(np.count_nonzero((values & view_dtype(mask)) == view_dtype(mask)))
