"""Publishing and Hub ingest over HTTP, against the Hub-compatible test server.

The app runs with the embedded dispatcher (no broker), made synchronous: the merge runner and the publisher
run in-process right after the commit instead of in background threads, so each request's work is done when
it returns. Everything else is as in production: the routes, the unit of work, the publisher, the Hub client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.hf_api  # noqa: F401 (the `hub` fixture patches it)
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.dispatch import EmbeddedDispatcher
from api.runtime import Runtime
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.services.tokens import create_token
from registry.settings import Settings
from tests.api.test_http_adapters import assert_error
from tests.hub.conftest import HUB_TOKEN, NAMESPACE, hub, hub_server  # noqa: F401 (fixtures)
from tests.hub_server import HubServer
from workers.embedded import EmbeddedRunner


class HubApi:
    def __init__(self, client: TestClient, token: str, read_token: str) -> None:
        self.client, self.token, self.read_token = client, token, read_token

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def upload(self, name: str, folder: Path) -> Any:
        files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
        return self.client.post("/v1/adapters", data={"name": name}, files=files, headers=self.auth())

    def publish(self, ref: str, **kwargs: Any) -> Any:
        name, version = ref.split("@")
        return self.client.post(f"/v1/adapters/{name}/versions/{version}/publish", headers=self.auth(), **kwargs)

    def publication(self, ref: str) -> Any:
        name, version = ref.split("@")
        return self.client.get(f"/v1/adapters/{name}/versions/{version}/publish")


@pytest.fixture
def hub_api(
    hub: HubServer,  # noqa: F811
    pg_url: str,
    pg_engine: Engine,
    api_sessions: sessionmaker[Session],
    tmp_path: Path,
) -> Iterator[HubApi]:
    settings = Settings(
        home=tmp_path / "home",
        database_url=pg_url,
        hub_endpoint=hub.url,
        hub_namespace=NAMESPACE,
        hub_token=HUB_TOKEN,
        hub_backoff_seconds=0.01,
        hub_backoff_max_seconds=0.05,
        hub_timeout_seconds=10.0,
        hub_max_attempts=5,
    )
    store = ArtifactStore(tmp_path / "artifacts")
    runner = EmbeddedRunner(api_sessions, store, device="cpu", progress_interval=0.0)

    def run_queued() -> None:
        while runner.run_once() is not None:
            pass

    def spawn(action: Callable[[], None]) -> None:
        action()

    dispatcher = EmbeddedDispatcher(run_queued, spawn=spawn, poll_interval=0.01)
    app = create_app(settings, runtime=Runtime(settings, pg_engine, api_sessions, store), dispatcher=dispatcher)
    with session_scope(api_sessions) as session:
        write = create_token(session, "test-write", "write").secret
        read = create_token(session, "test-read", "read").secret
    with TestClient(app, raise_server_exceptions=False) as client:
        yield HubApi(client, write, read)


def test_publish_a_version_over_http(hub_api: HubApi, hub: HubServer, make_adapter: Any) -> None:  # noqa: F811
    assert hub_api.upload("code", make_adapter("code", seed=1)).status_code == 201

    response = hub_api.publish("code@1")
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "pending" and queued["tag"] == "v1" and queued["repo"] == f"{NAMESPACE}/code"

    published = hub_api.publication("code@1").json()
    assert published["status"] == "published", published
    assert published["tag"] == "v1" and published["error"] is None and published["attempts"] >= 1
    repo_id = f"{NAMESPACE}/code"
    assert hub.tags(repo_id)["v1"] == published["commit"]
    assert published["commit"] == hub.commits(repo_id)[0].oid and published["url"]
    assert hub.read(repo_id, "v1", "adapter_model.safetensors")

    # Publishing again is idempotent: 200 with the same publication, nothing new on the Hub.
    commits = len(hub.commits(repo_id))
    again = hub_api.publish("code@latest")
    assert again.status_code == 200, again.text
    assert again.json()["commit"] == published["commit"] and again.json()["status"] == "published"
    assert len(hub.commits(repo_id)) == commits


def test_publish_auth_and_not_found(hub_api: HubApi, make_adapter: Any) -> None:
    assert hub_api.upload("code", make_adapter("code", seed=1)).status_code == 201
    assert_error(hub_api.client.post("/v1/adapters/code/versions/1/publish"), 401, "unauthenticated")
    assert_error(
        hub_api.client.post("/v1/adapters/code/versions/1/publish", headers=hub_api.auth(hub_api.read_token)),
        403,
        "forbidden",
    )
    assert_error(hub_api.publish("code@7"), 404, "version_not_found")
    assert_error(hub_api.publish("ghost@1"), 404, "adapter_not_found")
    assert_error(hub_api.publication("code@1"), 404, "not_found")  # not published yet
    assert_error(hub_api.publish("code@1", json={"repo": "not a repo!"}), 422, "invalid_input")


def test_merge_with_publish_ends_published(hub_api: HubApi, hub: HubServer, make_adapter: Any) -> None:  # noqa: F811
    for seed, name in enumerate(("code", "math"), start=1):
        assert hub_api.upload(name, make_adapter(name, seed=seed)).status_code == 201
    body = {"expression": "0.7*code + 0.3*math", "name": "mix", "publish": True}
    response = hub_api.client.post("/v1/merges", json=body, headers=hub_api.auth())
    assert response.status_code == 202, response.text
    job = hub_api.client.get(f"/v1/merges/{response.json()['id']}").json()
    assert job["status"] == "succeeded" and job["result"] == "mix@1", job

    published = hub_api.publication("mix@1").json()
    assert published["status"] == "published" and published["tag"] == "v1", published
    assert hub.tags(f"{NAMESPACE}/mix")["v1"] == published["commit"]


def test_ingest_from_the_hub_over_http(hub_api: HubApi, hub: HubServer, make_adapter: Any) -> None:  # noqa: F811
    folder = make_adapter("remote", seed=5)
    commit = hub.put_files("acme/code-lora", {p.name: p.read_bytes() for p in folder.iterdir()})
    hub.move_tag("acme/code-lora", "release", commit)

    body = {"name": "code", "hub_repo": "acme/code-lora", "revision": "release", "tags": ["code"]}
    response = hub_api.client.post("/v1/adapters", json=body, headers=hub_api.auth())
    assert response.status_code == 201, response.text
    version = response.json()["version"]
    assert version["ref"] == "code@1" and version["source"] == "hub" and version["tags"] == ["code"]
    again = hub_api.client.post("/v1/adapters", json=body, headers=hub_api.auth())
    assert again.status_code == 200 and again.json()["created"] is False

    missing = {"name": "x", "hub_repo": "acme/nope", "revision": "main"}
    assert_error(hub_api.client.post("/v1/adapters", json=missing, headers=hub_api.auth()), 404, "hub_not_found")
    hub.put_files("acme/pickled", {"adapter_config.json": b"{}", "adapter_model.bin": b"x"})
    pickled = {"name": "x", "hub_repo": "acme/pickled"}
    assert_error(hub_api.client.post("/v1/adapters", json=pickled, headers=hub_api.auth()), 422, "invalid_adapter")
    bad = {"name": "x", "hub_repo": "../etc"}
    assert_error(hub_api.client.post("/v1/adapters", json=bad, headers=hub_api.auth()), 422, "invalid_request")
    assert_error(hub_api.client.post("/v1/adapters", json=body), 401, "unauthenticated")
    hub.fail_next("info", count=10, status=503)
    flaky = {"name": "y", "hub_repo": "acme/code-lora"}
    assert_error(hub_api.client.post("/v1/adapters", json=flaky, headers=hub_api.auth()), 503, "hub_unavailable")


def test_ingest_refuses_bad_names_and_repo_ids_before_asking_the_hub(
    hub_api: HubApi,
    hub: HubServer,  # noqa: F811
    make_adapter: Any,
) -> None:
    # Found by the OpenAPI fuzzer: repo ids the Hub's own client refuses ('--', '..', a part over 96 characters)
    # were answered 502 hub_error, as if the Hub had failed; they are the caller's mistake.
    for repo_id in ("acme..x/lora", "acme/lo--ra", "acme/" + "a" * 97):
        response = hub_api.client.post("/v1/adapters", json={"name": "x", "hub_repo": repo_id}, headers=hub_api.auth())
        error = assert_error(response, 422, "invalid_input")
        assert "invalid Hub repo" in error["message"]
    body = {"name": "1-bad name", "hub_repo": "acme/code-lora"}
    assert_error(hub_api.client.post("/v1/adapters", json=body, headers=hub_api.auth()), 422, "invalid_input")
    assert hub.requests == []  # nothing was downloaded to be refused afterwards

    # A revision beyond latin-1 is an unknown revision (the test Hub used to fail on it with a 500: its error
    # header could not be encoded).
    folder = make_adapter("remote", seed=5)
    hub.put_files("acme/code-lora", {p.name: p.read_bytes() for p in folder.iterdir()})
    body = {"name": "x", "hub_repo": "acme/code-lora", "revision": "v\u2603"}
    assert_error(hub_api.client.post("/v1/adapters", json=body, headers=hub_api.auth()), 404, "hub_not_found")
