"""``/v1/adapters``: upload, browse, download files, and walk lineage."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError

from api.deps import Reader, State, UoW, Writer
from api.dispatch import PublishDispatcher, enqueue_publish_or_fail
from api.schemas import (
    AdapterDetail,
    AdapterOut,
    AdapterPage,
    ErrorResponse,
    HubIngestRequest,
    LineageGraph,
    PublicationOut,
    PublishRequest,
    UploadOut,
    VersionOut,
)
from api.uploads import staged_folder
from registry import repositories as repo
from registry.errors import FileNotFound, NotFound, NotSupported
from registry.formats.peft import CONFIG_FILE, WEIGHTS_FILE
from registry.services import adapters as service
from registry.services import publications as pubs
from registry.services.lineage import lineage_graph

router = APIRouter(tags=["adapters"])

VersionParam = Annotated[str, "a version number, vN or latest"]
IMMUTABLE = "public, max-age=31536000, immutable"


async def hub_ingest_body(request: Request) -> HubIngestRequest | None:
    """A JSON body (``{name, hub_repo, revision}``) asks for a Hub ingest; multipart is an upload (None)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return None
    try:
        return HubIngestRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


@router.post(
    "/adapters",
    status_code=201,
    summary="Upload a PEFT LoRA folder's files as a new version, or ingest one from the Hub",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                # An upload needs both (the route declares them optional only because a Hub ingest sends JSON).
                "multipart/form-data": {"schema": {"required": ["name", "files"]}},
                "application/json": {
                    # Inline: no route takes the model as a body parameter, so it is not among the components.
                    "schema": HubIngestRequest.model_json_schema(),
                    "example": {"name": "code-lora", "hub_repo": "org/code-lora", "revision": "main"},
                },
            }
        }
    },
    responses={
        200: {"model": UploadOut, "description": "Identical to the latest version; nothing added."},
        411: {"model": ErrorResponse, "description": "A chunked upload with no Content-Length (length_required)."},
        502: {"model": ErrorResponse, "description": "Hub ingest: the Hub refused (hub_error, hub_auth_failed)."},
    },
)
def upload_adapter(
    uow: UoW,
    state: State,
    _who: Writer,
    response: Response,
    hub: Annotated[HubIngestRequest | None, Depends(hub_ingest_body)],
    name: Annotated[
        str | None, Form(max_length=200, description="Adapter name; uploading again adds a version.")
    ] = None,
    files: Annotated[
        list[UploadFile] | None, File(description="adapter_config.json and adapter_model.safetensors.")
    ] = None,
    tags: Annotated[str, Form(max_length=2000, description="Comma-separated task tags.")] = "",
    description: Annotated[str, Form(max_length=10_000)] = "",
    base_model: Annotated[str | None, Form(max_length=300, description="Override base_model_name_or_path.")] = None,
) -> UploadOut:
    """Validated exactly like ``graft register``: pickles, incomplete factors, bad shapes, NaN/Inf are refused.

    With a JSON body ``{"name", "hub_repo", "revision"}`` the adapter files are downloaded from the configured
    Hub instead (only ``adapter_config.json`` and ``adapter_model.safetensors``), pinned to the commit the
    revision resolves to, and validated the same way. Hub errors: ``hub_not_found`` (404), ``invalid_adapter``
    (422), ``hub_error``/``hub_auth_failed`` (502), ``hub_unavailable`` (503).
    """
    if hub is not None:
        return _ingest(uow, state, response, hub)
    missing = [field for field, value in (("name", name), ("files", files)) if not value]
    if missing:
        raise RequestValidationError(
            [{"loc": ("body", field), "msg": "Field required", "type": "missing"} for field in missing]
        )
    assert name is not None and files is not None
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    with staged_folder(state.runtime.store, files, state.settings.max_upload_bytes) as folder:
        result = service.register_folder(
            uow.session,
            state.runtime.store,
            folder,
            name,
            tags=tag_list,
            description=description,
            base_model=base_model or None,
        )
    if not result.created:
        response.status_code = 200
    return UploadOut(version=VersionOut.of(result.version), created=result.created)


def _ingest(uow: UoW, state: State, response: Response, body: HubIngestRequest) -> UploadOut:
    from workers.hub_ingest import ingest_from_hub  # the Hub client, loaded only when ingesting

    service.check_name(body.name)  # refuse a bad name before the download, not after it
    outcome = ingest_from_hub(
        body.uri,
        body.name,
        session_factory=state.runtime.sessions,
        store=state.runtime.store,
        settings=state.settings,
        tags=body.tags,
        description=body.description,
        base_model=body.base_model,
    )
    version = service.resolve_version(uow.session, str(outcome.version["ref"]))
    if not outcome.created:
        response.status_code = 200
    return UploadOut(version=VersionOut.of(version), created=outcome.created)


@router.get("/adapters", summary="Find adapters")
def list_adapters(
    uow: UoW,
    _who: Reader,
    base_model: Annotated[str | None, Query(max_length=300, description="Exact base model name.")] = None,
    tag: Annotated[str | None, Query(max_length=100)] = None,
    rank_min: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    rank_max: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    q: Annotated[str | None, Query(max_length=200, description="Text in the name or description.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> AdapterPage:
    """Filters apply to each adapter's latest version; results are ordered by name."""
    rows, total = service.find_adapters(
        uow.session,
        base_model=base_model,
        tag=tag,
        rank_min=rank_min,
        rank_max=rank_max,
        text=q,
        limit=limit,
        offset=offset,
    )
    items = [
        AdapterOut(
            name=row.latest.adapter.name,
            description=row.latest.adapter.description,
            tags=list(row.latest.adapter.tags),
            versions=row.versions,
            latest=VersionOut.of(row.latest),
        )
        for row in rows
    ]
    return AdapterPage(items=items, total=total, limit=limit, offset=offset)


# The routes below take names with '/' in them (``acme/code-lora``), so the most specific come first.


@router.get(
    "/adapters/{name:path}/versions/{version}/files/{file}",
    summary="Download a file of a version",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}, "application/json": {}}},
        304: {"description": "If-None-Match matched the ETag (the file's sha256)."},
    },
)
def download_file(
    uow: UoW,
    state: State,
    _who: Reader,
    name: str,
    version: VersionParam,
    file: str,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Streams the file; its sha256 is the ETag, and a matching If-None-Match answers 304."""
    found = service.resolve_version(uow.session, f"{name}@{version}")
    if file == WEIGHTS_FILE:
        etag = f'"{found.sha256}"'
        if _matches(if_none_match, etag):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
        path = state.runtime.store.path(found.artifact_key)
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=WEIGHTS_FILE,
            headers={"ETag": etag, "Cache-Control": IMMUTABLE},
        )
    if file == CONFIG_FILE:
        body = json.dumps(found.peft_config, indent=2, sort_keys=True).encode("utf-8")
        etag = f'"{hashlib.sha256(body).hexdigest()}"'
        if _matches(if_none_match, etag):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
        return Response(body, media_type="application/json", headers={"ETag": etag, "Cache-Control": IMMUTABLE})
    raise FileNotFound(f"{found.ref} has no file {file!r}; its files are {CONFIG_FILE} and {WEIGHTS_FILE}")


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {c.strip().removeprefix("W/") for c in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


@router.post(
    "/adapters/{name:path}/versions/{version}/publish",
    status_code=202,
    summary="Publish a version to the Hub (one commit tagged vN)",
    responses={200: {"model": PublicationOut, "description": "Already published; nothing to do."}},
)
def publish_version(
    uow: UoW,
    state: State,
    _who: Writer,
    response: Response,
    name: str,
    version: VersionParam,
    body: PublishRequest | None = None,
) -> PublicationOut:
    """Idempotent: a published version answers 200 with its publication; otherwise the publication is queued
    (202, status ``pending``) and runs on the ``publish`` queue (or in this process without a broker); a failed
    one is retried. Follow it with ``GET`` on the same path."""
    found = service.resolve_version(uow.session, f"{name}@{version}")
    dispatcher = state.dispatcher
    if not isinstance(dispatcher, PublishDispatcher):
        raise NotSupported("this deployment's job dispatcher cannot publish; use `graft publish`")
    repo_id = body.repo if body is not None else None
    target = pubs.hub_target(state.settings, found.adapter.name, repo_id)
    publication = pubs.prepare_publication(uow.session, found, target)
    if publication.status == "published":
        response.status_code = 200
    else:
        version_id, publication_id = found.id, publication.id
        uow.after_commit(
            lambda: enqueue_publish_or_fail(dispatcher, state.runtime, version_id, repo_id, publication_id)
        )
    return PublicationOut.of(publication, found.ref)


@router.get("/adapters/{name:path}/versions/{version}/publish", summary="Where a version is published, and how")
def get_publication(
    uow: UoW,
    state: State,
    _who: Reader,
    name: str,
    version: VersionParam,
    repo_id: Annotated[str | None, Query(alias="repo", max_length=300, description="Hub repo (ORG/NAME).")] = None,
) -> PublicationOut:
    """The publication of this version on the configured Hub (status pending, published or failed)."""
    found = service.resolve_version(uow.session, f"{name}@{version}")
    target = pubs.hub_target(state.settings, found.adapter.name, repo_id)
    publication = repo.get_publication(uow.session, found.id, target.endpoint, target.repo_id)
    if publication is None:
        raise NotFound(f"{found.ref} has not been published to {target.label}")
    return PublicationOut.of(publication, found.ref)


@router.get("/adapters/{name:path}/versions/{version}/lineage", summary="Lineage graph around a version")
def get_lineage(
    uow: UoW,
    _who: Reader,
    name: str,
    version: VersionParam,
    direction: Literal["up", "down", "both"] = "up",
    depth: Annotated[int, Query(ge=1, le=64)] = 64,
) -> LineageGraph:
    """Ancestors (up), descendants (down) or both, to ``depth`` edges, each walk one recursive query."""
    found = service.resolve_version(uow.session, f"{name}@{version}")
    graph = lineage_graph(uow.session, found, direction, depth)
    return LineageGraph(direction=direction, depth=depth, **graph)


@router.get("/adapters/{name:path}/versions/{version}", summary="One version")
def get_version(uow: UoW, _who: Reader, name: str, version: VersionParam) -> VersionOut:
    """``version`` is a number, ``vN`` or ``latest``."""
    return VersionOut.of(service.resolve_version(uow.session, f"{name}@{version}"))


@router.get("/adapters/{name:path}", summary="One adapter")
def get_adapter(uow: UoW, _who: Reader, name: str) -> AdapterDetail:
    adapter, latest = service.get_adapter_or_404(uow.session, name)
    return AdapterDetail(
        name=adapter.name,
        description=adapter.description,
        tags=list(adapter.tags),
        versions=len(adapter.versions),
        version_numbers=[v.number for v in adapter.versions],
        latest=VersionOut.of(latest),
    )
