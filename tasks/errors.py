"""The error hierarchy. Each error has a stable ``code``, an HTTP ``status`` and a ``type``.

``type`` follows OpenAI's categories so the official SDK raises its usual exceptions;
``code`` is modelbay's stable machine-readable reason.
"""
from __future__ import annotations

from typing import Any


class ModelbayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 beside: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.extra = extra or {}    # more fields inside "error"
        self.beside = beside or {}  # more top-level keys next to "error" (e.g. "loading")

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message,
                                "param": self.param}
        body.update(self.extra)
        return {"error": body, **self.beside}


class InvalidRequest(ModelbayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(ModelbayError):
    status, type, code = 401, "authentication_error", "unauthorized"


class NotFound(ModelbayError):
    status, type, code = 404, "not_found_error", "not_found"


class MethodNotAllowed(ModelbayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class Conflict(ModelbayError):
    status, type, code = 409, "conflict_error", "conflict"


class PayloadTooLarge(ModelbayError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(ModelbayError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class Unprocessable(ModelbayError):
    status, type, code = 422, "invalid_request_error", "validation_error"


class Unavailable(ModelbayError):
    """503 with ``Retry-After`` (seconds)."""

    status, type, code = 503, "service_unavailable", "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after_s))


class JobError(ModelbayError):
    """A failure recorded on a job (``job.error``); never raised to an HTTP client as 5xx."""

    code = "job_failed"
