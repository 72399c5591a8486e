"""Submitting a merge: compile against the registry, then record a queued job (the caller commits)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from registry.catalog import RegistryCatalog
from registry.models import MergeJob
from registry.services import merges
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
