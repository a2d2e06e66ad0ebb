"""The error-code registry and the two error bases built on it.

:class:`ErrorCode` is every stable, machine-readable reason modelbay gives: the ``code`` of an
HTTP error envelope and the ``error.type`` of a failed job record (the string is what is
stored and answered). Each member carries the HTTP status a client sees for it and its
OpenAI error ``type``, whose categories the official SDK maps to its usual exceptions.

- :class:`ModelbayError`: an error answered to an HTTP request (web/errors.py renders it).
- :class:`JobFailed`: a job's failure as a worker records it; the worker's errors (a load, a
  staging, a backend call) derive from it, each with ``(code, message)``.
"""
from __future__ import annotations

from enum import StrEnum, unique
from typing import Any

# OpenAI's error types (``error.type``), by the class of failure.
INVALID_REQUEST_ERROR = "invalid_request_error"
AUTHENTICATION_ERROR = "authentication_error"
NOT_FOUND_ERROR = "not_found_error"
CONFLICT_ERROR = "conflict_error"
SERVICE_UNAVAILABLE = "service_unavailable"
SERVER_ERROR = "server_error"
RATE_LIMIT_ERROR = "rate_limit_error"
OPENAI_TYPES = frozenset({INVALID_REQUEST_ERROR, AUTHENTICATION_ERROR, NOT_FOUND_ERROR, CONFLICT_ERROR,
                          SERVICE_UNAVAILABLE, SERVER_ERROR, RATE_LIMIT_ERROR})


@unique
class ErrorCode(StrEnum):
    """A stable error code; ``http_status`` and ``openai_type`` say how a client sees it."""

    http_status: int
    openai_type: str

    def __new__(cls, value: str, http_status: int, openai_type: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.http_status = http_status
        member.openai_type = openai_type
        return member

    @classmethod
    def of(cls, text: str | None) -> ErrorCode:
        """The member spelled ``text`` (a stored ``error.type``); ``job_failed`` when unknown."""
        try:
            return cls(text)
        except ValueError:
            return cls.JOB_FAILED

    # 400: the request (or a job's parameters) is wrong
    INVALID_REQUEST = "invalid_request", 400, INVALID_REQUEST_ERROR
    INVALID_MODEL_NAME = "invalid_model_name", 400, INVALID_REQUEST_ERROR
    INVALID_SOURCE = "invalid_source", 400, INVALID_REQUEST_ERROR
    INVALID_CALLBACK_URL = "invalid_callback_url", 400, INVALID_REQUEST_ERROR  # a refused webhook target
    LIMIT_EXCEEDED = "limit_exceeded", 400, INVALID_REQUEST_ERROR
    UNKNOWN_BACKEND = "unknown_backend", 400, INVALID_REQUEST_ERROR
    UNKNOWN_OPTION = "unknown_option", 400, INVALID_REQUEST_ERROR
    UNSUPPORTED_TASK = "unsupported_task", 400, INVALID_REQUEST_ERROR
    INVALID_PARAMS = "invalid_params", 400, INVALID_REQUEST_ERROR
    UNAUTHORIZED = "unauthorized", 401, AUTHENTICATION_ERROR
    # 404: no such thing
    NOT_FOUND = "not_found", 404, NOT_FOUND_ERROR
    JOB_NOT_FOUND = "job_not_found", 404, NOT_FOUND_ERROR
    MODEL_NOT_FOUND = "model_not_found", 404, NOT_FOUND_ERROR
    NODE_NOT_FOUND = "node_not_found", 404, NOT_FOUND_ERROR
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, INVALID_REQUEST_ERROR
    # 409: the state does not allow it
    CONFLICT = "conflict", 409, CONFLICT_ERROR
    JOB_FINISHED = "job_finished", 409, CONFLICT_ERROR
    JOB_CANCELLED = "job_cancelled", 409, CONFLICT_ERROR
    LOAD_NOT_CANCELLABLE = "load_not_cancellable", 409, CONFLICT_ERROR
    BACKEND_UNSUPPORTED = "backend_unsupported", 409, CONFLICT_ERROR
    PAYLOAD_TOO_LARGE = "payload_too_large", 413, INVALID_REQUEST_ERROR
    FILE_TOO_LARGE = "file_too_large", 413, INVALID_REQUEST_ERROR  # an upload over MODELBAY_MAX_FILE_MB
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415, INVALID_REQUEST_ERROR
    VALIDATION_ERROR = "validation_error", 422, INVALID_REQUEST_ERROR
    # an Idempotency-Key sent again with another body (tasks/idempotency.py)
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused", 422, INVALID_REQUEST_ERROR
    # the first request with this Idempotency-Key is still being answered (past the wait)
    IDEMPOTENCY_KEY_IN_USE = "idempotency_key_in_use", 409, CONFLICT_ERROR
    # 429 (with Retry-After): the model's queue is at its cap (MODELBAY_MAX_QUEUED_PER_MODEL)
    QUEUE_FULL = "queue_full", 429, RATE_LIMIT_ERROR
    # 503 (with Retry-After): retrying later may work
    UNAVAILABLE = "unavailable", 503, SERVICE_UNAVAILABLE
    STORE_UNAVAILABLE = "store_unavailable", 503, SERVICE_UNAVAILABLE
    FILE_STORE_UNAVAILABLE = "file_store_unavailable", 503, SERVICE_UNAVAILABLE  # S3 unreachable or failing
    NO_NODE = "no_node", 503, SERVICE_UNAVAILABLE
    LOAD_COOLDOWN = "load_cooldown", 503, SERVICE_UNAVAILABLE
    MODEL_LOADING = "model_loading", 503, SERVICE_UNAVAILABLE
    MODEL_UNAVAILABLE = "model_unavailable", 503, SERVICE_UNAVAILABLE
    NODE_LOST = "node_lost", 503, SERVICE_UNAVAILABLE
    INSUFFICIENT_MEMORY = "insufficient_memory", 503, SERVICE_UNAVAILABLE
    DEVICE_UNAVAILABLE = "device_unavailable", 503, SERVICE_UNAVAILABLE  # a GPU asked for, none usable
    LOAD_FAILED = "load_failed", 503, SERVICE_UNAVAILABLE
    BACKEND_START_FAILED = "backend_start_failed", 503, SERVICE_UNAVAILABLE
    SOURCE_UNREACHABLE = "source_unreachable", 503, SERVICE_UNAVAILABLE
    STAGING_FAILED = "staging_failed", 503, SERVICE_UNAVAILABLE
    # 500: something broke
    INTERNAL_ERROR = "internal_error", 500, SERVER_ERROR
    JOB_FAILED = "job_failed", 500, SERVER_ERROR
    BACKEND_ERROR = "backend_error", 500, SERVER_ERROR
    BACKEND_CALL_FAILED = "backend_call_failed", 500, SERVER_ERROR
    BACKEND_CRASHED = "backend_crashed", 500, SERVER_ERROR
    HASH_MISMATCH = "hash_mismatch", 500, SERVER_ERROR
    SOURCE_REJECTED = "source_rejected", 500, SERVER_ERROR
    # A job ended by an unload (a load: status ``cancelled``) or by a cancel (its record's
    # status ``cancelled`` answers ``job_cancelled``); as a failure's type, a 500.
    UNLOADED = "unloaded", 500, SERVER_ERROR
    CANCELLED = "cancelled", 500, SERVER_ERROR


class ModelbayError(Exception):
    """An error answered to an HTTP request: ``{"error": {type, code, message, param}}``.

    Its ``code`` (the class's, or the one given) sets its ``status`` and ``type``; a 503
    carries ``Retry-After`` (``retry_after_s`` seconds)."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, param: str | None = None, code: ErrorCode | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 beside: dict[str, Any] | None = None, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else type(self).code
        self.status = self.code.http_status
        self.headers = dict(headers or {})
        if self.status == 503:
            self.headers.setdefault("Retry-After", str(retry_after_s))
        self.extra = extra or {}    # more fields inside "error"
        self.beside = beside or {}  # more top-level keys next to "error" (e.g. "loading")

    @property
    def type(self) -> str:
        return self.code.openai_type

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "code": self.code.value, "message": self.message,
                                "param": self.param}
        body.update(self.extra)
        return {"error": body, **self.beside}


class InvalidRequest(ModelbayError):
    code = ErrorCode.INVALID_REQUEST


class Unauthorized(ModelbayError):
    code = ErrorCode.UNAUTHORIZED


class NotFound(ModelbayError):
    code = ErrorCode.NOT_FOUND


class MethodNotAllowed(ModelbayError):
    code = ErrorCode.METHOD_NOT_ALLOWED


class Conflict(ModelbayError):
    code = ErrorCode.CONFLICT


class PayloadTooLarge(ModelbayError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class FileTooLarge(ModelbayError):
    """A file (an upload, or an output being written) over its limit; nothing of it is kept."""

    code = ErrorCode.FILE_TOO_LARGE


class FileStoreUnavailable(ModelbayError):
    """The file store (S3) did not answer, or answered with a server error; 503."""

    code = ErrorCode.FILE_STORE_UNAVAILABLE


class UnsupportedMediaType(ModelbayError):
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class Unprocessable(ModelbayError):
    code = ErrorCode.VALIDATION_ERROR


class Unavailable(ModelbayError):
    """503 with ``Retry-After`` (seconds)."""

    code = ErrorCode.UNAVAILABLE


class JobFailed(Exception):
    """A job's failure, recorded as its ``error`` (``type`` ``code``, ``message``).

    The base of the worker's errors; a subclass with one fixed code takes the message alone
    (see :class:`~workers.supervisor.calls.BackendError`)."""

    code: ErrorCode = ErrorCode.JOB_FAILED

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


__all__ = ["ErrorCode", "OPENAI_TYPES", "ModelbayError", "InvalidRequest", "Unauthorized", "NotFound",
           "MethodNotAllowed", "Conflict", "PayloadTooLarge", "FileTooLarge", "FileStoreUnavailable",
           "UnsupportedMediaType", "Unprocessable",
           "Unavailable", "JobFailed"]
