"""The artifact store: content-addressed files on local disk.

An artifact's key is derived from its sha256, so the same bytes are stored once. Files arrive through
a temporary path in the same folder and are renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """Stores safetensors blobs under ``root/objects/<sha[:2]>/<sha>.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def key_for(sha256: str) -> str:
        return f"objects/{sha256[:2]}/{sha256}.safetensors"

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def put_file(self, source: Path) -> tuple[str, str, bool]:
        """Store a copy of ``source``; return ``(sha256, key, created)``. ``created`` is False for a duplicate."""
        sha = sha256_file(source)
        key = self.key_for(sha)
        target = self.path(key)
        if target.is_file():
            return sha, key, False
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{uuid.uuid4().hex}.partial")
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return sha, key, True

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def scratch_dir(self) -> Path:
        """A fresh private folder for work in progress (the caller removes it)."""
        folder = self.root / "tmp" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder
