"""Glue between the stages: a queued job → executed plan → stored artifact → recorded version.

Used by the Celery task and by the CLI's embedded mode alike. Each database step is its own short
transaction (``session_scope``); the engine runs between them with no transaction open. A failure
records the job as failed and leaves no version and no stray files behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore, sha256_file
from registry.db import session_scope
from registry.errors import GraftError, MergeFailed
from registry.formats.peft import AdapterFacts, inspect_peft_folder
from registry.services import merges
from workers.compiler.plan import MergePlan
from workers.engine.executor import Cancelled, ExecutionReport, Progress, execute_plan, pick_device


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    version_id: int
    engine_seconds: float
    reused: bool
    retained_energy: float | None = None
    warnings: tuple[str, ...] = ()


def run_merge_job(
    job_id: str,
    *,
    session_factory: sessionmaker[Session],
    store: ArtifactStore,
    device: str | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> JobOutcome:
    """Run a queued merge job to completion. Idempotent: a job that already succeeded returns its result."""
    with session_scope(session_factory) as session:
        job = merges.start_attempt(session, job_id)
        if job.status == "succeeded" and job.result_version_id is not None:
            return JobOutcome(
                job_id,
                job.result_version_id,
                job.engine_seconds or 0.0,
                reused=True,
                retained_energy=job.retained_energy,
                warnings=tuple(job.run_warnings or ()),
            )
        if job.status != "running":
            raise MergeFailed(f"job {job_id} is {job.status}; it cannot run again")
        plan = MergePlan.model_validate(job.plan)
        versions = repo.get_versions_by_ids(session, [op.version_id for op in plan.operands])
        paths = [store.path(versions[op.version_id].artifact_key) for op in plan.operands]

    with store.scratch() as scratch:
        created_key: str | None = None
        try:
            _verify_operands(plan, paths)
            report = execute_plan(
                plan, paths, scratch / "out", device=pick_device(device), progress=progress, should_cancel=should_cancel
            )
            facts = inspect_peft_folder(scratch / "out")
            sha, key, created = store.put_file(report.weights_path)
            created_key = key if created else None
            version_id = _record(session_factory, job_id, facts, sha, key, report)
            return JobOutcome(
                job_id,
                version_id,
                report.seconds,
                reused=False,
                retained_energy=report.retained_energy,
                warnings=report.warnings,
            )
        except BaseException as exc:
            _record_failure(session_factory, store, job_id, exc, created_key)
            raise


RECORD_TRIES = 3


def _verify_operands(plan: MergePlan, paths: list[Path]) -> None:
    """The plan pins content hashes: refuse to merge from a stored file that no longer matches its hash."""
    for operand, path in zip(plan.operands, paths, strict=True):
        if not path.is_file():
            raise MergeFailed(f"the stored artifact of {operand.ref} is missing ({path}); re-register it")
        if sha256_file(path) != operand.sha256:
            raise MergeFailed(
                f"the stored artifact of {operand.ref} does not match its sha256 (corrupted on disk); re-register it"
            )


def _record(
    session_factory: sessionmaker[Session],
    job_id: str,
    facts: AdapterFacts,
    sha256: str,
    key: str,
    report: ExecutionReport,
) -> int:
    """Record the result in one transaction; retried when a concurrent result created the same adapter first."""
    for attempt in range(1, RECORD_TRIES + 1):
        try:
            with session_scope(session_factory) as session:
                job = merges.record_result(
                    session,
                    job_id,
                    facts,
                    sha256=sha256,
                    artifact_key=key,
                    engine_seconds=report.seconds,
                    retained_energy=report.retained_energy,
                    warnings=report.warnings,
                )
                version_id = job.result_version_id
            assert version_id is not None
            return version_id
        except IntegrityError:
            if attempt == RECORD_TRIES:
                raise
    raise AssertionError("unreachable")


def _record_failure(
    session_factory: sessionmaker[Session],
    store: ArtifactStore,
    job_id: str,
    exc: BaseException,
    created_key: str | None,
) -> None:
    # Unexpected exceptions get the stable code "merge_failed"; the class name stays in the message.
    code = exc.code if isinstance(exc, GraftError) else MergeFailed.code
    message = exc.message if isinstance(exc, GraftError) else f"{type(exc).__name__}: {exc}"
    with session_scope(session_factory) as session:
        if isinstance(exc, Cancelled):
            job = merges.load_job(session, job_id)
            job.status = "cancelled"
        else:
            merges.record_failure(session, job_id, code, message)
        # A blob this attempt stored, that no version refers to, goes away with the failed attempt.
        if created_key is not None and repo.count_versions_with_key(session, created_key) == 0:
            store.remove(created_key)
