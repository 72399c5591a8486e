"""Typed errors. Every error Graft raises on purpose carries a stable ``code``.

The API maps codes to HTTP statuses in one table (``api/errors.py``); the CLI prints the message.
Messages say what is wrong and how to fix it, on one line.
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class: an expected failure with a stable machine-readable code."""

    code = "graft_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(GraftError):
    code = "not_found"


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class Conflict(GraftError):
    code = "conflict"


class InvalidInput(GraftError):
    code = "invalid_input"


class InvalidAdapter(InvalidInput):
    """An uploaded adapter folder failed validation; nothing was registered."""

    code = "invalid_adapter"


class InvalidConfig(GraftError):
    code = "invalid_config"


class MergeFailed(GraftError):
    code = "merge_failed"
