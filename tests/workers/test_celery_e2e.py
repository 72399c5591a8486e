"""End to end with real parts: the API over HTTP (uvicorn), real ``celery worker`` processes, the real Redis
on 127.0.0.1:6379 and a fresh PostgreSQL database.

Redis isolation: a dedicated database number, a key prefix and queue names unique to this run, all removed
afterwards. The workers run ``tests.workers.celery_slow``: the production Celery app with a per-module
delay, so that a test can SIGKILL a worker in the middle of a merge.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
import uvicorn
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from api.app import create_app
from bench.synthetic import TINY, write_adapter
from registry.artifacts import ArtifactStore
from registry.db import make_engine, make_session_factory, session_scope
from registry.migrate import upgrade_to_head
from registry.services.tokens import create_token
from registry.settings import Settings
from tests.conftest import create_pg_database, drop_pg_database
from workers.jobs import execute_job

REDIS_DB = 9
ROOT = Path(__file__).resolve().parents[2]
MODULE_DELAY = 0.25  # seconds per module in the first worker: a 14-module merge takes ~3.5 s


def _redis_up() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not _redis_up(), reason="needs Redis on 127.0.0.1:6379 (make services)"),
]


@dataclass
class Service:
    url: str
    token: str
    env: dict[str, str]
    root: Path
    adapters: dict[str, Path]
    prefix: str
    db_url: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        """A real ``celery worker`` process (prefork, one child); returns once it is consuming."""
        log = self.root / f"{name}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "tests.workers.celery_slow", "worker",
            "-Q", self.env["GRAFT_MERGE_QUEUE"], "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{name}-{self.prefix}@%h",
        ]  # fmt: skip
        with log.open("wb") as handle:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**self.env, **env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(process)
        deadline = time.monotonic() + 60
        while b" ready." not in log.read_bytes():
            assert process.poll() is None, f"worker {name} exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"worker {name} did not start:\n{log.read_text()}"
            time.sleep(0.1)
        return process


def wait_for(client: httpx.Client, job_id: str, predicate: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/merges/{job_id}").json()
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"timed out waiting on job: {job}"
        time.sleep(0.05)


def assert_no_scratch_left(root: Path, timeout: float = 10) -> None:
    """The killed process's scratch folder was swept, and the rerun removed its own (just after recording)."""
    tmp = root / "artifacts" / "tmp"
    deadline = time.monotonic() + timeout
    while tmp.is_dir() and any(tmp.iterdir()):
        assert time.monotonic() < deadline, f"scratch left behind: {sorted(p.name for p in tmp.iterdir())}"
        time.sleep(0.05)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("e2e")
    run = uuid.uuid4().hex[:10]
    prefix = f"graft-test-{run}:"
    db_url = create_pg_database("graft_e2e")
    engine = make_engine(db_url)
    upgrade_to_head(engine)
    env_settings = {
        "GRAFT_HOME": str(root / "home"),
        "GRAFT_DATABASE_URL": db_url,
        "GRAFT_ARTIFACTS_DIR": str(root / "artifacts"),
        "GRAFT_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "GRAFT_BROKER_TRANSPORT_OPTIONS": json.dumps(
            {"global_keyprefix": prefix, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
        ),
        "GRAFT_MERGE_QUEUE": f"merge-{run}",
        "GRAFT_PUBLISH_QUEUE": f"publish-{run}",
        "GRAFT_PROGRESS_INTERVAL_SECONDS": "0.05",
    }
    settings = Settings(
        home=root / "home",
        database_url=db_url,
        artifacts_dir=root / "artifacts",
        broker_url=env_settings["GRAFT_BROKER_URL"],
        broker_transport_options=json.loads(env_settings["GRAFT_BROKER_TRANSPORT_OPTIONS"]),
        merge_queue=env_settings["GRAFT_MERGE_QUEUE"],
        publish_queue=env_settings["GRAFT_PUBLISH_QUEUE"],
    )
    with session_scope(make_session_factory(engine)) as session:
        token = create_token(session, "e2e", "write").secret

    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    adapters = {
        name: write_adapter(
            root / "adapters" / name, TINY.modules(), base_model=TINY.base_model, rank=8, alpha=16, seed=s
        )
        for s, name in enumerate(("code", "math", "toxic"), start=1)
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(env_settings, PYTHONPATH=str(ROOT), GRAFT_TEST_PID_FILE=str(root / "merging.pid"))
    service = Service(f"http://127.0.0.1:{port}", token, env, root, adapters, prefix, db_url)
    try:
        yield service
    finally:
        for process in service.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        server.should_exit = True
        thread.join(timeout=10)
        broker = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        for key in broker.scan_iter(match=f"{prefix}*"):
            broker.delete(key)
        engine.dispose()
        drop_pg_database(db_url)


@pytest.fixture(scope="module")
def worker(service: Service) -> subprocess.Popen[bytes]:
    return service.start_worker("w1", GRAFT_TEST_MODULE_DELAY=str(MODULE_DELAY))


def upload(client: httpx.Client, name: str, folder: Path) -> dict[str, Any]:
    files = [("files", (p.name, io.BytesIO(p.read_bytes()))) for p in sorted(folder.iterdir())]
    response = client.post("/v1/adapters", data={"name": name, "tags": name}, files=files)
    assert response.status_code == 201, response.text
    return dict(response.json())


def delta(tensors: dict[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    return scale * tensors[f"{module}.lora_B.weight"].double() @ tensors[f"{module}.lora_A.weight"].double()


def test_upload_merge_over_http_and_verify_the_delta(service: Service, worker: subprocess.Popen[bytes]) -> None:
    with service.client() as client:
        for name, folder in service.adapters.items():
            assert upload(client, name, folder)["version"]["ref"] == f"{name}@1"
        ready = client.get("/readyz").json()
        assert ready == {"status": "ready", "database": "ok", "broker": "reachable", "mode": "celery"}
        submitted = client.post("/v1/merges", json={"expression": "base + code - toxic", "name": "code-detox"})
        assert submitted.status_code == 202, submitted.text
        job = wait_for(client, submitted.json()["id"], finished)
        assert job["status"] == "succeeded", job
        assert job["result"] == "code-detox@1" and job["attempts"] == 1

        weights = client.get("/v1/adapters/code-detox/versions/1/files/adapter_model.safetensors")
        config = client.get("/v1/adapters/code-detox/versions/1/files/adapter_config.json").json()
        lineage = client.get("/v1/adapters/code-detox/versions/1/lineage").json()
        metrics = client.get("/metrics").text

    merged = load_tensors(weights.content)
    merged_scale = config["lora_alpha"] / config["r"]
    code = load_file(service.adapters["code"] / "adapter_model.safetensors")
    toxic = load_file(service.adapters["toxic"] / "adapter_model.safetensors")
    for module in TINY.modules():
        expected = delta(code, module, 16 / 8) - delta(toxic, module, 16 / 8)
        got = delta(merged, module, merged_scale)
        assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4), module

    assert {(e["parent"], e["coefficient"]) for e in lineage["edges"]} == {("code@1", 1.0), ("toxic@1", -1.0)}
    assert 'graft_merge_jobs{status="succeeded"} 1' in metrics


def test_a_killed_pool_process_is_replaced_and_the_job_rerun(service: Service, worker: subprocess.Popen[bytes]) -> None:
    """reject_on_worker_lost: SIGKILL the process running the merge; the worker requeues and reruns it."""
    pid_file = service.root / "merging.pid"
    pid_file.unlink(missing_ok=True)
    with service.client() as client:
        job_id = client.post("/v1/merges", json={"expression": "code + math", "name": "pair"}).json()["id"]
        wait_for(client, job_id, lambda j: j["progress"]["done"] >= 1)
        child = int(pid_file.read_text())
        assert child != worker.pid
        os.kill(child, signal.SIGKILL)
        job = wait_for(client, job_id, finished)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        assert client.get("/v1/adapters/pair").json()["version_numbers"] == [1]
    assert worker.poll() is None  # the worker itself lived on
    assert_no_scratch_left(service.root)


def test_a_killed_worker_is_replaced_by_a_new_one_that_finishes_the_job(
    service: Service, worker: subprocess.Popen[bytes]
) -> None:
    """acks_late: SIGKILL the whole worker mid-merge; a new worker gets the unacknowledged task and finishes it."""
    with service.client() as client:
        job_id = client.post("/v1/merges", json={"expression": "code - 0.5*math", "name": "crash"}).json()["id"]
        wait_for(client, job_id, lambda j: j["progress"]["done"] >= 1)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        time.sleep(0.5)
        stuck = client.get(f"/v1/merges/{job_id}").json()
        assert stuck["status"] == "running" and stuck["attempts"] == 1  # nobody is on it now

        # The new worker uses a short visibility timeout, so it reclaims the dead worker's task within seconds.
        service.start_worker("w2", GRAFT_VISIBILITY_TIMEOUT_SECONDS="3", GRAFT_MERGE_TIME_LIMIT_SECONDS="2")
        job = wait_for(client, job_id, finished, timeout=60)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        assert client.get("/v1/adapters/crash").json()["version_numbers"] == [1]
        versions = client.get("/v1/adapters", params={"q": "crash"}).json()
        assert versions["total"] == 1 and versions["items"][0]["versions"] == 1
    assert_no_scratch_left(service.root)


def test_concurrent_results_for_one_adapter_get_versions_without_gaps_or_duplicates(service: Service) -> None:
    """20 submissions at once into one adapter, run by concurrent workers: versions 1..20, each exactly once."""

    def submit(i: int) -> str:
        with service.client() as client:
            response = client.post("/v1/merges", json={"expression": f"{i + 1}*code", "name": "many"})
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

    with ThreadPoolExecutor(10) as pool:
        ids = list(pool.map(submit, range(20)))
    assert len(set(ids)) == 20

    # Six in-process "workers" race each other (and any Celery worker still up) over the same jobs.
    engine = make_engine(service.db_url)
    sessions = make_session_factory(engine)
    store = ArtifactStore(Path(service.env["GRAFT_ARTIFACTS_DIR"]))
    try:
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(
                pool.map(
                    lambda j: execute_job(j, sessions=sessions, store=store, device="cpu", progress_interval=60), ids
                )
            )
    finally:
        engine.dispose()
    assert {o.status for o in outcomes} == {"succeeded"}
    with service.client() as client:
        jobs = [wait_for(client, job_id, finished) for job_id in ids]
        assert {j["status"] for j in jobs} == {"succeeded"}
        assert sorted(int(j["result"].split("@")[1]) for j in jobs) == list(range(1, 21))
        assert client.get("/v1/adapters/many").json()["version_numbers"] == list(range(1, 21))
