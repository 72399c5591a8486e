"""``/v1/plans`` and ``/v1/merges``: dry runs, submissions, job status, cancellation."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response

from api.deps import Reader, State, UoW, Writer
from api.dispatch import PublishDispatcher, enqueue_or_fail, enqueue_publish_or_fail
from api.merges import plan_expression, submit
from api.schemas import JobOut, JobPage, MergeRequest, PlannedOperandOut, PlanOut, PlanRequest
from registry import repositories as repo
from registry.errors import JobNotFound, NotSupported
from registry.services import merges as service
from registry.services import publications as pubs
from registry.services.adapters import check_name

router = APIRouter(tags=["merges"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Retrying a submission with the same key returns the same job instead of a second one.",
    ),
]


@router.post("/plans", summary="Compile an expression without running it (a dry run)")
def create_plan(body: PlanRequest, uow: UoW, state: State, _who: Reader) -> PlanOut:
    """A bad expression answers 422 with its code, span, column and a rendered caret line."""
    plan = plan_expression(uow.session, state.settings, body.expression)
    return PlanOut(
        plan_hash=plan.hash(),
        expression=plan.expression,
        normalized=plan.normalized,
        base_model=plan.base_model,
        operands=[PlannedOperandOut(ref=op.ref, weight=op.weight, sha256=op.sha256) for op in plan.operands],
        modules=len(plan.steps),
        output_ranks=sorted({step.rank for step in plan.steps}),
        warnings=list(plan.warnings),
        plan=plan.model_dump(mode="json"),
    )


@router.post("/merges", status_code=202, summary="Submit a merge")
def create_merge(
    body: MergeRequest,
    uow: UoW,
    state: State,
    who: Writer,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Compiles now, runs on a worker. The job id is queued only after the job row is committed.

    A plan that already ran into the same adapter is answered at once by a succeeded job (unless ``force``).
    With ``publish``, the result version is published to the Hub once recorded (see the job's ``result``, then
    ``GET /v1/adapters/{name}/versions/{v}/publish``).
    """
    check_name(body.name)  # before anything looks the name up
    publisher: PublishDispatcher | None = None
    if body.publish:
        if not isinstance(state.dispatcher, PublishDispatcher):
            raise NotSupported("this deployment's job dispatcher cannot publish; publish the result version separately")
        publisher = state.dispatcher
        if body.repo is not None:
            pubs.check_repo_id(body.repo)
    submission = submit(
        uow.session,
        state.settings,
        body.expression,
        body.name,
        body.tags,
        force=body.force,
        idempotency_key=idempotency_key,
        submitter=who.token_id,
    )
    job_id = submission.job.id
    if submission.must_run:
        publish = (publisher, body.repo, state.runtime) if publisher is not None else None
        uow.after_commit(lambda: enqueue_or_fail(state.dispatcher, state.runtime.sessions, job_id, publish=publish))
    elif publisher is not None and not submission.replayed and submission.job.result_version is not None:
        # Answered by an earlier job's result: publish that version (idempotent if it already is).
        version = submission.job.result_version
        target = pubs.hub_target(state.settings, version.adapter.name, body.repo)
        publication = pubs.prepare_publication(uow.session, version, target)
        if publication.status != "published":
            version_id, publication_id, p = version.id, publication.id, publisher
            uow.after_commit(lambda: enqueue_publish_or_fail(p, state.runtime, version_id, body.repo, publication_id))
    response.headers["Location"] = f"/v1/merges/{job_id}"
    if submission.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(submission.job)


@router.get("/merges", summary="List merge jobs, newest first")
def list_merges(
    uow: UoW,
    _who: Reader,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> JobPage:
    jobs, total = repo.list_jobs(uow.session, status=status, limit=limit, offset=offset)
    return JobPage(items=[JobOut.of(job) for job in jobs], total=total, limit=limit, offset=offset)


@router.get("/merges/{job_id}", summary="A merge job: status, progress, warnings, error, result")
def get_merge(job_id: str, uow: UoW, _who: Reader) -> JobOut:
    job = repo.get_job(uow.session, job_id)
    if job is None:
        raise JobNotFound(f"no merge job {job_id!r}")
    return JobOut.of(job)


@router.post("/merges/{job_id}/cancel", summary="Cancel a queued or running merge")
def cancel_merge(job_id: str, uow: UoW, _who: Writer) -> JobOut:
    """A queued job is cancelled at once; a running one stops before its next module (409 if finished)."""
    return JobOut.of(service.request_cancel(uow.session, job_id))
