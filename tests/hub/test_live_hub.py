"""Against the public Hub, for real: runs only when ``HF_TOKEN`` and ``GRAFT_TEST_HUB_NAMESPACE`` are set.

It publishes a tiny adapter twice (v1, v2) to a fresh private repo in that namespace, downloads v1 back, and
deletes the repo. Skipped (and reported as skipped) otherwise.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, snapshot_download
from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from tests.hub.conftest import RegisterFn, make_settings
from workers.publisher import publish_version

TOKEN = os.environ.get("HF_TOKEN")
NAMESPACE = os.environ.get("GRAFT_TEST_HUB_NAMESPACE")

pytestmark = pytest.mark.skipif(
    not (TOKEN and NAMESPACE), reason="live Hub test: set HF_TOKEN and GRAFT_TEST_HUB_NAMESPACE to run it"
)


@pytest.mark.parametrize("db_engine", ["sqlite"], indirect=True)
def test_publish_to_the_public_hub(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert TOKEN and NAMESPACE
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo_id = f"{NAMESPACE}/graft-live-test-{uuid.uuid4().hex[:8]}"
    settings = make_settings(tmp_path / "graft", hub_namespace=NAMESPACE, hub_token=TOKEN, hub_private=True)
    v1, v2 = register("live", seed=1), register("live", seed=2)
    api = HfApi(token=TOKEN)
    try:
        first = publish_version(v1, session_factory=sessions, store=store, settings=settings, repo_id=repo_id)
        publish_version(v2, session_factory=sessions, store=store, settings=settings, repo_id=repo_id)
        assert {t.name for t in api.list_repo_refs(repo_id).tags} >= {"v1", "v2"}
        folder = Path(snapshot_download(repo_id, revision="v1", cache_dir=tmp_path / "dl", token=TOKEN))
        with sessions() as session:
            key = repo.get_versions_by_ids(session, [v1])[v1].artifact_key
        assert (folder / "adapter_model.safetensors").read_bytes() == store.path(key).read_bytes()
        assert first.url == f"https://huggingface.co/{repo_id}/tree/v1"
    finally:
        api.delete_repo(repo_id, missing_ok=True)
