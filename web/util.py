"""Request parsing shared by the blueprints."""
from __future__ import annotations

import re
from typing import TypeVar

from flask import request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from tasks.errors import ErrorCode, InvalidRequest, NotFound, Unprocessable, UnsupportedMediaType
from tasks.backends import check_task
from tasks.catalog import CatalogCache, model_not_found
from tasks.names import invalid_model_name
from tasks.schemas import LoadRequest, Manifest

M = TypeVar("M", bound=BaseModel)
_UNION_TAG = re.compile(r"str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\]")


def parse_body(model: type[M], *, optional: bool = False) -> M:
    """Validate the JSON body against ``model``: 415 not JSON, 400 malformed, 422 not fitting."""
    raw = request.get_data(cache=True)
    if _cut_at_the_limit(raw):
        raise RequestEntityTooLarge()  # answered 413 by web.errors, once the rest is read
    if optional and not raw.strip():
        return model()
    if not request.is_json:
        raise UnsupportedMediaType("send the body as application/json")
    data = request.get_json(silent=True)
    if data is None:
        raise InvalidRequest("the body is not valid JSON")
    if not isinstance(data, dict):
        raise Unprocessable("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = describe(exc)
        raise Unprocessable(message, param=param) from None


def _cut_at_the_limit(raw: bytes) -> bool:
    """True when a body without ``Content-Length`` (chunked) went past ``MAX_CONTENT_LENGTH``:
    werkzeug stops reading it at the limit without an error, so one more byte is asked of
    the server's input (only where the server ends it: ``wsgi.input_terminated``)."""
    limit = request.max_content_length
    if request.content_length is not None or limit is None or len(raw) < limit:
        return False
    stream = request.environ.get("wsgi.input")
    return bool(request.environ.get("wsgi.input_terminated") and stream is not None and stream.read(1))


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """A message and the ``param`` (dotted field path) of the first validation error. With
    a union the most specific branch's error is taken, and the members' type names that
    pydantic puts in the location ("input", "str") are left out."""
    errors = exc.errors()
    first = errors[0]
    if any(_UNION_TAG.fullmatch(str(p)) for p in first["loc"]):
        first = max(errors, key=lambda e: len(e["loc"]))
    param = ".".join(str(p) for p in first["loc"] if not _UNION_TAG.fullmatch(str(p))) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def check_model_name(name: str) -> str:
    problem = invalid_model_name(name)
    if problem:
        raise InvalidRequest(f"invalid model name {name!r}: {problem}", param="name",
                             code=ErrorCode.INVALID_MODEL_NAME)
    return name


def pin(body_node: str | None = None) -> str | None:
    """The node pin: the ``X-Modelbay-Node`` header, else the body's ``node`` field."""
    header = request.headers.get("X-Modelbay-Node", "").strip()
    if header:
        try:
            return LoadRequest(node=header).node
        except ValidationError:
            raise InvalidRequest("X-Modelbay-Node is not a valid node id", param="X-Modelbay-Node") from None
    return body_node


def not_found_model(name: str) -> NotFound:
    return model_not_found(name)


def job_manifest(catalog: CatalogCache, model: str, task: str, param: str = "task") -> Manifest:
    """The manifest a job of ``task`` on ``model`` is decided on: this process's kept copy
    (:mod:`tasks.catalog`; the ready path checks it against the stored one). A refusal, 404
    ``model_not_found`` or 400 ``unsupported_task`` (named ``param``), comes from a fresh read."""
    name = check_model_name(model)
    manifest = catalog.kept(name)  # no copy: one fresh read below, never two
    if manifest is not None:
        try:
            check_task(manifest.backend, task, model=model, param=param)
            return manifest
        except InvalidRequest:
            pass  # refused on the kept copy: the answer comes from a fresh read
    manifest = catalog.fresh(name)
    if manifest is None:
        raise not_found_model(model)
    check_task(manifest.backend, task, model=model, param=param)
    return manifest
