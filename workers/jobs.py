"""Running one queued merge job on behalf of a task or the embedded runner: ids in, job row updated.

:func:`execute_job` is what both the Celery task and the embedded runner call. It is idempotent: a job that
already finished is answered from its row, a job whose cancel was asked before it started is marked
cancelled, and anything else runs through :func:`workers.pipeline.run_merge_job`, which counts the attempt,
records the result or the failure, and removes its temporary files.

While the merge runs, a :class:`JobMonitor` writes progress to the job row and polls it for a cancel request,
at most once per interval, so that a cancel is honoured between two modules without a query per module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.errors import GraftError
from registry.services import merges
from workers.engine.executor import Cancelled
from workers.pipeline import run_merge_job

log = logging.getLogger("graft.jobs")


@dataclass(frozen=True)
class JobResult:
    """How a job ended, as reported by the task (the job row holds the details)."""

    job_id: str
    status: str
    version_id: int | None = None
    error_code: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"job_id": self.job_id, "status": self.status, "version_id": self.version_id, "error": self.error_code}


class JobMonitor:
    """Progress out, cancellation in: both through the job row, each at most once per ``interval`` seconds."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._job_id = job_id
        self._interval = interval
        self._clock = clock
        self._last_progress = self._last_poll = float("-inf")
        self._cancelled = False

    def progress(self, done: int, total: int) -> None:
        """Record ``done`` of ``total`` modules (the last module is always recorded)."""
        now = self._clock()
        if done < total and now - self._last_progress < self._interval:
            return
        self._last_progress = now
        with session_scope(self._sessions) as session:
            merges.record_progress(session, self._job_id, done, total)

    def should_cancel(self) -> bool:
        """True once someone asked to cancel the job; checked before each module, queried once per interval."""
        now = self._clock()
        if not self._cancelled and now - self._last_poll >= self._interval:
            self._last_poll = now
            with session_scope(self._sessions) as session:
                self._cancelled = merges.cancel_requested(session, self._job_id)
        return self._cancelled


def execute_job(
    job_id: str,
    *,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    device: str | None = None,
    progress_interval: float = 0.5,
) -> JobResult:
    """Run the job ``job_id`` unless it is finished or cancelled; never raises for an expected failure.

    Expected failures (a typed :class:`GraftError`, a cancel) are recorded on the job row by the pipeline
    and reported in the result. Anything else is recorded too, then raised to the caller.
    """
    with session_scope(sessions) as session:
        job = repo.get_job(session, job_id)
        if job is None:
            log.warning("merge job %s does not exist; nothing to do", job_id)
            return JobResult(job_id, "missing")
        if job.status in merges.TERMINAL:
            return JobResult(job_id, job.status, job.result_version_id, job.error_code)
        if job.cancel_requested:
            merges.mark_cancelled(session, job_id, "cancelled before it started")
            return JobResult(job_id, "cancelled", None, "cancelled")

    monitor = JobMonitor(sessions, job_id, progress_interval)
    try:
        outcome = run_merge_job(
            job_id,
            session_factory=sessions,
            store=store,
            device=device,
            progress=monitor.progress,
            should_cancel=monitor.should_cancel,
        )
    except Cancelled:
        log.info("merge job %s cancelled", job_id)
        return JobResult(job_id, "cancelled", None, "cancelled")
    except GraftError as exc:
        log.info("merge job %s failed: %s", job_id, exc.code)
        return JobResult(job_id, "failed", None, exc.code)
    return JobResult(job_id, "succeeded", outcome.version_id)
