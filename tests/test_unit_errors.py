"""The error-code registry (tasks/errors.py): every code carries a valid HTTP status and OpenAI
type, product code names codes only through it, the worker's errors share one
``(code, message)`` base, a backend call's gRPC status maps to a code in one place, and a
failed job answers what the API answered before the registry."""
from __future__ import annotations

import ast
import re
from http import HTTPStatus
from pathlib import Path

import grpc
import pytest

from tasks.errors import (OPENAI_TYPES, Conflict, ErrorCode, InvalidRequest, JobFailed, MethodNotAllowed,
                          ModelbayError, NotFound, PayloadTooLarge, Unauthorized, Unavailable, Unprocessable,
                          UnsupportedMediaType)
from tasks.schemas import JobErrorInfo, JobRecord
from web.openai.serving import job_error
from workers.node.models import LoadFailed, Unloaded
from workers.staging.output import StagingError
from workers.supervisor.calls import (GRPC_ERROR_CODES, BackendCallError, BackendCancelled, BackendError,
                                      BackendStartError)

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("tasks", "web", "workers")
CLIENT_TYPES = OPENAI_TYPES - {"server_error", "service_unavailable"}


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_every_code_has_an_http_status_and_an_openai_type(code: ErrorCode) -> None:
    assert 400 <= HTTPStatus(code.http_status) < 600
    assert code.openai_type in OPENAI_TYPES
    # a 4xx is the client's doing, a 5xx the server's: the SDK raises accordingly
    assert (code.http_status >= 500) == (code.openai_type not in CLIENT_TYPES), code
    assert (code.http_status == 503) == (code.openai_type == "service_unavailable"), code
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code.value) and code.name == code.value.upper()


def test_codes_read_back_from_a_stored_record() -> None:
    assert ErrorCode.of("node_lost") is ErrorCode.NODE_LOST and ErrorCode.of("unloaded") is ErrorCode.UNLOADED
    assert ErrorCode.of("a-code-no-version-wrote") is ErrorCode.JOB_FAILED and ErrorCode.of(None) is ErrorCode.JOB_FAILED
    info = JobErrorInfo(type=ErrorCode.UNLOADED, message="m")
    assert info.model_dump_json() == '{"type":"unloaded","message":"m"}' and type(info.type) is str


# What each request error class answered before the registry: (status, type, code).
REQUEST_ERRORS = [
    (InvalidRequest, 400, "invalid_request_error", "invalid_request"),
    (Unauthorized, 401, "authentication_error", "unauthorized"),
    (NotFound, 404, "not_found_error", "not_found"),
    (MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed"),
    (Conflict, 409, "conflict_error", "conflict"),
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (UnsupportedMediaType, 415, "invalid_request_error", "unsupported_media_type"),
    (Unprocessable, 422, "invalid_request_error", "validation_error"),
    (Unavailable, 503, "service_unavailable", "unavailable"),
    (ModelbayError, 500, "server_error", "internal_error"),
]


@pytest.mark.parametrize("cls,status,kind,code", REQUEST_ERRORS, ids=lambda v: getattr(v, "__name__", None))
def test_request_errors_answer_what_they_did(cls: type[ModelbayError], status: int, kind: str, code: str) -> None:
    err = cls("m", param="p")
    assert (err.status, err.type, err.code) == (status, kind, code)
    body = err.envelope()["error"]
    assert body == {"type": kind, "code": code, "message": "m", "param": "p"} and type(body["code"]) is str
    assert ("Retry-After" in err.headers) == (status == 503)


def test_a_code_given_to_an_error_sets_its_status_and_type() -> None:
    err = Unavailable("m", code=ErrorCode.LOAD_COOLDOWN, retry_after_s=7, headers={"X-Modelbay-Job": "j"})
    assert (err.status, err.type, err.headers) == (503, "service_unavailable", {"X-Modelbay-Job": "j", "Retry-After": "7"})
    assert NotFound("m", code=ErrorCode.JOB_NOT_FOUND).status == 404
    assert ModelbayError("m", code=ErrorCode.UNSUPPORTED_TASK).type == "invalid_request_error"


# How a failed job's error type answered on the OpenAI routes before the registry.
BEFORE_400 = {"invalid_params", "unsupported_task"}
BEFORE_503 = {"insufficient_memory", "no_node", "model_unavailable", "load_cooldown", "node_lost", "load_failed",
              "backend_start_failed", "source_unreachable", "staging_failed"}
JOB_CODES = BEFORE_400 | BEFORE_503 | {"model_not_found", "internal_error", "backend_crashed", "backend_call_failed",
                                       "backend_error", "hash_mismatch", "source_rejected", "unloaded", "cancelled"}


@pytest.mark.parametrize("kind", sorted(JOB_CODES))
def test_a_failed_job_answers_as_before(kind: str) -> None:
    record = JobRecord(id="j", kind="inference", model="m", status="failed", error={"type": kind, "message": "why"})
    err = job_error(record)
    status, openai_type = ((400, "invalid_request_error") if kind in BEFORE_400 else
                           (503, "service_unavailable") if kind in BEFORE_503 else
                           (404, "not_found_error") if kind == "model_not_found" else (500, "server_error"))
    assert (err.status, err.type, err.code, err.message) == (status, openai_type, kind, "why")
    assert err.param == ("model" if kind == "model_not_found" else None)
    assert err.headers == ({"Retry-After": "5"} if status == 503 else {})


def test_a_cancelled_or_unexplained_job_answers_as_before() -> None:
    cancelled = job_error(JobRecord(id="j", kind="inference", model="m", status="cancelled"))
    assert (cancelled.status, cancelled.type, cancelled.code) == (409, "conflict_error", "job_cancelled")
    bare = job_error(JobRecord(id="j", kind="inference", model="m", status="failed"))
    assert (bare.status, bare.type, bare.code, bare.message) == (500, "server_error", "job_failed", "the job failed")


def test_the_worker_errors_are_job_failures_with_code_then_message() -> None:
    for cls in (LoadFailed, StagingError):
        err = cls(ErrorCode.SOURCE_UNREACHABLE, "m")
        assert isinstance(err, JobFailed) and (err.code, err.message, str(err)) == ("source_unreachable", "m", "m")
    unloaded = Unloaded()
    assert isinstance(unloaded, LoadFailed) and unloaded.code is ErrorCode.UNLOADED
    fixed = {BackendError: "backend_error", BackendStartError: "backend_start_failed",
             BackendCallError: "backend_call_failed", BackendCancelled: "cancelled"}
    for backend_cls, code in fixed.items():
        err = backend_cls("m")
        assert isinstance(err, JobFailed) and (err.code, err.message) == (code, "m")


def test_a_backend_calls_grpc_status_maps_to_a_job_code_in_one_place() -> None:
    cases = {grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_PARAMS,
             grpc.StatusCode.UNIMPLEMENTED: ErrorCode.UNSUPPORTED_TASK,
             grpc.StatusCode.INTERNAL: ErrorCode.BACKEND_CALL_FAILED, None: ErrorCode.BACKEND_CALL_FAILED}
    for status, code in cases.items():
        err = BackendCallError("m", status)
        assert err.job_code is code and err.code is ErrorCode.BACKEND_CALL_FAILED
        assert err.grpc_code == (status.name if status is not None else None)
    assert all(code.http_status == 400 for code in GRPC_ERROR_CODES.values())  # the request's fault


def _product_modules() -> list[tuple[str, ast.Module]]:
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto" not in path.parts:
                found.append((path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())))
    return found


def _is_str(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _bare_code(node: ast.AST) -> str | None:
    """What in ``node`` spells an error code as a string instead of an :class:`ErrorCode`."""
    if isinstance(node, ast.keyword) and node.arg == "code" and _is_str(node.value):
        return "code=<str>"
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name == "fail" and len(node.args) >= 2 and _is_str(node.args[1]):
            return "fail(id, <str>, ...)"
        if name in ("LoadFailed", "StagingError", "JobFailed") and node.args and _is_str(node.args[0]):
            return f"{name}(<str>, ...)"
        if name == "getattr" and len(node.args) == 3 and _is_str(node.args[1]) and _is_str(node.args[2]) \
                and node.args[1].value == "code":
            return "getattr(exc, 'code', '<str>')"
    if isinstance(node, ast.Compare):
        sides = [node.left, *node.comparators]
        if any(isinstance(s, ast.Attribute) and s.attr in ("code", "grpc_code") for s in sides) \
                and any(_is_str(s) for s in sides):
            return "a code compared with a string"
    return None


def test_product_code_names_error_codes_only_through_the_registry() -> None:
    """No code is written as a string (``fail(id, "x")``, ``code="x"``, ``exc.code == "x"``),
    and every ``ErrorCode.X`` named exists (a typo would only fail on its path)."""
    problems = []
    for rel, tree in _product_modules():
        for node in ast.walk(tree):
            why = _bare_code(node)
            if why is not None:
                problems.append(f"{rel}:{getattr(node, 'lineno', '?')}: {why}")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorCode" \
                    and node.attr not in ErrorCode.__members__ and not hasattr(ErrorCode, node.attr):
                problems.append(f"{rel}:{node.lineno}: ErrorCode.{node.attr} is not a member")
    assert not problems, "\n".join(problems)
