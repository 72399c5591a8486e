"""Merge jobs: created at submission with their compiled plan, then run and recorded by a worker."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.errors import InvalidInput, NotFound
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
) -> MergeJob:
    """Write the merged version, one lineage edge per operand, and mark the job succeeded."""
    job = load_job(session, job_id)
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
