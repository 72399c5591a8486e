"""Engines: every pool that serves the API holds at least as many connections as the API lets requests run."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.pool import QueuePool

from registry.db import POOL_CAPACITY, make_engine
from registry.settings import Settings


def capacity(url: str) -> int:
    engine = make_engine(url)
    try:
        pool = engine.pool
        assert isinstance(pool, QueuePool)
        return pool.size() + pool._max_overflow
    finally:
        engine.dispose()


def test_file_and_server_pools_cover_the_api_concurrency_bound(tmp_path: Path, pg_url: str) -> None:
    most = Settings.model_fields["api_max_concurrency"].metadata
    assert any(getattr(bound, "le", None) == POOL_CAPACITY for bound in most)  # the setting cannot exceed it
    assert capacity(f"sqlite:///{tmp_path / 'nested' / 'graft.db'}") == POOL_CAPACITY
    assert (tmp_path / "nested").is_dir()
    assert capacity(pg_url) == POOL_CAPACITY


def test_in_memory_sqlite_creates_no_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    make_engine("sqlite://").dispose()
    make_engine("sqlite:///:memory:").dispose()
    assert list(tmp_path.iterdir()) == []
