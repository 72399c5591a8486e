"""docker-compose.yml: its shape, and its services' own commands run as written, on this machine.

There is no container runtime in CI, so the stack is reproduced with local processes: the ``migrate``,
``api`` and ``worker`` commands are taken verbatim from the compose file and run with the file's
``GRAFT_*`` environment, where only what containers would provide is replaced: the ``postgres`` and ``redis``
host names become the local servers (a scratch database; a Redis key prefix and queues of our own), the data
volume a temporary folder, and the API's port a free one; the Hub is the suite's Hub-compatible server. A
merge with ``publish`` then goes through the stack end to end: the API queues it, the worker merges, then
its publish task commits the version to the Hub through the real ``huggingface_hub`` client.
A typo in a command, a wrong module path or a missing setting in the file fails this test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from bench.synthetic import TINY, write_adapter
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
REDIS_DB = 11
HUB_TOKEN = "hf_compose_test"
NAMESPACE = "graft-compose"
BIN = Path(sys.executable).parent


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_the_services_and_their_guarantees() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    assert services["redis"]["command"][-2:] == ["--appendonly", "yes"]  # queued jobs survive a Redis restart
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert services["migrate"]["restart"] == "no"  # a one-shot
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # The API and the workers share the artifact volume: workers write versions the API serves.
    assert services["api"]["volumes"] == services["worker"]["volumes"]
    env = services["api"]["environment"]
    assert env["GRAFT_ARTIFACTS_DIR"].startswith(services["api"]["volumes"][0].split(":")[1])
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_command(command: list[str], port: int) -> list[str]:
    """The compose command, with the executable taken from this venv and the container port made free."""
    executable = shutil.which(command[0], path=str(BIN))
    assert executable is not None, f"{command[0]!r} (from docker-compose.yml) is not installed by the package"
    rest = [str(port) if arg == "8000" else arg for arg in command[1:]]
    return [executable, *rest]


@dataclass
class Stack:
    env: dict[str, str]
    hub: HubServer


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    file_env: dict[str, str] = compose()["x-graft-env"]
    run = uuid.uuid4().hex[:10]
    db_url = create_pg_database("graft_compose")
    assert file_env["GRAFT_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in file_env[
        "GRAFT_DATABASE_URL"
    ]
    assert file_env["GRAFT_BROKER_URL"].startswith("redis://redis:6379/")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAFT_", "HF_"))}
    env.update(file_env)
    env.update(
        GRAFT_DATABASE_URL=db_url,
        GRAFT_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        GRAFT_BROKER_TRANSPORT_OPTIONS=json.dumps({"global_keyprefix": f"graft-compose-{run}:"}),
        GRAFT_MERGE_QUEUE=f"merge-{run}",
        GRAFT_PUBLISH_QUEUE=f"publish-{run}",
        GRAFT_HOME=str(tmp_path / "var-lib-graft"),
        GRAFT_ARTIFACTS_DIR=str(tmp_path / "var-lib-graft" / "artifacts"),
        GRAFT_HUB_NAMESPACE=NAMESPACE,
        GRAFT_HUB_TOKEN=HUB_TOKEN,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_XET="1",  # the test Hub takes files inline, as the real Hub does for small ones
    )
    hub = HubServer(tmp_path / "hub", token=HUB_TOKEN)
    try:
        with hub:
            env.update(GRAFT_HUB_ENDPOINT=hub.url)
            yield Stack(env, hub)
    finally:
        broker = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        for key in broker.scan_iter(match=f"graft-compose-{run}:*"):
            broker.delete(key)
        drop_pg_database(db_url)


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_the_stack_merges_and_publishes_with_the_files_own_commands(stack: Stack, tmp_path: Path) -> None:
    services = compose()["services"]
    stack_env = stack.env
    port = free_port()
    migrated = subprocess.run(
        local_command(services["migrate"]["command"], port), cwd=ROOT, env=stack_env, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr

    # The worker listens on the queues the file names, under this test's queue names.
    worker_command = local_command(services["worker"]["command"], port)
    queues = worker_command.index("-Q") + 1
    assert worker_command[queues] == "merge,publish"
    worker_command[queues] = f"{stack_env['GRAFT_MERGE_QUEUE']},{stack_env['GRAFT_PUBLISH_QUEUE']}"
    processes = [
        start(local_command(services["api"]["command"], port), stack_env, tmp_path / "api.log"),
        start([*worker_command, "--without-gossip", "--without-mingle"], stack_env, tmp_path / "worker.log"),
    ]
    try:
        token = subprocess.run(
            [str(BIN / "graft"), "token", "create", "--scope", "write", "--name", "compose", "--json"],
            cwd=ROOT, env=stack_env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        secret = json.loads(token)["token"]
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert all(p.poll() is None for p in processes), (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "the api service did not become ready"
            time.sleep(0.2)

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:
            for seed, name in enumerate(("code", "toxic"), start=1):
                folder = write_adapter(tmp_path / name, TINY.modules(), base_model=TINY.base_model, seed=seed)
                files = [("files", (p.name, io.BytesIO(p.read_bytes()))) for p in sorted(folder.iterdir())]
                assert client.post("/v1/adapters", data={"name": name}, files=files).status_code == 201
            body = {"expression": "code - toxic", "name": "detox", "publish": True}
            job = client.post("/v1/merges", json=body).json()
            deadline = time.monotonic() + 60
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
                job = client.get(f"/v1/merges/{job['id']}").json()
            assert job["status"] == "succeeded", job
            weights = client.get("/v1/adapters/detox/versions/1/files/adapter_model.safetensors")
            assert weights.status_code == 200 and weights.headers["etag"].strip('"') == json.loads(
                client.get("/v1/adapters/detox/versions/1").text
            )["sha256"]
            # The worker's merge task sent graft.publish to the publish queue; the same worker publishes.
            publication = client.get("/v1/adapters/detox/versions/1/publish")
            while publication.status_code == 404 or publication.json()["status"] == "pending":
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
                publication = client.get("/v1/adapters/detox/versions/1/publish")
            assert publication.json()["status"] == "published", publication.json()
            assert stack.hub.tags(f"{NAMESPACE}/detox")["v1"] == publication.json()["commit"]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
