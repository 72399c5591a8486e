"""Staging an uploaded adapter: the multipart files become a private folder the CLI's validation can read.

Only base names are kept (a browser's ``dir/file`` becomes ``file``); names that could escape the folder,
duplicates and empty uploads are refused; the total size is capped while copying.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from registry.artifacts import ArtifactStore
from registry.errors import InvalidUpload, PayloadTooLarge

MAX_FILES = 16
CHUNK = 1 << 20


class Upload(Protocol):
    filename: str | None
    file: BinaryIO


def _safe_name(raw: str | None) -> str:
    name = PurePosixPath((raw or "").replace("\\", "/")).name
    if not name or name in {".", ".."} or name.startswith(".") or "\x00" in name or len(name) > 255:
        raise InvalidUpload(f"file name {raw!r} is not allowed; upload the adapter folder's files by their names")
    return name


@contextmanager
def staged_folder(store: ArtifactStore, files: Sequence[Upload], max_bytes: int) -> Iterator[Path]:
    """A scratch folder holding the uploaded files; removed on exit, whatever happens."""
    if not files:
        raise InvalidUpload("no files uploaded; send adapter_config.json and adapter_model.safetensors as `files`")
    if len(files) > MAX_FILES:
        raise InvalidUpload(f"{len(files)} files uploaded; an adapter folder has at most {MAX_FILES}")
    with store.scratch() as folder:
        total = 0
        for upload in files:
            name = _safe_name(upload.filename)
            target = folder / name
            if target.exists():
                raise InvalidUpload(f"file {name!r} was uploaded twice")
            with target.open("wb") as handle:
                while chunk := upload.file.read(CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise PayloadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                    handle.write(chunk)
        yield folder
