"""``graft publish``, ``graft merge --publish``, ``graft register hf://…`` and lineage links, end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from api.cli import app
from bench.synthetic import write_demo_adapters
from tests.hub.conftest import HUB_TOKEN
from tests.hub_server import HubServer

Graft = Callable[..., Any]


@pytest.fixture
def graft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Graft:
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    for name in ("GRAFT_DATABASE_URL", "GRAFT_HUB_ENDPOINT", "GRAFT_HUB_NAMESPACE", "GRAFT_HUB_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def run(*args: str, expect: int = 0) -> Any:
        result = runner.invoke(app, list(args))
        assert result.exit_code == expect, f"exit {result.exit_code}\nstdout:{result.stdout}\nstderr:{result.stderr}"
        return result

    return run


@pytest.fixture
def demo_dirs(tmp_path: Path) -> dict[str, Path]:
    return {p.name: p for p in write_demo_adapters(tmp_path / "adapters")}


def test_merge_publish_to_the_local_folder_then_lineage_and_republish(
    graft: Graft, demo_dirs: dict[str, Path], tmp_path: Path
) -> None:
    for name in ("code", "toxic"):
        graft("register", str(demo_dirs[name]), "--name", name, "--tags", name)
    graft("publish", "code@1")
    merged = json.loads(graft("merge", "base + code - toxic", "--name", "code-detox", "--publish", "--json").stdout)
    publication = merged["publication"]
    assert publication["status"] == "published" and publication["local"] and publication["tag"] == "v1"
    assert publication["repo_id"] == "graft/code-detox"
    snapshot = Path(publication["url"].removeprefix("file://"))
    assert snapshot.parent.parent == (tmp_path / "home" / "hub" / "models--graft--code-detox").resolve()
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.base_model == "graft-demo/tiny-llama" and "merge" in card.data.tags
    assert "base + code - toxic" in card.text and "[graft/code @ v1](file://" in card.text

    text = graft("lineage", "code-detox").stdout
    assert "graft/code-detox@v1" in text and "graft/code@v1" in text
    again = graft("publish", "code-detox").stdout
    assert "already published code-detox@1 to graft/code-detox@v1" in again


def test_publish_and_register_from_the_hub_through_the_cli(
    graft: Graft, demo_dirs: dict[str, Path], hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAFT_HUB_ENDPOINT", hub.url)
    monkeypatch.setenv("GRAFT_HUB_NAMESPACE", "team")
    monkeypatch.setenv("GRAFT_HUB_TOKEN", HUB_TOKEN)
    graft("register", str(demo_dirs["code"]), "--name", "code")
    out = graft("publish", "code@1").stdout
    assert f"published code@1 to team/code@v1 on {hub.url}" in out and f"{hub.url}/team/code/tree/v1" in out
    commit = hub.tags("team/code")["v1"]

    registered = json.loads(graft("register", "hf://team/code@v1", "--name", "code-mirror", "--json").stdout)
    assert registered["created"] and registered["source"] == "hub"
    origin = registered["hub_origin"]
    assert (origin["repo_id"], origin["revision"], origin["commit"]) == ("team/code", "v1", commit)
    shown = json.loads(graft("show", "code-mirror", "--json").stdout)
    assert shown["hub_origin"] == origin and shown["source"] == "hub"

    # A wrong token: exit status for a gateway error, a clear message, no token.
    monkeypatch.setenv("GRAFT_HUB_TOKEN", "hf_notTheRightToken000000000000")
    graft("register", str(demo_dirs["math"]), "--name", "math")
    failed = graft("publish", "math", expect=1)
    assert "refused the credentials (401)" in failed.stderr and "hf_notTheRightToken" not in failed.stderr
