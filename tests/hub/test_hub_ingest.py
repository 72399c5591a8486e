"""Ingest from the Hub (``hf://org/repo@revision``) with the real client against the test server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from registry.artifacts import ArtifactStore, sha256_file
from registry.errors import HubNotFound, InvalidAdapter, InvalidInput
from registry.models import AdapterVersion
from registry.services.hub_ingest import parse_hub_uri
from registry.settings import Settings
from tests.hub.conftest import RegisterFn
from tests.hub_server import HubServer
from workers.hub_ingest import IngestOutcome, ingest_from_hub
from workers.publisher import publish_version


def adapter_files(make_adapter: Callable[..., Path], seed: int) -> tuple[dict[str, bytes], Path]:
    folder = make_adapter(f"hub-{seed}", seed=seed)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    return files, folder / "adapter_model.safetensors"


def ingest(
    uri: str, name: str, sessions: sessionmaker[Session], store: ArtifactStore, settings: Settings, **kw: Any
) -> IngestOutcome:
    return ingest_from_hub(uri, name, session_factory=sessions, store=store, settings=settings, **kw)


def test_ingest_round_trip_pins_the_revision_and_downloads_only_adapter_files(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    make_adapter: Callable[..., Path],
) -> None:
    files_v1, weights_v1 = adapter_files(make_adapter, seed=5)
    files_v2, weights_v2 = adapter_files(make_adapter, seed=6)
    c1 = hub.put_files("acme/code-lora", {**files_v1, "README.md": b"# hi\n", "training_args.bin": b"x" * 1000})
    hub.move_tag("acme/code-lora", "release", c1)
    c2 = hub.put_files("acme/code-lora", files_v2)

    outcome = ingest("hf://acme/code-lora@release", "ext", sessions, store, hub_settings, tags=["code"])
    assert outcome.created and outcome.origin.commit == c1
    info = outcome.version
    assert info["source"] == "hub"
    assert info["hub_origin"] == {"endpoint": hub.url, "repo_id": "acme/code-lora", "revision": "release", "commit": c1}
    assert info["sha256"] == sha256_file(weights_v1) and info["ref"] == "ext@1"
    with sessions() as session:
        row = session.scalars(select(AdapterVersion).where(AdapterVersion.id == info["id"])).one()
        assert (row.hub_endpoint, row.hub_repo, row.hub_revision, row.hub_commit) == (
            hub.url,
            "acme/code-lora",
            "release",
            c1,
        )
        assert store.path(row.artifact_key).read_bytes() == weights_v1.read_bytes()
    downloaded = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path and r.method == "GET"}
    assert downloaded == {"adapter_config.json", "adapter_model.safetensors"}

    # The same commit again: nothing new. The branch, which moved on: a new version pinned to that commit.
    assert not ingest("hf://acme/code-lora@release", "ext", sessions, store, hub_settings).created
    latest = ingest("hf://acme/code-lora", "ext", sessions, store, hub_settings)
    assert latest.created and latest.origin.commit == c2 and latest.origin.revision == "main"
    assert latest.version["ref"] == "ext@2" and latest.version["sha256"] == sha256_file(weights_v2)


def test_ingest_of_a_version_graft_published(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
) -> None:
    vid = register("code")
    published = publish_version(vid, session_factory=sessions, store=store, settings=hub_settings)
    back = ingest(f"hf://{published.repo_id}@v1", "code-copy", sessions, store, hub_settings)
    with sessions() as session:
        original = session.get(AdapterVersion, vid)
        assert original is not None
        assert back.version["sha256"] == original.sha256 and back.origin.commit == published.commit


def test_ingest_refusals_record_nothing(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    make_adapter: Callable[..., Path],
) -> None:
    files, _ = adapter_files(make_adapter, seed=7)
    hub.put_files("acme/pickled", {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": b"x"})
    hub.put_files("acme/ok", files)
    with pytest.raises(InvalidAdapter, match="pickle"):
        ingest("hf://acme/pickled", "p", sessions, store, hub_settings)
    with pytest.raises(HubNotFound) as missing_rev:
        ingest("hf://acme/ok@no-such-tag", "p", sessions, store, hub_settings)
    assert missing_rev.value.code == "hub_not_found"
    with pytest.raises(HubNotFound):
        ingest("hf://acme/absent", "p", sessions, store, hub_settings)
    with pytest.raises(InvalidInput):
        ingest("hf://not-a-repo", "p", sessions, store, hub_settings)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(AdapterVersion)) == 0


def test_parse_hub_uri() -> None:
    origin = parse_hub_uri("hf://org/repo/sub/dir@refs/pr/1", "https://hub.example")
    assert (origin.repo_id, origin.subfolder, origin.revision) == ("org/repo", "sub/dir", "refs/pr/1")
    assert parse_hub_uri("hf://org/repo", "e").revision == "main"
    assert parse_hub_uri("hf://models/org/repo@v2", "e").repo_id == "org/repo"
