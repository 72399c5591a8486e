"""Fixtures for publishing and ingest tests: the Hub-compatible server, the real client pointed at it, and
registered versions (uploads and merges) to publish.

The real ``huggingface_hub`` client runs against :class:`tests.hub_server.HubServer` on a free 127.0.0.1
port with ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1`` and ``HF_HUB_OFFLINE`` off (the Makefile
exports ``HF_HUB_OFFLINE=1`` for the rest of the suite). Those flags are read by huggingface_hub when it is
imported, which may already have happened in this process, so the fixture also sets them on
``huggingface_hub.constants`` for the duration of each test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# For any process started from here, and for huggingface_hub if it is imported after this point.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import huggingface_hub
import pytest
from huggingface_hub import constants
from sqlalchemy.orm import Session, sessionmaker

from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.formats.peft import inspect_peft_folder
from registry.services import merges
from registry.services.adapters import register_folder
from registry.settings import Settings
from tests.hub_server import HubServer

HUB_TOKEN = "hf_graftTestToken0123456789abcdef"
NAMESPACE = "graft-test"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """One server for the session; :func:`hub` gives each test an empty one."""
    with HubServer(tmp_path_factory.mktemp("hub-server"), token=HUB_TOKEN) as server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    """The test Hub, emptied, with the real client configured for it (endpoint, cache, flags, no token)."""
    hub_server.reset(token=HUB_TOKEN)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GRAFT_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # What HF_ENDPOINT does at import time: the default endpoint, and the module-level HfApi behind
    # huggingface_hub.file_exists & co. (PEFT calls those without an endpoint argument).
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub_server.url)
    return hub_server


def make_settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": home,
        "hub_backoff_seconds": 0.01,
        "hub_backoff_max_seconds": 0.05,
        "hub_timeout_seconds": 10.0,
        "hub_max_attempts": 5,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def hub_settings(hub: HubServer, tmp_path: Path) -> Settings:
    """Settings that publish to the test Hub under ``graft-test/…`` with the right token and fast backoff."""
    return make_settings(tmp_path / "graft", hub_endpoint=hub.url, hub_namespace=NAMESPACE, hub_token=HUB_TOKEN)


@pytest.fixture
def local_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The embedded default: no Hub configured, so publishing goes to GRAFT_HOME/hub."""
    for name in ("GRAFT_HUB_ENDPOINT", "GRAFT_HUB_NAMESPACE", "GRAFT_HUB_LOCAL_DIR"):
        monkeypatch.delenv(name, raising=False)
    return make_settings(tmp_path / "graft")


@pytest.fixture
def sleeps() -> list[float]:
    """Pass ``sleeps.append`` as ``sleep=``: records the backoff delays instead of waiting."""
    return []


RegisterFn = Callable[..., int]


@pytest.fixture
def register(sessions: sessionmaker[Session], store: ArtifactStore, make_adapter: Any) -> RegisterFn:
    """``register("code", seed=1, tags=["code"])`` → the id of a new uploaded version of ``code``."""

    def _register(name: str, *, seed: int = 1, tags: list[str] | None = None, **kwargs: Any) -> int:
        folder = make_adapter(name, seed=seed, **kwargs)
        with session_scope(sessions) as session:
            return register_folder(session, store, folder, name, tags=tags or [name]).version.id

    return _register


@pytest.fixture
def record_merge(sessions: sessionmaker[Session], store: ArtifactStore, make_adapter: Any) -> Callable[..., int]:
    """Record a merged version as the pipeline would (job with plan, version, lineage edges), without running
    the engine: ``record_merge("mix", [(code_id, 0.7), (math_id, 0.3)], expression=…)`` → version id."""

    def _merge(
        name: str,
        operands: list[tuple[int, float]],
        *,
        expression: str,
        strategy: str = "linear",
        steps: list[dict[str, Any]] | None = None,
        seed: int = 99,
    ) -> int:
        folder = make_adapter(name, seed=seed)
        facts = inspect_peft_folder(folder)
        sha, key, _ = store.put_file(facts.weights_path)
        plan = {
            "plan_version": 1,
            "expression": expression,
            "normalized": expression,
            "strategy": strategy,
            "operands": [{"version_id": vid, "weight": weight} for vid, weight in operands],
            "steps": steps or [{"module": "m", "path": "factored", "program": {"kind": "linear"}}],
        }
        with session_scope(sessions) as session:
            job = merges.create_job(session, expression, name, ["merged"], plan, "ab" * 32)
            done = merges.record_result(session, job.id, facts, sha256=sha, artifact_key=key, engine_seconds=0.1)
            assert done.result_version_id is not None
            return done.result_version_id

    return _merge
