"""The REST API's composition root: ``create_app(settings)`` wires settings → runtime → dispatcher → routes.

Run it with ``uvicorn api.app:create_app --factory`` (settings from the environment) or ``graft serve``
(which also runs merges in-process when no broker is configured).

Every error leaves through one handler and one table (``api/errors.py``): the body is always
``{"error": {"code", "message", ...}}``; bad input is 4xx, never 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import AppState
from api.dispatch import Dispatcher, dispatcher_for
from api.errors import http_status
from api.routes import adapters, health, merges
from api.runtime import Runtime, build_runtime
from api.schemas import ErrorResponse
from api.web import router as web_router
from registry.errors import GraftError
from registry.settings import Settings, load_settings
from workers.compiler import CompileError

log = logging.getLogger("graft.api")

API_VERSION = "v1"
# Non-upload request bodies (JSON) are small; uploads get GRAFT_MAX_UPLOAD_BYTES plus multipart framing.
MAX_JSON_BYTES = 1 << 20
MULTIPART_SLACK = 1 << 20

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (401, "No API token, or an unknown or revoked one (code unauthenticated)."),
        (403, "The token's scope does not allow this (code forbidden)."),
        (404, "Unknown adapter, version, file or job."),
        (409, "Conflict: a name or base-model clash, a reused Idempotency-Key, a finished job."),
        (413, "The request body is too large (code payload_too_large)."),
        (422, "Bad input: invalid request, invalid adapter, or an expression error with its span."),
        (503, "The broker could not be reached (code broker_unavailable)."),
    )
}


def error_body(
    code: str,
    message: str,
    *,
    span: dict[str, int] | None = None,
    rendered: str | None = None,
    details: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if span is not None:
        error["span"] = span
    if rendered is not None:
        error["rendered"] = rendered
    if details is not None:
        error["details"] = details
    return {"error": error}


def _error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _graft_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GraftError)
    status = http_status(exc.code)
    if status >= 500:
        log.error("request failed: %s: %s", exc.code, exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _error_response(status, error_body(exc.code, exc.message), headers)


async def _compile_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CompileError)
    info = exc.as_dict()
    span = {key: value for key in ("start", "end", "column", "line") if isinstance(value := info.get(key), int)}
    return _error_response(
        http_status(exc.code, compile_error=True),
        error_body(exc.code, exc.message, span=span, rendered=exc.render()),
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type")),
        }
        for err in exc.errors()
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"]) or "request"
    message = f"{where}: {first['msg']}" + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")
    return _error_response(422, error_body("invalid_request", message, details=details))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # The framework could not parse the body (JSON that is not UTF-8, a broken multipart body): bad input,
        # answered like malformed JSON is.
        message = f"body: {exc.detail or 'the request body could not be parsed'}"
        return _error_response(422, error_body("invalid_request", message))
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = str(exc.detail) if exc.detail else "request failed"
    return _error_response(exc.status_code, error_body(code, message), dict(exc.headers or {}))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return _error_response(500, error_body("internal_error", "internal error; the server log has the details"))


class BodyLimit:
    """Refuses request bodies over the limit (413) from their Content-Length, before anything reads them,
    and uploads without a token (401), so that nobody can make the server spool a large body anonymously.

    A multipart upload must declare its length (411 otherwise); the upload staging caps it again while
    copying, so a lying Content-Length gains nothing.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload = max_upload_bytes + MULTIPART_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        multipart = headers.get("content-type", "").startswith("multipart/")
        limit = self.max_upload if multipart else MAX_JSON_BYTES
        length = headers.get("content-length")
        refusal: tuple[int, str, str] | None = None
        if multipart and not headers.get("authorization"):
            # Every upload is a write, and writes need a token: refuse before the body is read.
            refusal = (401, "unauthenticated", "uploads need an API token with the 'write' scope")
        elif length is None:
            if multipart and "chunked" in headers.get("transfer-encoding", ""):
                refusal = (411, "length_required", "uploads must declare their Content-Length")
        elif not length.isdigit():
            refusal = (400, "invalid_request", "Content-Length is not a number")
        elif int(length) > limit:
            refusal = (413, "payload_too_large", f"the request body is larger than the limit of {limit} bytes")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refusal
        extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await _error_response(status, error_body(code, message), extra)(scope, receive, send)


class RefuseNul:
    """Refuses (422) a request with a NUL character in its path or query string, before any route runs.

    No adapter name, version, job id or filter can contain one (PostgreSQL text cannot), so such a request
    can only be bad input; request bodies are checked field by field (``api/schemas.py``, the services).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = None
            if "\x00" in scope["path"]:
                where = "path"
            elif "\x00" in unquote_plus(scope["query_string"].decode("latin-1")):
                where = "query string"
            if where is not None:
                body = error_body("invalid_request", f"the request's {where} contains a NUL character (\\x00)")
                await _error_response(422, body)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """Lets at most ``limit`` requests run their handlers at once; the others wait here, first come first served.

    Why: every sync dependency and route runs on anyio's thread pool (40 threads), and a request holds its
    pooled database connection from its first query (the token lookup) until it ends. With more requests in
    flight than connections, threads block waiting for a connection while the requests holding connections
    wait for a thread: nothing moves until the pool times out (30 s, then 500s). Keeping ``limit`` at most the
    connection pool's size (``registry.db.POOL_CAPACITY``) means a running request always gets a connection.
    The slot is released when the response starts, so a long file download does not hold one.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.slots = asyncio.Semaphore(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":  # liveness must answer even when saturated
            await self.app(scope, receive, send)
            return
        await self.slots.acquire()
        held = True

        async def send_releasing(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start":
                held = False
                self.slots.release()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            if held:
                self.slots.release()


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    dispatcher: Dispatcher | None = None,
) -> FastAPI:
    """Build the API. With no arguments, everything comes from the environment (``GRAFT_*``).

    ``runtime`` and ``dispatcher`` may be passed in (``graft serve``, tests); otherwise the runtime is built
    from the settings and the dispatcher is Celery when ``GRAFT_BROKER_URL`` is set, else the embedded queue
    (whose jobs run in ``graft serve``'s runner thread or a ``graft worker`` without a broker).
    """
    if settings is None:
        settings = runtime.settings if runtime is not None else load_settings()
    runtime = runtime or build_runtime(settings)
    dispatcher = dispatcher or dispatcher_for(settings)

    app = FastAPI(
        title="Graft",
        summary="A registry of LoRA adapters and arithmetic over them, with lineage.",
        version=API_VERSION,
        openapi_url=f"/{API_VERSION}/openapi.json",
        docs_url=f"/{API_VERSION}/docs",
        redoc_url=None,
    )
    app.state.graft = AppState(settings=settings, runtime=runtime, dispatcher=dispatcher)
    app.add_exception_handler(GraftError, _graft_error)
    app.add_exception_handler(CompileError, _compile_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyLimit, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(RefuseNul)
    app.add_middleware(ConcurrencyLimit, limit=settings.api_max_concurrency)  # outermost: waits before all work
    for router in (adapters.router, merges.router):
        app.include_router(router, prefix=f"/{API_VERSION}", responses=ERROR_RESPONSES)
    app.include_router(health.router)
    app.include_router(web_router)  # the lineage web page: /, /ui/adapters/...
    return app
