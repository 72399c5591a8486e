"""Celery tasks: thin wrappers that take ids, build nothing but the worker's runtime, and call the pipeline.

A task is safe to deliver twice (:func:`workers.jobs.execute_job` is idempotent), which is what
``acks_late`` + ``reject_on_worker_lost`` may do after a crash.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from celery import shared_task
from sqlalchemy.orm import Session, sessionmaker

from registry.artifacts import ArtifactStore
from registry.db import make_engine, make_session_factory
from registry.errors import GraftError, HubUnavailable
from registry.settings import Settings, load_settings
from workers.celery_app import PUBLISH, RUN_MERGE
from workers.jobs import execute_job
from workers.publisher import publish_version as publish_to_hub

log = logging.getLogger("graft.tasks")
# The publisher already retries 5xx/timeouts with backoff within one run; when every try failed
# (``hub_unavailable``) the task is retried later, a few times, with a longer backoff of its own.
PUBLISH_TASK_RETRIES = 3
PUBLISH_TASK_BACKOFF_SECONDS = 60
PUBLISH_TASK_BACKOFF_MAX_SECONDS = 900


@dataclass(frozen=True)
class WorkerRuntime:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore


_runtime: tuple[int, WorkerRuntime] | None = None


def worker_runtime() -> WorkerRuntime:
    """The process's engine, sessions and store, built once per process (never shared across a fork).

    Building it sweeps the store of what a killed worker left behind (unlocked scratch folders), so a
    SIGKILL mid-merge costs disk space only until the next worker process starts.
    """
    global _runtime
    if _runtime is None or _runtime[0] != os.getpid():
        settings = load_settings()
        engine = make_engine(settings.resolved_database_url)
        store = ArtifactStore(settings.resolved_artifacts_dir)
        swept = store.sweep()
        if swept:
            log.warning("removed %d leftover(s) of killed workers from the artifact store", len(swept))
        _runtime = (os.getpid(), WorkerRuntime(settings, make_session_factory(engine), store))
    return _runtime[1]


@shared_task(name=RUN_MERGE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
def run_merge(job_id: str, publish: bool = False, repo_id: str | None = None) -> dict[str, object]:
    """Run the merge job ``job_id`` (a no-op for a job that already finished).

    With ``publish``, a succeeded job's result version is then sent to ``graft.publish`` on the publish queue
    (also when the job had already succeeded: a redelivered message must not lose the publication).
    """
    runtime = worker_runtime()
    result = execute_job(
        job_id,
        sessions=runtime.sessions,
        store=runtime.store,
        progress_interval=runtime.settings.progress_interval_seconds,
    )
    if publish and result.status == "succeeded" and result.version_id is not None:
        publish_version.apply_async(
            args=[result.version_id], kwargs={"repo_id": repo_id}, queue=runtime.settings.publish_queue
        )
    return result.as_dict()


@shared_task(  # type: ignore[untyped-decorator]
    name=PUBLISH,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    autoretry_for=(HubUnavailable,),
    max_retries=PUBLISH_TASK_RETRIES,
    retry_backoff=PUBLISH_TASK_BACKOFF_SECONDS,
    retry_backoff_max=PUBLISH_TASK_BACKOFF_MAX_SECONDS,
    retry_jitter=True,
)
def publish_version(version_id: int, repo_id: str | None = None) -> dict[str, object]:
    """Publish version ``version_id`` (idempotent: a published version is reported as such).

    Failures are recorded on the publication row by the publisher; only ``hub_unavailable`` is retried.
    """
    runtime = worker_runtime()
    try:
        outcome = publish_to_hub(
            version_id,
            session_factory=runtime.sessions,
            store=runtime.store,
            settings=runtime.settings,
            repo_id=repo_id,
        )
    except HubUnavailable:
        raise
    except GraftError as exc:
        log.error("publishing version %s failed: %s: %s", version_id, exc.code, exc.message)
        return {"version_id": version_id, "status": "failed", "error": exc.code}
    return dict(outcome.as_dict())
