"""The artifact store: content-addressed files on local disk.

An artifact's key is derived from its sha256, so the same bytes are stored once. Files arrive through
a temporary path in the same folder and are renamed into place, so a reader never sees half a file.

Work in progress lives in scratch folders under ``root/tmp``. Each one holds an exclusive ``flock`` on its
``.lock`` file for as long as it is in use, so :meth:`ArtifactStore.sweep` can tell the leftovers of a
killed process (lock free) from a live merge in another worker (lock held) without guessing from ages.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK = 1 << 20
LOCK_FILE = ".lock"
STALE_UNLOCKED_SECONDS = 3600.0
"""Age after which a ``.partial`` file, or a scratch folder that never got its lock, is a leftover."""


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

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A fresh private folder for work in progress, locked while in use and removed on exit.

        If the process is killed (SIGKILL, OOM) the folder stays behind with its lock released; the next
        :meth:`sweep` removes it.
        """
        folder = self.root / "tmp" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        lock = os.open(folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            os.close(lock)

    def sweep(self, *, now: float | None = None) -> list[Path]:
        """Remove what killed processes left behind; return what was removed.

        - a scratch folder whose lock nobody holds (its owner died);
        - a scratch folder with no lock file, or a ``.partial`` object file, older than
          :data:`STALE_UNLOCKED_SECONDS` (the owner died between creating it and locking or renaming it).

        Safe to run while other processes work in the same store: a held lock is never broken.
        """
        now = time.time() if now is None else now
        removed: list[Path] = []
        tmp = self.root / "tmp"
        for folder in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            if folder.is_dir() and _abandoned(folder, now):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        for partial in sorted((self.root / "objects").glob("*/.*.partial")):
            if _older_than(partial, now):
                partial.unlink(missing_ok=True)
                removed.append(partial)
        return removed


def _older_than(path: Path, now: float) -> bool:
    try:
        return now - path.stat().st_mtime > STALE_UNLOCKED_SECONDS
    except FileNotFoundError:
        return False


def _abandoned(folder: Path, now: float) -> bool:
    """True when no live process owns ``folder``."""
    try:
        lock = os.open(folder / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return _older_than(folder, now)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # held: a live merge, upload or download
    finally:
        os.close(lock)  # closing also releases the lock if we took it
    return True
