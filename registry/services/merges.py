"""Merge jobs: created at submission with their compiled plan, then run and recorded by a worker."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.errors import InvalidInput, JobFinished, JobNotFound, NotFound
from registry.formats.peft import AdapterFacts
from registry.models import LineageEdge, MergeJob
from registry.services.adapters import add_version, check_name, ensure_adapter

TERMINAL = ("succeeded", "failed", "cancelled")


def create_job(
    session: Session, expression: str, target_name: str, tags: list[str], plan: dict[str, Any], plan_hash: str
) -> MergeJob:
    """Record a submitted merge (status ``queued``); enqueue it only after the caller commits."""
    check_name(target_name)
    job = MergeJob(
        id=str(uuid.uuid4()),
        expression=expression,
        target_name=target_name,
        tags=sorted(set(tags)),
        plan=plan,
        plan_hash=plan_hash,
        status="queued",
        progress_total=len(plan.get("steps", [])),
    )
    session.add(job)
    session.flush()
    return job


def load_job(session: Session, job_id: str) -> MergeJob:
    job = repo.get_job(session, job_id)
    if job is None:
        raise NotFound(f"no merge job {job_id!r}")
    return job


def start_attempt(session: Session, job_id: str) -> MergeJob:
    """Mark a job running and count the attempt. A finished job is returned unchanged."""
    job = load_job(session, job_id)
    if job.status in TERMINAL:
        return job
    job.status = "running"
    job.attempts += 1
    job.progress_done = 0
    job.error_code = job.error_message = None
    session.flush()
    return job


def record_result(
    session: Session,
    job_id: str,
    facts: AdapterFacts,
    *,
    sha256: str,
    artifact_key: str,
    engine_seconds: float,
    retained_energy: float | None = None,
    warnings: tuple[str, ...] = (),
) -> MergeJob:
    """Write the merged version, one lineage edge per operand, and mark the job succeeded.

    The job row is locked first, so that of two deliveries of one job that both got this far (a task handed to
    a second worker while the first was still on it), only the first records a version; the second gets the
    job back as the first left it.
    """
    job = repo.get_job_for_update(session, job_id)
    if job is None:
        raise JobNotFound(f"no merge job {job_id!r}")
    if job.status == "succeeded" and job.result_version_id is not None:
        return job
    # Versions of one adapter are numbered max + 1: concurrent results for the same adapter take turns.
    repo.lock_adapter(session, job.target_name)
    plan = job.plan
    adapter = ensure_adapter(session, job.target_name, facts.base_model, job.tags, "")
    version = add_version(
        session,
        adapter,
        facts,
        sha256=sha256,
        artifact_key=artifact_key,
        source="merge",
        expression=job.expression,
        plan_hash=job.plan_hash,
    )
    strategy = str(plan.get("strategy", "linear"))
    for operand in plan["operands"]:
        session.add(
            LineageEdge(
                child_id=version.id,
                parent_id=int(operand["version_id"]),
                coefficient=float(operand["weight"]),
                role="operand",
                strategy=strategy,
            )
        )
    job.status = "succeeded"
    job.result_version_id = version.id
    job.progress_done = job.progress_total
    job.engine_seconds = engine_seconds
    job.retained_energy = retained_energy
    job.run_warnings = list(warnings)
    session.flush()
    return job


def record_failure(session: Session, job_id: str, code: str, message: str) -> None:
    job = load_job(session, job_id)
    job.status = "failed"
    job.error_code = code
    job.error_message = message
    session.flush()


def record_progress(session: Session, job_id: str, done: int, total: int) -> None:
    job = load_job(session, job_id)
    job.progress_done, job.progress_total = done, total
    session.flush()


def validate_tags(tags: list[str]) -> list[str]:
    cleaned = [t.strip() for t in tags if t.strip()]
    for tag in cleaned:
        if len(tag) > 50 or not tag.replace("-", "").replace("_", "").isalnum():
            raise InvalidInput(f"invalid tag {tag!r}: use letters, digits, '-' and '_' (at most 50)")
    return cleaned


# -- the service (issue 5): reuse, cancellation ---------------------------------------------------------


def create_reused_job(
    session: Session,
    earlier: MergeJob,
    expression: str,
    tags: list[str],
    plan: dict[str, Any],
    idempotency_key: str | None = None,
) -> MergeJob:
    """A job answered at once by ``earlier`` (same plan hash, same target): succeeded, with its result."""
    job = MergeJob(
        id=str(uuid.uuid4()),
        expression=expression,
        target_name=earlier.target_name,
        tags=sorted(set(tags)),
        plan=plan,
        plan_hash=earlier.plan_hash,
        status="succeeded",
        progress_done=earlier.progress_total,
        progress_total=earlier.progress_total,
        result_version_id=earlier.result_version_id,
        engine_seconds=0.0,
        reused_from=earlier.id,
        idempotency_key=idempotency_key,
    )
    session.add(job)
    session.flush()
    return job


def request_cancel(session: Session, job_id: str) -> MergeJob:
    """Cancel a job: a queued one at once; a running one between two modules (its worker polls the flag).

    A job that already finished raises :class:`JobFinished`, except a cancelled one, which is returned as is.
    """
    job = repo.get_job_for_update(session, job_id)
    if job is None:
        raise JobNotFound(f"no merge job {job_id!r}")
    if job.status == "cancelled":
        return job
    if job.status in TERMINAL:
        raise JobFinished(f"job {job_id} already {job.status}; only queued or running jobs can be cancelled")
    job.cancel_requested = True
    if job.status == "queued":
        job.status = "cancelled"
        job.error_code, job.error_message = "cancelled", "cancelled before it started"
    session.flush()
    return job


def cancel_requested(session: Session, job_id: str) -> bool:
    """Whether someone asked to cancel the job (a running worker polls this between modules)."""
    job = repo.get_job(session, job_id)
    if job is None:
        return True
    session.refresh(job, ["cancel_requested", "status"])
    return job.cancel_requested or job.status == "cancelled"


def mark_cancelled(session: Session, job_id: str, message: str) -> None:
    job = load_job(session, job_id)
    job.status = "cancelled"
    job.error_code, job.error_message = "cancelled", message
    session.flush()
