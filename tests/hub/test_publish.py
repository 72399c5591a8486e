"""Publishing with the real huggingface_hub client against the test Hub server.

Each test runs on PostgreSQL and SQLite (the ``sessions`` fixture). What is checked: one commit and one tag
per version, byte-identical downloads by tag, model card metadata, retries (5xx, lost answers, races),
idempotency, tag conflicts, token hygiene, lineage links.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi, ModelCard, snapshot_download
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.errors import HubAuthFailed, HubUnavailable, PublishConflict
from registry.models import AdapterVersion, Publication
from registry.services.lineage import lineage_graph
from registry.settings import Settings
from tests.hub.conftest import HUB_TOKEN, NAMESPACE, RegisterFn, make_settings
from tests.hub_server import HubServer
from workers.hub import RemoteHub
from workers.publisher import publish_version

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def publish(vid: int, sessions: sessionmaker[Session], store: ArtifactStore, settings: Settings, **kw: Any) -> Any:
    return publish_version(vid, session_factory=sessions, store=store, settings=settings, **kw)


def version(sessions: sessionmaker[Session], vid: int) -> AdapterVersion:
    with sessions() as session:
        found = repo.get_versions_by_ids(session, [vid])[vid]
        session.expunge_all()
        return found


def publication_row(sessions: sessionmaker[Session], vid: int) -> Publication:
    with sessions() as session:
        row = session.scalars(select(Publication).where(Publication.version_id == vid)).one()
        session.expunge_all()
        return row


def publish_commits(hub: HubServer, repo_id: str) -> list[Any]:
    return [c for c in hub.commits(repo_id) if c.message != "initial commit"]


def test_publish_two_versions_then_download_v1_byte_identical(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    tmp_path: Path,
) -> None:
    v1, v2 = register("code", seed=1), register("code", seed=2)
    first = publish(v1, sessions, store, hub_settings)
    assert (first.repo_id, first.tag, first.reused, first.attempts) == (f"{NAMESPACE}/code", "v1", False, 1)
    assert first.url == f"{hub.url}/{NAMESPACE}/code/tree/v1"
    v1_files = {p: hub.read(first.repo_id, "v1", p) for p in (*ADAPTER_FILES, "README.md", "graft.json")}

    second = publish(v2, sessions, store, hub_settings)
    assert second.tag == "v2" and second.commit != first.commit

    # One commit per version, each tagged; v1 still points at its own commit, unchanged.
    commits = publish_commits(hub, first.repo_id)
    assert [c.oid for c in commits] == [second.commit, first.commit]
    assert hub.tags(first.repo_id) == {"v1": first.commit, "v2": second.commit}
    assert {c.message for c in commits} == {"Graft: publish code@1", "Graft: publish code@2"}

    for number, vid, tag in ((1, v1, "v1"), (2, v2, "v2")):
        folder = Path(
            snapshot_download(
                first.repo_id, revision=tag, endpoint=hub.url, cache_dir=tmp_path / f"dl{number}", token=HUB_TOKEN
            )
        )
        stored = version(sessions, vid)
        assert (folder / "adapter_model.safetensors").read_bytes() == store.path(stored.artifact_key).read_bytes()
        assert json.loads((folder / "adapter_config.json").read_text()) == stored.peft_config
        assert sorted(p.name for p in folder.iterdir()) == [
            ".gitattributes",
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "graft.json",
        ]
        if tag == "v1":
            assert {p: (folder / p).read_bytes() for p in v1_files} == v1_files

    row = publication_row(sessions, v1)
    assert (row.status, row.commit_oid, row.tag, row.attempts, row.error_code) == (
        "published",
        first.commit,
        "v1",
        1,
        None,
    )
    assert row.endpoint == hub.url and row.url == first.url and row.published_at is not None


def test_model_card_parses_with_the_right_metadata_and_links_parents(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    record_merge: Callable[..., int],
    tmp_path: Path,
) -> None:
    code, math = register("code", seed=1, tags=["code"]), register("math", seed=2, tags=["math"])
    code_pub = publish(code, sessions, store, hub_settings)  # math stays unpublished
    mix = record_merge("mix", [(code, 0.7), (math, 0.3)], expression="0.7*code + 0.3*math")
    published = publish(mix, sessions, store, hub_settings)

    folder = Path(
        snapshot_download(published.repo_id, revision="v1", endpoint=hub.url, cache_dir=tmp_path / "dl", token=False)
    )
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "graft-demo/tiny-llama"
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert {"lora", "graft", "merge", "merged"} <= set(data["tags"])
    assert "0.7*code + 0.3*math" in card.text
    assert f"[{code_pub.repo_id} @ v1]({code_pub.url})" in card.text  # parent link with repo and revision
    assert "| `math@1` | +0.3 |" in card.text and "not published" in card.text
    assert "retained energy: 100%" in card.text
    assert f'PeftModel.from_pretrained(base, "{published.repo_id}", revision="v1")' in card.text

    # The Hub's own view of the card (model info cardData) agrees.
    info = HfApi(endpoint=hub.url, token=False).model_info(published.repo_id, revision="v1")
    assert info.card_data is not None and info.card_data.base_model == "graft-demo/tiny-llama"
    assert info.sha == published.commit

    provenance = json.loads((folder / "graft.json").read_text())
    assert provenance["expression"] == "0.7*code + 0.3*math"
    assert provenance["plan"]["strategy"] == "linear"
    parents = {p["ref"]: p for p in provenance["parents"]}
    assert parents["code@1"]["sha256"] == version(sessions, code).sha256
    assert parents["math@1"]["sha256"] == version(sessions, math).sha256
    assert parents["math@1"]["coefficient"] == pytest.approx(0.3)

    # A plain upload: no merge tag, no expression section.
    upload_card = ModelCard(hub.read(code_pub.repo_id, "v1", "README.md").decode())
    assert "merge" not in upload_card.data.to_dict()["tags"] and "## Expression" not in upload_card.text


def test_two_500s_on_commit_then_success_publishes_exactly_once(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    vid = register("code")
    hub.fail_next("commit", 2, status=500)
    caplog.set_level(logging.DEBUG)
    outcome = publish(vid, sessions, store, hub_settings, sleep=sleeps.append)
    assert "retrying in 0.01s (attempt 1 of 5)" in caplog.text and HUB_TOKEN not in caplog.text
    assert outcome.attempts == 3 and not outcome.reused
    assert sleeps == [0.01, 0.02]  # exponential backoff
    assert len(publish_commits(hub, outcome.repo_id)) == 1
    assert hub.tags(outcome.repo_id) == {"v1": outcome.commit}
    row = publication_row(sessions, vid)
    assert (row.status, row.attempts, row.commit_oid) == ("published", 3, outcome.commit)


def test_a_lost_answer_after_the_commit_landed_does_not_duplicate_it(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    sleeps: list[float],
) -> None:
    vid = register("code")
    hub.fail_next("commit", 1, status=502, after_apply=True)  # committed, but the client sees a 502
    hub.fail_next("tag", 1, status=503)  # and the first tag attempt fails too
    outcome = publish(vid, sessions, store, hub_settings, sleep=sleeps.append)
    assert outcome.attempts == 3
    commits = publish_commits(hub, outcome.repo_id)
    assert len(commits) == 1 and commits[0].oid == outcome.commit
    assert hub.tags(outcome.repo_id) == {"v1": outcome.commit}


def test_gives_up_after_max_attempts_then_a_new_publish_retries_the_failed_row(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    sleeps: list[float],
) -> None:
    vid = register("code")
    settings = hub_settings.model_copy(update={"hub_max_attempts": 3})
    hub.fail_next("commit", 3, status=503)
    with pytest.raises(HubUnavailable) as caught:
        publish(vid, sessions, store, settings, sleep=sleeps.append)
    assert caught.value.code == "hub_unavailable" and "after 3 attempts" in caught.value.message
    row = publication_row(sessions, vid)
    assert (row.status, row.error_code, row.attempts, row.commit_oid) == ("failed", "hub_unavailable", 3, None)
    assert publish_commits(hub, f"{NAMESPACE}/code") == []

    outcome = publish(vid, sessions, store, settings, sleep=sleeps.append)
    row = publication_row(sessions, vid)
    assert (row.status, row.error_code, row.attempts) == ("published", None, 4)
    assert len(publish_commits(hub, outcome.repo_id)) == 1


def test_publishing_again_is_idempotent(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
) -> None:
    vid = register("code")
    first = publish(vid, sessions, store, hub_settings)
    again = publish(vid, sessions, store, hub_settings)
    assert again.reused and again.commit == first.commit and again.url == first.url

    # The database forgot (row lost after a crash, or reset): the tag with the same content is adopted.
    with session_scope(sessions) as session:
        session.execute(text("DELETE FROM publications"))
    requests_before = len(hub.requests)
    adopted = publish(vid, sessions, store, hub_settings)
    assert adopted.reused and adopted.commit == first.commit
    assert not any(r.path.endswith("/commit/main") for r in hub.requests[requests_before:])
    assert len(publish_commits(hub, first.repo_id)) == 1
    assert publication_row(sessions, vid).status == "published"


def test_a_tag_holding_other_content_is_a_conflict(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
) -> None:
    vid = register("code")
    repo_id = f"{NAMESPACE}/code"
    other = hub.put_files(repo_id, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"not ours"})
    hub.move_tag(repo_id, "v1", other)
    with pytest.raises(PublishConflict) as caught:
        publish(vid, sessions, store, hub_settings)
    assert caught.value.code == "publish_conflict"
    assert "already has tag v1" in caught.value.message and other[:12] in caught.value.message
    row = publication_row(sessions, vid)
    assert (row.status, row.error_code, row.attempts) == ("failed", "publish_conflict", 1)
    assert [c.oid for c in publish_commits(hub, repo_id)] == [other]  # nothing written

    # Resolved on the Hub (tag deleted): publishing again succeeds.
    hub.delete_tag(repo_id, "v1")
    outcome = publish(vid, sessions, store, hub_settings)
    assert hub.tags(repo_id) == {"v1": outcome.commit} and outcome.commit != other


def test_a_commit_racing_ours_is_detected_by_parent_commit_and_we_commit_on_top(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vid = register("code")
    repo_id = f"{NAMESPACE}/code"
    original = RemoteHub.commit
    intruders: list[str] = []

    def racing_commit(self: RemoteHub, repo_id: str, files: Any, **kwargs: Any) -> str:
        if not intruders:  # someone else commits between our refs read and our commit
            intruders.append(hub.put_files(repo_id, {"notes.txt": b"concurrent edit"}))
        return original(self, repo_id, files, **kwargs)

    monkeypatch.setattr(RemoteHub, "commit", racing_commit)
    outcome = publish(vid, sessions, store, hub_settings)
    commits = publish_commits(hub, repo_id)
    assert [c.oid for c in commits] == [outcome.commit, intruders[0]]  # ours on top of theirs, once
    assert commits[0].parent == intruders[0]
    assert outcome.attempts == 1  # a lost race is not a failed attempt
    assert any(r.status == 412 for r in hub.requests)


def test_a_wrong_token_fails_clearly_and_the_token_is_nowhere(
    hub: HubServer,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
) -> None:
    wrong = "hf_wrongWrongWrong0123456789XYZ"
    settings = make_settings(tmp_path / "graft", hub_endpoint=hub.url, hub_namespace=NAMESPACE, hub_token=wrong)
    vid = register("code")
    with pytest.raises(HubAuthFailed) as caught:
        publish(vid, sessions, store, settings)
    message = caught.value.message
    assert caught.value.code == "hub_auth_failed"
    assert "refused the credentials (401)" in message and "GRAFT_HUB_TOKEN" in message
    assert wrong not in message and wrong not in str(caught.value) and wrong not in repr(settings)
    assert all(r.status == 401 for r in hub.requests) and hub.requests  # the server did refuse it

    row = publication_row(sessions, vid)
    assert (row.status, row.error_code) == ("failed", "hub_auth_failed")
    with sessions() as session:  # no column of any row holds the token
        for table in ("publications", "adapter_versions", "adapters", "merge_jobs"):
            for record in session.execute(text(f"SELECT * FROM {table}")):
                assert all(wrong not in str(value) for value in record), table


def test_redaction_of_the_token_in_messages(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, hub_token="s3cr3t-token-value", hub_endpoint="http://127.0.0.1:9")
    assert settings.redact("auth Bearer s3cr3t-token-value failed") == "auth Bearer *** failed"
    assert settings.redact("leaked hf_abcdefghijklmnopqrstuvwxyz elsewhere") == "leaked *** elsewhere"
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in settings.model_dump_json()


def test_lineage_shows_the_hub_url_and_revision_of_published_versions(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    record_merge: Callable[..., int],
) -> None:
    code, math = register("code", seed=1), register("math", seed=2)
    mix = record_merge("mix", [(code, 1.0), (math, -1.0)], expression="code - math")
    published = publish(mix, sessions, store, hub_settings)
    parent = publish(code, sessions, store, hub_settings)
    with sessions() as session:
        graph = lineage_graph(session, repo.get_versions_by_ids(session, [mix])[mix], "up")
    nodes = {n["ref"]: n for n in graph["nodes"]}
    assert nodes["mix@1"]["hub"] == {
        "endpoint": hub.url,
        "repo_id": f"{NAMESPACE}/mix",
        "revision": "v1",
        "commit": published.commit,
        "url": f"{hub.url}/{NAMESPACE}/mix/tree/v1",
    }
    assert nodes["code@1"]["hub"]["url"] == parent.url
    assert nodes["math@1"]["hub"] is None


def test_explicit_repo_and_a_missing_namespace(
    hub: HubServer,
    hub_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    tmp_path: Path,
) -> None:
    vid = register("code")
    outcome = publish(vid, sessions, store, hub_settings, repo_id="acme/code-lora")
    assert outcome.repo_id == "acme/code-lora" and hub.tags("acme/code-lora") == {"v1": outcome.commit}

    from registry.errors import InvalidInput

    no_namespace = make_settings(tmp_path / "g2", hub_endpoint=hub.url, hub_token=HUB_TOKEN)
    with pytest.raises(InvalidInput, match="GRAFT_HUB_NAMESPACE"):
        publish(vid, sessions, store, no_namespace)
    with pytest.raises(InvalidInput, match="invalid Hub repo"):
        publish(vid, sessions, store, hub_settings, repo_id="not a repo")


def test_a_timeout_is_retried_with_backoff(
    hub: HubServer,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    sleeps: list[float],
) -> None:
    settings = make_settings(
        tmp_path / "graft", hub_endpoint=hub.url, hub_namespace=NAMESPACE, hub_token=HUB_TOKEN, hub_timeout_seconds=0.3
    )
    vid = register("code")
    hub.slow_next(r"/refs$", 1, seconds=1.5)
    outcome = publish(vid, sessions, store, settings, sleep=sleeps.append)
    assert outcome.attempts == 2 and sleeps == [0.01]
    assert len(publish_commits(hub, outcome.repo_id)) == 1
