"""The embedded runner: with no broker configured, the ``merge_jobs`` table is the queue.

``graft serve`` (and ``graft worker`` without a broker) run an :class:`EmbeddedRunner`: one thread that claims
the oldest ``queued`` job with an atomic conditional update and runs it through the same
:func:`workers.jobs.execute_job` a Celery task uses. The API wakes it after each commit; it also polls, so a
job submitted by another process is picked up within ``poll_interval`` seconds.

Crash safety: jobs left ``running`` by a process that died are put back in the queue when a runner starts
(:meth:`EmbeddedRunner.recover`), and run again with their attempts counter incremented. This assumes one
runner per database, which is what the embedded mode is for; with more, configure a broker.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from workers.jobs import JobResult, execute_job

log = logging.getLogger("graft.embedded")


class EmbeddedRunner:
    """Runs queued merge jobs one at a time in a background thread of the current process."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        *,
        device: str | None = None,
        poll_interval: float = 1.0,
        progress_interval: float = 0.5,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._device = device
        self._poll_interval = poll_interval
        self._progress_interval = progress_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover(self) -> list[str]:
        """Requeue jobs a dead process left ``running``, and sweep its scratch folders; returns the job ids."""
        self._store.sweep()
        with session_scope(self._sessions) as session:
            ids = repo.requeue_running_jobs(session)
        if ids:
            log.warning("requeued %d merge job(s) left running by a previous process: %s", len(ids), ", ".join(ids))
        return ids

    def wake(self) -> None:
        """A job was committed: look at the queue now rather than at the next poll."""
        self._wake.set()

    def run_once(self) -> JobResult | None:
        """Claim and run the oldest queued job; None when the queue is empty."""
        with session_scope(self._sessions) as session:
            job_id = repo.claim_next_queued_job(session)
        if job_id is None:
            return None
        try:
            return execute_job(
                job_id,
                sessions=self._sessions,
                store=self._store,
                device=self._device,
                progress_interval=self._progress_interval,
            )
        except Exception:  # recorded on the job row by the pipeline; the runner goes on with the next job
            log.exception("merge job %s failed unexpectedly", job_id)
            return JobResult(job_id, "failed")

    def run_forever(self) -> None:
        """Run jobs until :meth:`stop`; sleeps until woken or ``poll_interval`` passes when the queue is empty."""
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the database went away for a moment: wait and try again
                log.exception("embedded runner could not read the queue")
                ran = None
            if ran is None:
                self._wake.wait(self._poll_interval)
                self._wake.clear()

    def start(self) -> None:
        """Recover orphans, then run jobs in a daemon thread."""
        self.recover()
        self._thread = threading.Thread(target=self.run_forever, name="graft-embedded-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the job in progress (if any) ends."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
