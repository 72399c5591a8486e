"""Fixtures for the REST API over HTTP (httpx, through Starlette's TestClient) on the real PostgreSQL server.

Each test's requests share one connection whose outer transaction is rolled back afterwards (the root
conftest's technique): the API's own commits become savepoint releases, invisible to other tests. The
dispatcher records what would have been sent to the broker, so tests can assert that a job id is queued
only after its row is committed; the worker side runs jobs in-process with ``execute_job``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.runtime import Runtime
from registry.artifacts import ArtifactStore
from registry.db import make_engine, session_scope
from registry.errors import BrokerUnavailable
from registry.migrate import upgrade_to_head
from registry.models import MergeJob
from registry.services.tokens import create_token
from registry.settings import Settings
from workers.jobs import JobResult, execute_job


@dataclass
class RecordingDispatcher:
    """Stands in for the broker: records job ids, and can be told to refuse them."""

    sessions: sessionmaker[Session]
    enqueued: list[str] = field(default_factory=list)
    committed_when_enqueued: list[bool] = field(default_factory=list)
    down: bool = False
    mode: Literal["celery", "embedded"] = "celery"

    def enqueue_merge(self, job_id: str) -> None:
        if self.down:
            raise BrokerUnavailable("the broker could not be reached (test)")
        # The row must already be committed: read it back through a separate session.
        with self.sessions() as session:
            self.committed_when_enqueued.append(session.get(MergeJob, job_id) is not None)
        self.enqueued.append(job_id)

    def ping(self) -> str:
        if self.down:
            raise BrokerUnavailable("the broker is unreachable (test)")
        return "reachable"

    def queue_depth(self) -> int | None:
        if self.down:
            raise BrokerUnavailable("the broker is unreachable (test)")
        return len(self.enqueued)


@dataclass
class Api:
    """A client for the app, its dispatcher and store, and tokens of each scope."""

    client: TestClient
    dispatcher: RecordingDispatcher
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
    config = Settings(home=root / "home", database_url=pg_url, **settings)
    store = ArtifactStore(root / "artifacts")
    dispatcher = RecordingDispatcher(sessions)
    app = create_app(config, runtime=Runtime(config, engine, sessions, store), dispatcher=dispatcher)
    with session_scope(sessions) as session:
        tokens = {scope: create_token(session, f"test-{scope}", scope).secret for scope in ("read", "write", "admin")}
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, dispatcher, sessions, store, tokens)


@pytest.fixture
def api(pg_url: str, pg_engine: Engine, api_sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[Api]:
    """The app on PostgreSQL with open reads (the default)."""
    yield from build_api(pg_url, pg_engine, api_sessions, tmp_path)


@pytest.fixture
def closed_api(pg_url: str, pg_engine: Engine, api_sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[Api]:
    """The app with GRAFT_PUBLIC_READS=false and a small upload limit."""
    yield from build_api(pg_url, pg_engine, api_sessions, tmp_path, public_reads=False, max_upload_bytes=4096)
