"""Celery tasks: thin wrappers that take ids, build nothing but the worker's runtime, and call the pipeline.

A task is safe to deliver twice (:func:`workers.jobs.execute_job` is idempotent), which is what
``acks_late`` + ``reject_on_worker_lost`` may do after a crash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from celery import shared_task
from sqlalchemy.orm import Session, sessionmaker

from registry.artifacts import ArtifactStore
from registry.db import make_engine, make_session_factory
from registry.settings import Settings, load_settings
from workers.celery_app import RUN_MERGE
from workers.jobs import execute_job


@dataclass(frozen=True)
class WorkerRuntime:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore


_runtime: tuple[int, WorkerRuntime] | None = None


def worker_runtime() -> WorkerRuntime:
    """The process's engine, sessions and store, built once per process (never shared across a fork)."""
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        settings = load_settings()
        engine = make_engine(settings.resolved_database_url)
        _runtime = (
            os.getpid(),
            WorkerRuntime(settings, make_session_factory(engine), ArtifactStore(settings.resolved_artifacts_dir)),
        )
    return _runtime[1]


@shared_task(name=RUN_MERGE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
def run_merge(job_id: str) -> dict[str, object]:
    """Run the merge job ``job_id`` (a no-op for a job that already finished)."""
    runtime = worker_runtime()
    result = execute_job(
        job_id,
        sessions=runtime.sessions,
        store=runtime.store,
        progress_interval=runtime.settings.progress_interval_seconds,
    )
    return result.as_dict()
