"""Submitting a merge: compile against the registry, then record a queued job (the caller commits)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.catalog import RegistryCatalog
from registry.errors import IdempotencyKeyReused
from registry.models import MergeJob
from registry.services import merges
from registry.services.adapters import check_name
from registry.settings import Settings
from workers.compiler import MergePlan, compile_expression


def plan_expression(session: Session, settings: Settings, expression: str) -> MergePlan:
    """Compile ``expression`` against the registry; raises ``CompileError`` for bad input."""
    return compile_expression(expression, RegistryCatalog(session), max_rank=settings.max_rank)


def submit_merge(
    session: Session, settings: Settings, expression: str, target_name: str, tags: list[str]
) -> tuple[MergeJob, MergePlan]:
    """Compile and record a queued job. Nothing runs until the caller commits and enqueues the job id."""
    plan = plan_expression(session, settings, expression)
    job = merges.create_job(
        session, expression, target_name, merges.validate_tags(tags), plan.model_dump(mode="json"), plan.hash()
    )
    return job, plan


@dataclass(frozen=True)
class Submission:
    """What a submission produced. ``must_run`` is true only for a new job that a worker still has to run."""

    job: MergeJob
    replayed: bool
    reused: bool

    @property
    def must_run(self) -> bool:
        return not self.replayed and self.job.status == "queued"


def submit(
    session: Session,
    settings: Settings,
    expression: str,
    target_name: str,
    tags: list[str],
    *,
    force: bool = False,
    idempotency_key: str | None = None,
    submitter: int | None = None,
) -> Submission:
    """The API's submission: compile, then record a job; the caller commits, then enqueues if ``must_run``.

    - An ``idempotency_key`` seen before from the same ``submitter`` (the API token's id) returns that job
      (``replayed``); with a different request it is refused with ``idempotency_key_reused``. Two concurrent
      first uses of one key yield one job. Keys are scoped to the submitter, so two clients that happen to
      pick the same key never see each other's jobs.
    - Unless ``force``, a plan already run into the same adapter is answered at once by a succeeded job that
      points at the earlier result (``reused``); nothing runs again.
    """
    check_name(target_name)  # before any query uses it
    tags = merges.validate_tags(tags)
    if idempotency_key is not None:
        idempotency_key = scoped_idempotency_key(submitter, idempotency_key)
        earlier = repo.get_job_by_idempotency_key(session, idempotency_key)
        if earlier is not None:
            return Submission(_same_request(earlier, expression, target_name, tags), replayed=True, reused=False)
    plan = plan_expression(session, settings, expression)
    plan_json, plan_hash = plan.model_dump(mode="json"), plan.hash()
    finished = None if force else repo.find_finished_job(session, plan_hash, target_name)

    def record() -> MergeJob:
        if finished is not None:
            return merges.create_reused_job(session, finished, expression, tags, plan_json, idempotency_key)
        job = merges.create_job(session, expression, target_name, tags, plan_json, plan_hash)
        job.idempotency_key = idempotency_key
        session.flush()
        return job

    if idempotency_key is None:  # nothing unique can clash: no savepoint round trips
        return Submission(record(), replayed=False, reused=finished is not None)
    try:
        with session.begin_nested():
            job = record()
    except IntegrityError:
        # Another request with the same key committed first: answer with its job.
        earlier = repo.get_job_by_idempotency_key(session, idempotency_key) if idempotency_key else None
        if earlier is None:
            raise
        return Submission(_same_request(earlier, expression, target_name, tags), replayed=True, reused=False)
    return Submission(job, replayed=False, reused=finished is not None)


def scoped_idempotency_key(submitter: int | None, key: str) -> str:
    """The stored form of a client's ``Idempotency-Key``: a digest of (submitter, key), 64 hex characters.

    Hashing keeps the column a fixed width whatever the client sends, and scopes keys per token.
    """
    owner = "anonymous" if submitter is None else f"token:{submitter}"
    return hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()


def _same_request(job: MergeJob, expression: str, target_name: str, tags: list[str]) -> MergeJob:
    if job.expression != expression or job.target_name != target_name or sorted(set(tags)) != job.tags:
        raise IdempotencyKeyReused(
            f"Idempotency-Key was first used for job {job.id} with another request; use a new key for a new merge"
        )
    return job
