"""Fixtures for the REST API over HTTP (httpx, through Starlette's TestClient) on the real PostgreSQL server.

Each test's requests share one connection whose outer transaction is rolled back afterwards (the root
conftest's technique): the API's own commits become savepoint releases, invisible to other tests. The
dispatcher is the real Celery one, sending to the real Redis under a key prefix and queue names unique to the
test; tests read the queue back to see what was sent, and that a job id is sent only after its row is
committed. The worker side runs the queued job in-process with ``execute_job``, as a worker would (the real
worker process is exercised in tests/workers/test_celery_e2e.py).
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.dispatch import CeleryDispatcher
from api.runtime import Runtime
from registry.artifacts import ArtifactStore
from registry.db import make_engine, session_scope
from registry.migrate import upgrade_to_head
from registry.models import MergeJob
from registry.services.tokens import create_token
from registry.settings import Settings
from workers.jobs import JobResult, execute_job

REDIS_DB = 10
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: every send and ping is refused


class ObservedDispatcher(CeleryDispatcher):
    """The real Celery dispatcher, sending to the real Redis under a key prefix of its own.

    It also notes, for each job id it sends, whether the job row was already committed (read back through
    the test's session factory), and reads back what really reached the broker's merge queue.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__(settings)
        self._sessions = sessions
        self._queue_key = f"{settings.broker_transport_options['global_keyprefix']}{settings.merge_queue}"
        self.committed_when_enqueued: list[bool] = []

    def enqueue_merge(self, job_id: str) -> None:
        with self._sessions() as session:
            self.committed_when_enqueued.append(session.get(MergeJob, job_id) is not None)
        super().enqueue_merge(job_id)

    @property
    def enqueued(self) -> list[str]:
        """The job ids waiting in the merge queue on Redis, oldest first."""
        broker = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        messages = [json.loads(raw) for raw in reversed(broker.lrange(self._queue_key, 0, -1))]
        return [json.loads(base64.b64decode(m["body"]))[0][0] for m in messages]


@dataclass
class Api:
    """A client for the app, its dispatcher and store, and tokens of each scope."""

    client: TestClient
    dispatcher: ObservedDispatcher
    sessions: sessionmaker[Session]
    store: ArtifactStore
    tokens: dict[str, str]

    def auth(self, scope: str = "write") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}

    def upload(self, name: str, folder: Path, *, scope: str = "write", **form: str) -> Any:
        files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
        return self.client.post("/v1/adapters", data={"name": name, **form}, files=files, headers=self.auth(scope))

    def upload_files(self, name: str, files: dict[str, bytes], **form: str) -> Any:
        parts = [("files", (fname, io.BytesIO(data), "application/octet-stream")) for fname, data in files.items()]
        return self.client.post("/v1/adapters", data={"name": name, **form}, files=parts, headers=self.auth())

    def merge(self, expression: str, name: str, **extra: Any) -> Any:
        headers = {**self.auth(), **extra.pop("headers", {})}
        return self.client.post("/v1/merges", json={"expression": expression, "name": name, **extra}, headers=headers)

    def run(self, job_id: str) -> JobResult:
        """Do what a worker does with a queued job id."""
        return execute_job(job_id, sessions=self.sessions, store=self.store, device="cpu", progress_interval=0.0)


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def api_sessions(pg_engine: Engine) -> Iterator[sessionmaker[Session]]:
    connection = pg_engine.connect()
    outer = connection.begin()
    yield sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    outer.rollback()
    connection.close()


def build_api(
    pg_url: str, engine: Engine, sessions: sessionmaker[Session], root: Path, **settings: Any
) -> Iterator[Api]:
    """The app on ``pg_url`` with a real Celery dispatcher on the local Redis (queues and keys unique to it)."""
    run = uuid.uuid4().hex[:10]
    prefix = f"graft-api-test-{run}:"
    config = Settings(
        **{
            "home": root / "home",
            "database_url": pg_url,
            "broker_url": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "broker_transport_options": {"global_keyprefix": prefix},
            "merge_queue": f"merge-{run}",
            "publish_queue": f"publish-{run}",
            **settings,
        }
    )
    store = ArtifactStore(root / "artifacts")
    dispatcher = ObservedDispatcher(config, sessions)
    app = create_app(config, runtime=Runtime(config, engine, sessions, store), dispatcher=dispatcher)
    with session_scope(sessions) as session:
        tokens = {scope: create_token(session, f"test-{scope}", scope).secret for scope in ("read", "write", "admin")}
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Api(client, dispatcher, sessions, store, tokens)
    finally:
        broker = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
        for key in broker.scan_iter(match=f"{prefix}*"):
            broker.delete(key)


@pytest.fixture
def api(pg_url: str, pg_engine: Engine, api_sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[Api]:
    """The app on PostgreSQL with open reads (the default)."""
    yield from build_api(pg_url, pg_engine, api_sessions, tmp_path)


@pytest.fixture
def closed_api(pg_url: str, pg_engine: Engine, api_sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[Api]:
    """The app with GRAFT_PUBLIC_READS=false and a small upload limit."""
    yield from build_api(pg_url, pg_engine, api_sessions, tmp_path, public_reads=False, max_upload_bytes=4096)


@pytest.fixture
def brokerless_api(
    pg_url: str, pg_engine: Engine, api_sessions: sessionmaker[Session], tmp_path: Path
) -> Iterator[Api]:
    """The app configured with a broker that refuses connections (a Redis that is down)."""
    yield from build_api(pg_url, pg_engine, api_sessions, tmp_path, broker_url=UNREACHABLE_BROKER)
