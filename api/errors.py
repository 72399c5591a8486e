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
