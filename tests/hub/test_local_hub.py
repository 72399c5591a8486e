"""The embedded default: with no Hub configured, publishing goes to GRAFT_HOME/hub, laid out like the
Hugging Face cache, with the same commits, versions and tags — and huggingface_hub reads it offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants, snapshot_download
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.errors import PublishConflict
from registry.settings import Settings
from tests.hub.conftest import RegisterFn
from workers.hub import LocalHub
from workers.publisher import publish_version


def test_local_publish_versions_and_tags_readable_offline_by_huggingface_hub(
    local_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert local_settings.hub_is_local
    v1, v2 = register("code", seed=1), register("code", seed=2)
    first = publish_version(v1, session_factory=sessions, store=store, settings=local_settings)
    second = publish_version(v2, session_factory=sessions, store=store, settings=local_settings)
    root = (local_settings.home / "hub").resolve()
    assert first.local and first.endpoint == f"file://{root}" and first.repo_id == "graft/code"

    hub = LocalHub(root)
    refs = hub.refs("graft/code")
    assert refs.head == second.commit and refs.tags == {"v1": first.commit, "v2": second.commit}
    assert first.url == f"file://{root}/models--graft--code/snapshots/{first.commit}"

    # huggingface_hub resolves the tag from the folder without any network (it is a valid cache).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = Path(snapshot_download("graft/code", revision="v1", cache_dir=root, local_files_only=True))
    assert folder.name == first.commit
    with sessions() as session:
        stored = repo.get_versions_by_ids(session, [v1])[v1]
        expected_weights = store.path(stored.artifact_key).read_bytes()
    assert (folder / "adapter_model.safetensors").read_bytes() == expected_weights
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "graft.json",
    ]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and "HF_HUB_CACHE=" in card.text
    assert json.loads((folder / "graft.json").read_text())["ref"] == "code@1"

    # Idempotent; a tag moved to other content is a conflict, as on a remote Hub.
    again = publish_version(v1, session_factory=sessions, store=store, settings=local_settings)
    assert again.reused and again.commit == first.commit
    (root / "models--graft--code" / "refs" / "v1").write_text(second.commit)
    with sessions() as session:
        session.execute(text("DELETE FROM publications"))
        session.commit()
    with pytest.raises(PublishConflict):
        publish_version(v1, session_factory=sessions, store=store, settings=local_settings)
