"""Graft's real Celery app, for tests that must catch a worker in the middle of a merge.

``celery -A tests.workers.celery_slow worker`` runs the production app (``workers.celery_app.make_celery``
and ``workers.tasks``) with one test hook: after each module, the process running the merge writes its pid
to ``GRAFT_TEST_PID_FILE`` and sleeps ``GRAFT_TEST_MODULE_DELAY`` seconds, so that a test can SIGKILL it
mid-job. Nothing else differs from ``graft worker``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from registry.settings import load_settings
from workers import pipeline
from workers.celery_app import make_celery

app = make_celery(load_settings())
app.set_current()

_DELAY = float(os.environ.get("GRAFT_TEST_MODULE_DELAY", "0"))
_PID_FILE = os.environ.get("GRAFT_TEST_PID_FILE")
_execute_plan = pipeline.execute_plan


def _slow_execute_plan(*args: Any, **kwargs: Any) -> Any:
    progress = kwargs.get("progress")

    def slow_progress(done: int, total: int) -> None:
        if _PID_FILE:
            Path(_PID_FILE).write_text(str(os.getpid()))
        time.sleep(_DELAY)
        if progress is not None:
            progress(done, total)

    kwargs["progress"] = slow_progress
    return _execute_plan(*args, **kwargs)


pipeline.execute_plan = _slow_execute_plan  # type: ignore[assignment]
