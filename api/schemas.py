"""Request and response bodies of the REST API (pydantic), and their construction from registry rows.

Routes build these inside their unit of work, so a response never reaches back into a closed session.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from registry.models import AdapterVersion, MergeJob, Publication
from registry.services.adapters import describe_version


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _In(BaseModel):
    """A request body: no unknown fields, and no NUL characters in any text (PostgreSQL cannot store them)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            raise ValueError("must not contain NUL characters (\\x00)")
        return value


# -- errors --------------------------------------------------------------------------------------------


class ErrorSpan(_Out):
    start: int = Field(description="0-based offset of the first character.")
    end: int = Field(description="0-based offset just past the last character.")
    column: int = Field(description="1-based column of the first character.")
    line: int = Field(default=1, description="1-based line of the first character.")


class ErrorDetail(_Out):
    code: str = Field(description="Stable machine-readable code, e.g. unknown_adapter, invalid_adapter.")
    message: str = Field(description="What is wrong and how to fix it, on one line.")
    span: ErrorSpan | None = Field(default=None, description="For expression errors: where in the expression.")
    rendered: str | None = Field(default=None, description="For expression errors: the line with a caret.")
    details: list[dict[str, Any]] | None = Field(default=None, description="For invalid requests: each problem.")


class ErrorResponse(_Out):
    error: ErrorDetail


# -- adapters ------------------------------------------------------------------------------------------


class VersionOut(_Out):
    ref: str
    adapter: str
    version: int
    id: int
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    modules: int
    dtype: str
    size_bytes: int
    sha256: str
    source: str
    expression: str | None
    plan_hash: str | None
    tags: list[str]
    created_at: str | None
    files: list[str] = Field(description="Files of this version, for .../files/{file}.")

    @classmethod
    def of(cls, version: AdapterVersion) -> VersionOut:
        info = describe_version(version)
        known = {k: v for k, v in info.items() if k in cls.model_fields}
        return cls(**known, files=["adapter_config.json", "adapter_model.safetensors"])


class UploadOut(_Out):
    version: VersionOut
    created: bool = Field(description="False when the upload was identical to the latest version.")


class AdapterOut(_Out):
    name: str
    description: str
    tags: list[str]
    versions: int = Field(description="How many versions the adapter has.")
    latest: VersionOut


class AdapterDetail(AdapterOut):
    version_numbers: list[int]


class AdapterPage(_Out):
    items: list[AdapterOut]
    total: int
    limit: int
    offset: int


class LineageNode(BaseModel):
    # Open to fields the lineage service adds (they pass through to the response).
    model_config = ConfigDict(extra="allow")
    id: int
    ref: str
    source: str
    expression: str | None
    sha256: str
    hub: dict[str, Any] | None = Field(default=None, description="Where the version was published, if it was.")


class LineageEdgeOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    child: str
    parent: str
    coefficient: float
    role: str
    strategy: str


class LineageGraph(_Out):
    root: str
    direction: Literal["up", "down", "both"]
    depth: int
    nodes: list[LineageNode]
    edges: list[LineageEdgeOut]


# -- plans and merges ----------------------------------------------------------------------------------


class PlanRequest(_In):
    expression: str = Field(min_length=1, max_length=10_000, examples=["base + code - toxic"])


class PlannedOperandOut(_Out):
    ref: str
    weight: float
    sha256: str


class PlanOut(_Out):
    plan_hash: str
    expression: str
    normalized: str
    base_model: str
    operands: list[PlannedOperandOut]
    modules: int
    output_ranks: list[int]
    warnings: list[str]
    plan: dict[str, Any] = Field(description="The full plan IR (what a worker runs).")


class MergeRequest(_In):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"expression": "base + code - toxic", "name": "code-detox", "tags": ["demo"]}]}
    )

    expression: str = Field(min_length=1, max_length=10_000, examples=["base + code - toxic"])
    name: str = Field(min_length=1, max_length=200, description="Adapter that receives the result.")
    tags: list[str] = Field(default_factory=list, max_length=50)
    publish: bool = Field(default=False, description="Publish the result to the Hub once it is recorded.")
    repo: str | None = Field(default=None, max_length=300, description="Hub repo for publish (ORG/NAME).")
    force: bool = Field(default=False, description="Run even when the same plan already produced a result.")


class ProgressOut(_Out):
    done: int
    total: int


class JobError(_Out):
    code: str
    message: str


# -- publishing and Hub ingest ---------------------------------------------------------------------------

HUB_REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"


class PublishRequest(_In):
    repo: str | None = Field(
        default=None, max_length=300, description="Hub repo (ORG/NAME); default {namespace}/{adapter name}."
    )


class HubIngestRequest(_In):
    """``POST /v1/adapters`` with a JSON body: register an adapter from the Hub instead of uploading it."""

    name: str = Field(min_length=1, max_length=200, description="Adapter name; ingesting again adds a version.")
    hub_repo: str = Field(min_length=1, max_length=300, pattern=HUB_REPO_PATTERN, examples=["org/code-lora"])
    revision: str = Field(default="main", min_length=1, max_length=200, description="Branch, tag or commit.")
    subfolder: str | None = Field(default=None, max_length=300, description="The adapter's folder in the repo.")
    tags: list[str] = Field(default_factory=list, max_length=50)
    description: str = Field(default="", max_length=10_000)
    base_model: str | None = Field(default=None, max_length=300, description="Override base_model_name_or_path.")

    @property
    def uri(self) -> str:
        folder = f"/{self.subfolder.strip('/')}" if self.subfolder else ""
        return f"hf://{self.hub_repo}{folder}@{self.revision}"


class PublicationOut(_Out):
    id: int
    ref: str
    version_id: int
    status: Literal["pending", "published", "failed"]
    endpoint: str
    repo: str
    tag: str
    commit: str | None
    url: str | None
    attempts: int
    error: JobError | None
    published_at: dt.datetime | None

    @classmethod
    def of(cls, publication: Publication, ref: str) -> PublicationOut:
        error = (
            JobError(code=publication.error_code, message=publication.error_message or "")
            if publication.error_code
            else None
        )
        return cls(
            id=publication.id,
            ref=ref,
            version_id=publication.version_id,
            status=publication.status,  # type: ignore[arg-type]
            endpoint=publication.endpoint,
            repo=publication.repo_id,
            tag=publication.tag,
            commit=publication.commit_oid,
            url=publication.url,
            attempts=publication.attempts,
            error=error,
            published_at=publication.published_at,
        )


class JobOut(_Out):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    expression: str
    target_name: str
    tags: list[str]
    plan_hash: str
    progress: ProgressOut
    attempts: int
    cancel_requested: bool
    warnings: list[str]
    error: JobError | None
    result: str | None = Field(description="The result version's reference, NAME@N, once succeeded.")
    result_version_id: int | None
    reused_from: str | None = Field(description="The earlier job whose result answered this one.")
    engine_seconds: float | None
    retained_energy: float | None = Field(
        description="Share of the exact result's energy the output keeps (1.0 when exact); set once succeeded."
    )
    created_at: dt.datetime | None
    updated_at: dt.datetime | None

    @classmethod
    def of(cls, job: MergeJob) -> JobOut:
        error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
        result = job.result_version.ref if job.result_version is not None else None
        return cls(
            id=job.id,
            status=job.status,  # type: ignore[arg-type]
            expression=job.expression,
            target_name=job.target_name,
            tags=list(job.tags),
            plan_hash=job.plan_hash,
            progress=ProgressOut(done=job.progress_done, total=job.progress_total),
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            warnings=[*job.plan.get("warnings", []), *(job.run_warnings or [])],
            error=error,
            result=result,
            result_version_id=job.result_version_id,
            reused_from=job.reused_from,
            engine_seconds=job.engine_seconds,
            retained_energy=job.retained_energy,
            created_at=job.created_at,
            updated_at=job.updated_at,
        )


class JobPage(_Out):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


# -- health --------------------------------------------------------------------------------------------


class Health(_Out):
    status: Literal["ok"]


class Readiness(_Out):
    status: Literal["ready", "not_ready"]
    database: str
    broker: str
    mode: Literal["celery", "embedded"]
