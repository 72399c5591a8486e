"""How the API hands a committed job to whoever runs it: Celery on a broker, or the embedded runner.

The API only ever passes a job id, after the job row is committed. It never imports the engine: Celery
tasks are sent by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, Protocol

from kombu.exceptions import KombuError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from registry.db import session_scope
from registry.errors import BrokerUnavailable
from registry.services import merges
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


class CeleryDispatcher:
    """Sends ``graft.run_merge(job_id)`` to the ``merge`` queue of the configured broker."""

    mode: Literal["celery", "embedded"] = "celery"

    def __init__(self, settings: Settings) -> None:
        from workers.celery_app import make_celery  # the Celery client only; tasks are sent by name

        self._settings = settings
        self._app = make_celery(settings)

    def enqueue_merge(self, job_id: str) -> None:
        from workers.celery_app import RUN_MERGE

        try:
            self._app.send_task(
                RUN_MERGE,
                args=[job_id],
                queue=self._settings.merge_queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
            )
        except (OperationalError, KombuError, OSError) as exc:
            raise BrokerUnavailable(f"the broker could not be reached to queue job {job_id}: {exc}") from None

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


class EmbeddedDispatcher:
    """No broker: job rows are the queue; an in-process runner (``graft serve``) is woken after each commit."""

    mode: Literal["celery", "embedded"] = "embedded"

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._wake = wake

    def enqueue_merge(self, job_id: str) -> None:
        if self._wake is not None:
            self._wake()

    def ping(self) -> str:
        return "embedded (no broker: the merge_jobs table is the queue)"

    def queue_depth(self) -> int | None:
        return None


def dispatcher_for(settings: Settings, wake: Callable[[], None] | None = None) -> Dispatcher:
    """Celery when a broker is configured, else the embedded queue."""
    if settings.broker_url:
        return CeleryDispatcher(settings)
    return EmbeddedDispatcher(wake)


def enqueue_or_fail(dispatcher: Dispatcher, sessions: sessionmaker[Session], job_id: str) -> None:
    """Enqueue a committed job; if the broker refuses, mark the job failed (so none waits forever) and raise."""
    try:
        dispatcher.enqueue_merge(job_id)
    except Exception as exc:
        code, message = (exc.code, exc.message) if isinstance(exc, BrokerUnavailable) else ("internal_error", repr(exc))
        log.error("could not queue merge job %s: %s", job_id, message)
        with session_scope(sessions) as session:
            merges.record_failure(session, job_id, code, message)
        raise
