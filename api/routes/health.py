"""Liveness, readiness (database and broker) and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text

from api.deps import State
from api.schemas import Health, Readiness
from registry import repositories as repo
from registry.db import session_scope
from registry.errors import BrokerUnavailable
from registry.services.merges import TERMINAL

router = APIRouter(tags=["health"])
log = logging.getLogger("graft.api.health")

STATUSES = ("queued", "running", *TERMINAL)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


@router.get("/healthz", summary="The process is alive")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="The database and the broker answer",
    responses={503: {"model": Readiness, "description": "Not ready: the database or the broker is unreachable."}},
)
def readyz(state: State) -> Response:
    database = broker = "ok"
    try:
        with session_scope(state.runtime.sessions) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to reach the database means "not ready"
        log.warning("readiness: database unreachable: %s", type(exc).__name__)
        database = f"unreachable: {type(exc).__name__}"
    try:
        broker = state.dispatcher.ping()
    except BrokerUnavailable as exc:
        broker = f"unreachable: {exc.message}"
    ready = database == "ok" and not broker.startswith("unreachable")
    body = Readiness(
        status="ready" if ready else "not_ready", database=database, broker=broker, mode=state.dispatcher.mode
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics: jobs by status, merge seconds, queue depth",
    response_class=PlainTextResponse,
)
def metrics(state: State) -> PlainTextResponse:
    with session_scope(state.runtime.sessions) as session:
        counts = repo.job_status_counts(session)
        buckets, count, total = repo.merge_seconds_histogram(session, SECONDS_BUCKETS)
    broker_up = 1
    try:
        depth = state.dispatcher.queue_depth()
    except BrokerUnavailable:
        depth, broker_up = None, 0
    if depth is None:
        depth = counts.get("queued", 0)
    lines = [
        "# HELP graft_merge_jobs Merge jobs by status.",
        "# TYPE graft_merge_jobs gauge",
        *(f'graft_merge_jobs{{status="{status}"}} {counts.get(status, 0)}' for status in STATUSES),
        "# HELP graft_merge_seconds Engine seconds of the merges that ran and succeeded.",
        "# TYPE graft_merge_seconds histogram",
        *(
            f'graft_merge_seconds_bucket{{le="{bound:g}"}} {n}'
            for bound, n in zip(SECONDS_BUCKETS, buckets, strict=True)
        ),
        f'graft_merge_seconds_bucket{{le="+Inf"}} {count}',
        f"graft_merge_seconds_sum {total:.6f}",
        f"graft_merge_seconds_count {count}",
        "# HELP graft_queue_depth Merge tasks waiting (broker messages; embedded mode: queued jobs).",
        "# TYPE graft_queue_depth gauge",
        f'graft_queue_depth{{queue="merge"}} {depth}',
        "# HELP graft_broker_up Whether the broker answered (1) or not (0).",
        "# TYPE graft_broker_up gauge",
        f"graft_broker_up {broker_up}",
    ]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
