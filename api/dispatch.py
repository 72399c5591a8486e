"""How the API hands a committed job to whoever runs it: Celery on a broker, or the embedded runner.

The API only ever passes a job id, after the job row is committed. It never imports the engine: Celery
tasks are sent by name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

from kombu.exceptions import KombuError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.runtime import Runtime
from registry import repositories as repo
from registry.db import session_scope
from registry.errors import BrokerUnavailable, GraftError
from registry.services import merges
from registry.services import publications as pubs
from registry.settings import Settings

log = logging.getLogger("graft.api.dispatch")


class Dispatcher(Protocol):
    """Sends committed jobs to workers and reports on the queue."""

    mode: Literal["celery", "embedded"]

    def enqueue_merge(self, job_id: str) -> None:
        """Queue the committed job ``job_id``; raise :class:`BrokerUnavailable` if that is impossible."""

    def ping(self) -> str:
        """A short description of the broker when reachable; raise :class:`BrokerUnavailable` otherwise."""

    def queue_depth(self) -> int | None:
        """Messages waiting in the merge queue, when the broker can tell (None in embedded mode)."""


@runtime_checkable
class PublishDispatcher(Protocol):
    """A dispatcher that can also publish versions to the Hub (both real ones can; a test double may not)."""

    def enqueue_publish(self, version_id: int, repo_id: str | None, runtime: Runtime) -> None:
        """Publish the committed version ``version_id``; raise :class:`BrokerUnavailable` if it cannot be queued."""

    def enqueue_merge_then_publish(self, job_id: str, repo_id: str | None, runtime: Runtime) -> None:
        """Queue the committed merge job ``job_id``; publish its result version once it succeeded."""


class CeleryDispatcher:
    """Sends ``graft.run_merge(job_id)`` to the ``merge`` queue of the configured broker."""

    mode: Literal["celery", "embedded"] = "celery"

    def __init__(self, settings: Settings) -> None:
        from workers.celery_app import make_celery  # the Celery client only; tasks are sent by name

        self._settings = settings
        self._app = make_celery(settings)

    def enqueue_merge(self, job_id: str) -> None:
        from workers.celery_app import RUN_MERGE

        self._send(RUN_MERGE, [job_id], {}, self._settings.merge_queue, f"job {job_id}")

    def enqueue_merge_then_publish(self, job_id: str, repo_id: str | None, runtime: Runtime) -> None:
        """``graft.run_merge(job_id, publish=True)``: the merge task sends ``graft.publish`` once it succeeded."""
        from workers.celery_app import RUN_MERGE

        kwargs = {"publish": True, "repo_id": repo_id}
        self._send(RUN_MERGE, [job_id], kwargs, self._settings.merge_queue, f"job {job_id}")

    def enqueue_publish(self, version_id: int, repo_id: str | None, runtime: Runtime) -> None:
        """``graft.publish(version_id)`` on the ``publish`` queue."""
        from workers.celery_app import PUBLISH

        kwargs = {"repo_id": repo_id}
        self._send(PUBLISH, [version_id], kwargs, self._settings.publish_queue, f"the publication of {version_id}")

    def _send(self, task: str, args: list[Any], kwargs: dict[str, Any], queue: str, what: str) -> None:
        try:
            self._app.send_task(
                task,
                args=args,
                kwargs=kwargs,
                queue=queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
            )
        except (OperationalError, KombuError, OSError) as exc:
            raise BrokerUnavailable(f"the broker could not be reached to queue {what}: {exc}") from None

    def ping(self) -> str:
        self.queue_depth()
        return "reachable"

    def queue_depth(self) -> int | None:
        try:
            with self._app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=3)
                declared = connection.default_channel.queue_declare(
                    queue=self._settings.merge_queue, passive=False, durable=True, auto_delete=False
                )
                return int(declared.message_count)
        except (OperationalError, KombuError, OSError) as exc:
            raise BrokerUnavailable(f"the broker is unreachable: {exc}") from None


def _spawn_thread(action: Callable[[], None]) -> None:
    threading.Thread(target=action, name="graft-embedded-publish", daemon=True).start()


class EmbeddedDispatcher:
    """No broker: job rows are the queue; an in-process runner (``graft serve``) is woken after each commit.

    Publishing runs in this process too, in a background thread (``spawn``; tests pass one that runs it at
    once). A publish that follows a merge waits for the job row to finish first. Neither survives a restart
    of the process: the publication row then stays ``pending``/``failed``, and publishing again (the API's
    ``POST .../publish`` or ``graft publish``) resumes it, since publishing is idempotent.
    """

    mode: Literal["celery", "embedded"] = "embedded"

    def __init__(
        self,
        wake: Callable[[], None] | None = None,
        *,
        spawn: Callable[[Callable[[], None]], None] = _spawn_thread,
        poll_interval: float = 1.0,
    ) -> None:
        self._wake = wake
        self._spawn = spawn
        self._poll_interval = poll_interval

    def enqueue_merge(self, job_id: str) -> None:
        if self._wake is not None:
            self._wake()

    def enqueue_publish(self, version_id: int, repo_id: str | None, runtime: Runtime) -> None:
        def run() -> None:
            publish_in_process(runtime, version_id, repo_id)

        self._spawn(run)

    def enqueue_merge_then_publish(self, job_id: str, repo_id: str | None, runtime: Runtime) -> None:
        self.enqueue_merge(job_id)
        self._spawn(lambda: self._publish_when_done(runtime, job_id, repo_id))

    def _publish_when_done(self, runtime: Runtime, job_id: str, repo_id: str | None) -> None:
        deadline = time.monotonic() + runtime.settings.merge_time_limit_seconds + 60
        while True:
            with session_scope(runtime.sessions) as session:
                job = repo.get_job(session, job_id)
                status, version_id = (job.status, job.result_version_id) if job is not None else ("missing", None)
            if status in merges.TERMINAL or status == "missing":
                break
            if time.monotonic() > deadline:
                log.error("merge job %s did not finish in time; its result is not published", job_id)
                return
            time.sleep(self._poll_interval)
        if status == "succeeded" and version_id is not None:
            publish_in_process(runtime, version_id, repo_id)
        else:
            log.info("merge job %s ended %s; nothing to publish", job_id, status)

    def ping(self) -> str:
        return "embedded (no broker: the merge_jobs table is the queue)"

    def queue_depth(self) -> int | None:
        return None


def publish_in_process(runtime: Runtime, version_id: int, repo_id: str | None) -> dict[str, Any] | None:
    """Publish in this process (embedded mode); failures are recorded on the publication row, not raised."""
    from workers.publisher import publish_version  # the Hub client, loaded only when publishing here

    try:
        outcome = publish_version(
            version_id,
            session_factory=runtime.sessions,
            store=runtime.store,
            settings=runtime.settings,
            repo_id=repo_id,
        )
    except GraftError as exc:
        log.error("publishing version %s failed: %s: %s", version_id, exc.code, exc.message)
        return None
    except Exception:
        log.exception("publishing version %s failed unexpectedly", version_id)
        return None
    return outcome.as_dict()


def dispatcher_for(settings: Settings, wake: Callable[[], None] | None = None) -> Dispatcher:
    """Celery when a broker is configured, else the embedded queue."""
    if settings.broker_url:
        return CeleryDispatcher(settings)
    return EmbeddedDispatcher(wake)


def enqueue_or_fail(
    dispatcher: Dispatcher,
    sessions: sessionmaker[Session],
    job_id: str,
    *,
    publish: tuple[PublishDispatcher, str | None, Runtime] | None = None,
) -> None:
    """Enqueue a committed job; if the broker refuses, mark the job failed (so none waits forever) and raise.

    With ``publish`` (the dispatcher, the Hub repo or None, the runtime), its result is published once recorded.
    """
    try:
        if publish is None:
            dispatcher.enqueue_merge(job_id)
        else:
            publisher, repo_id, runtime = publish
            publisher.enqueue_merge_then_publish(job_id, repo_id, runtime)
    except Exception as exc:
        code, message = (exc.code, exc.message) if isinstance(exc, BrokerUnavailable) else ("internal_error", repr(exc))
        log.error("could not queue merge job %s: %s", job_id, message)
        with session_scope(sessions) as session:
            merges.record_failure(session, job_id, code, message)
        raise


def enqueue_publish_or_fail(
    dispatcher: PublishDispatcher, runtime: Runtime, version_id: int, repo_id: str | None, publication_id: int
) -> None:
    """Hand a committed publication to the publisher; if the broker refuses, mark the publication failed, raise."""
    try:
        dispatcher.enqueue_publish(version_id, repo_id, runtime)
    except Exception as exc:
        code, message = (exc.code, exc.message) if isinstance(exc, BrokerUnavailable) else ("internal_error", repr(exc))
        log.error("could not queue the publication of version %s: %s", version_id, message)
        with session_scope(runtime.sessions) as session:
            pubs.record_failed(session, publication_id, code, message)
        raise
