"""The Celery application, built from :class:`~registry.settings.Settings` (a composition root).

Delivery guarantees, and why:

- ``acks_late``: a task is acknowledged when it ends, not when it starts, so a worker that dies mid-merge
  leaves the message with the broker.
- ``reject_on_worker_lost``: when a pool process is killed (OOM, SIGKILL), the message is put back at once
  and another process runs the job again; the pipeline is idempotent and counts the attempt on the job row.
- prefetch 1: a worker holds one merge at a time; a long merge never blocks another one behind it.
- ``visibility_timeout`` (Redis): a message unacknowledged for this long is handed to another worker, so it
  must outlast the longest merge; the settings refuse a visibility timeout below the merge time limit,
  and the time limit stops a merge that runs longer (recorded as failed).

Queues: ``merge`` (heavy; a GPU host runs ``graft worker -Q merge``) and ``publish`` (network).
Tasks are looked up by name and take ids only, so the API sends them without importing the engine.

``celery -A workers.celery_app worker`` finds :data:`app`, built on first use from the environment.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from registry.errors import InvalidConfig
from registry.settings import Settings, load_settings

RUN_MERGE = "graft.run_merge"
PUBLISH = "graft.publish"
# Seconds between a soft time limit (the task records the failure) and the hard one (the process is killed).
HARD_LIMIT_GRACE = 30


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``; raises :class:`InvalidConfig` when no broker is configured."""
    if not settings.broker_url:
        raise InvalidConfig(
            "no broker configured: set GRAFT_BROKER_URL=redis://host:6379/0 (without one, `graft serve` runs jobs "
            "in its own process)"
        )
    transport_options: dict[str, Any] = {
        **settings.broker_transport_options,
        "visibility_timeout": settings.visibility_timeout_seconds,
    }
    app = Celery("graft", broker=settings.broker_url, include=["workers.tasks"], set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_queues=[_queue(settings.merge_queue), _queue(settings.publish_queue)],
        task_default_queue=settings.merge_queue,
        task_routes={RUN_MERGE: {"queue": settings.merge_queue}, PUBLISH: {"queue": settings.publish_queue}},
        task_soft_time_limit=settings.merge_time_limit_seconds,
        task_time_limit=min(settings.merge_time_limit_seconds + HARD_LIMIT_GRACE, settings.visibility_timeout_seconds),
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_track_started=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf["graft_settings"] = settings
    return app


def _queue(name: str) -> Queue:
    """A queue with its own direct exchange and routing key, so that no message reaches two queues."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """``workers.celery_app.app``: the worker's app, built from the environment on first use."""
    global _app
    if name in ("app", "celery"):
        if _app is None:
            _app = make_celery(load_settings())
            _app.set_current()
        return _app
    raise AttributeError(name)
