"""The one table from error codes to HTTP statuses (and CLI exit codes)."""

from __future__ import annotations

STATUS_BY_CODE: dict[str, int] = {
    "not_found": 404,
    "adapter_not_found": 404,
    "version_not_found": 404,
    "conflict": 409,
    "invalid_input": 422,
    "invalid_adapter": 422,
    "invalid_config": 500,
    "merge_failed": 500,
    # Publishing and Hub ingest (issue 6): the Hub is an upstream, so its failures are gateway errors.
    "publish_conflict": 409,
    "hub_not_found": 404,
    "hub_error": 502,
    "hub_auth_failed": 502,
    "hub_unavailable": 503,
    # The service (issue 5).
    "unauthenticated": 401,
    "forbidden": 403,
    "job_not_found": 404,
    "file_not_found": 404,
    "route_not_found": 404,
    "method_not_allowed": 405,
    "idempotency_key_reused": 409,
    "job_finished": 409,
    "payload_too_large": 413,
    "length_required": 411,
    "invalid_request": 422,
    "invalid_upload": 422,
    "not_supported": 422,
    "broker_unavailable": 503,
    "internal_error": 500,
}
COMPILE_ERROR_STATUS = 422  # every CompileError code is bad input


def http_status(code: str, *, compile_error: bool = False) -> int:
    if compile_error:
        return COMPILE_ERROR_STATUS
    return STATUS_BY_CODE.get(code, 500)


def exit_code(code: str, *, compile_error: bool = False) -> int:
    """CLI exit status: 2 for bad input, 3 for not found, 4 for conflicts, 1 otherwise."""
    status = http_status(code, compile_error=compile_error)
    return {422: 2, 404: 3, 409: 4}.get(status, 1)
