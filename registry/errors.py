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


class PublishConflict(Conflict):
    """The Hub already holds this version's tag with other content; nothing was overwritten."""

    code = "publish_conflict"


class HubError(GraftError):
    """The Hub refused a request for a reason that retrying will not fix (a 4xx answer)."""

    code = "hub_error"


class HubAuthFailed(HubError):
    """The Hub refused the token (401/403). The message never contains the token."""

    code = "hub_auth_failed"


class HubUnavailable(HubError):
    """The Hub answered 5xx, timed out or could not be reached, on every attempt."""

    code = "hub_unavailable"


class HubNotFound(NotFound):
    """A Hub repo, revision or file does not exist (or is not visible with this token)."""

    code = "hub_not_found"


# -- the service (issue 5) -----------------------------------------------------------------------------


class Unauthenticated(GraftError):
    """No API token, or one that is unknown or revoked. The message never repeats the token."""

    code = "unauthenticated"


class Forbidden(GraftError):
    """The API token is valid but its scope does not allow this request."""

    code = "forbidden"


class JobNotFound(NotFound):
    code = "job_not_found"


class FileNotFound(NotFound):
    """A version has no file of that name (it has ``adapter_config.json`` and ``adapter_model.safetensors``)."""

    code = "file_not_found"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class InvalidUpload(InvalidInput):
    """An upload's files could not be staged as a folder (no files, odd names, duplicates)."""

    code = "invalid_upload"


class IdempotencyKeyReused(Conflict):
    """An ``Idempotency-Key`` seen before came with a different request body."""

    code = "idempotency_key_reused"


class JobFinished(Conflict):
    """The job already finished, so it can no longer be cancelled."""

    code = "job_finished"


class NotSupported(InvalidInput):
    """A valid request for something this deployment does not do (yet)."""

    code = "not_supported"


class BrokerUnavailable(GraftError):
    """The task broker (Redis) could not be reached."""

    code = "broker_unavailable"
