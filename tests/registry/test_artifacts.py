"""The artifact store: content addressing, scratch folders, and sweeping what killed processes leave behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.artifacts import STALE_UNLOCKED_SECONDS, ArtifactStore, sha256_file

ROOT = Path(__file__).resolve().parents[2]


def test_same_bytes_are_stored_once(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"weights")
    second.write_bytes(b"weights")
    sha, key, created = store.put_file(first)
    assert (sha, created) == (sha256_file(first), True)
    assert store.put_file(second) == (sha, key, False)
    assert store.path(key).read_bytes() == b"weights"
    assert [p.name for p in store.path(key).parent.iterdir()] == [f"{sha}.safetensors"]  # no .partial left


def test_scratch_is_removed_on_exit_and_on_error(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.scratch() as folder:
        (folder / "out").write_text("half a merge")
        assert folder.is_dir()
    assert not folder.exists()
    with pytest.raises(RuntimeError), store.scratch() as failing:
        raise RuntimeError("boom")
    assert not failing.exists()


def test_sweep_keeps_a_live_scratch_folder(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.scratch() as live:
        assert store.sweep(now=time.time() + 10 * STALE_UNLOCKED_SECONDS) == []
        assert live.is_dir()


def test_sweep_removes_the_scratch_folder_of_a_killed_process(tmp_path: Path) -> None:
    """SIGKILL skips every ``finally``: the folder stays, its lock dies with the process, the sweep removes it."""
    script = (
        "import sys, time; from pathlib import Path; from registry.artifacts import ArtifactStore\n"
        "with ArtifactStore(Path(sys.argv[1])).scratch() as f:\n"
        "    (f / 'out.safetensors').write_bytes(b'x' * 1024); print(f, flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert child.stdout is not None
    folder = Path(child.stdout.readline().strip())
    assert store_sweep(tmp_path) == []  # alive: its lock is held
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert (folder / "out.safetensors").is_file()  # left behind
    assert store_sweep(tmp_path) == [folder]
    assert not folder.exists()


def store_sweep(root: Path) -> list[Path]:
    return ArtifactStore(root).sweep()


def test_sweep_removes_old_partials_and_unlocked_folders_only_once_stale(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    partial = tmp_path / "objects" / "ab" / ".0123.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    never_locked = tmp_path / "tmp" / "deadbeef"
    never_locked.mkdir(parents=True)
    assert store.sweep() == []  # young: maybe still being written or about to be locked
    later = time.time() + STALE_UNLOCKED_SECONDS + 1
    assert sorted(store.sweep(now=later)) == sorted([partial, never_locked])
    assert not partial.exists() and not never_locked.exists()
