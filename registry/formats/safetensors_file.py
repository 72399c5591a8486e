"""Read a safetensors file's header and check its values, and write one from raw bytes, without torch.

The header is 8 bytes of little-endian length followed by JSON; tensors follow as raw bytes. Reading
it directly lets the registry validate uploads (shapes, dtypes, NaN/Inf) in any dtype, bf16 included,
one tensor at a time through a memory map; writing from raw bytes copies any dtype unchanged.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from registry.errors import InvalidAdapter

MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK = 1 << 20

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


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its dtype and shape, and its raw little-endian bytes (given, or a slice of a file)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | None = None
    path: Path | None = None
    start: int = 0
    end: int = 0

    @classmethod
    def from_file(cls, path: Path, info: TensorInfo) -> TensorSource:
        return cls(info.dtype, info.shape, path=path, start=info.start, end=info.end)

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.data is not None else self.end - self.start


def write_safetensors(path: Path, tensors: dict[str, TensorSource], metadata: dict[str, str]) -> Path:
    """Write a safetensors file byte for byte reproducibly: keys sorted, data laid out in key order.

    Tensor bytes are copied unchanged (any dtype, bf16 included), one tensor at a time. The header is padded
    with spaces to a multiple of 8 bytes, as the safetensors library does. The file appears atomically.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        source = tensors[name]
        header[name] = {
            "dtype": source.dtype,
            "shape": list(source.shape),
            "data_offsets": [offset, offset + source.nbytes],
        }
        offset += source.nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as out, ExitStack() as stack:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            handles: dict[Path, BinaryIO] = {}
            for name in sorted(tensors):
                source = tensors[name]
                if source.data is not None:
                    out.write(source.data)
                    continue
                assert source.path is not None
                if source.path not in handles:
                    handles[source.path] = stack.enter_context(source.path.open("rb"))
                handle = handles[source.path]
                handle.seek(source.start)
                left = source.nbytes
                while left:
                    chunk = handle.read(min(left, CHUNK))
                    if not chunk:
                        raise InvalidAdapter(f"{source.path.name}: tensor {name!r} is truncated")
                    out.write(chunk)
                    left -= len(chunk)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path
