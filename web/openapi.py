"""``GET /openapi.json``: the OpenAPI 3.1 document of the API, generated, never written by hand.

Paths and methods come from the app's URL map, schemas from the pydantic models (requests:
:mod:`tasks.schemas`, :mod:`web.openai.protocol`; responses: :mod:`web.schemas_http`), limits
from the settings. What the code does not say by itself (each route's summary, body, query
parameters and the status codes it answers) is declared next to each view with
:func:`documented`, which keeps it on the view function. A route whose view is not documented
stops the app at start (:func:`check_documented`, called by ``create_app``) and the document's
build (:class:`Undocumented`). The document is built once per app, on its first request;
``tests/test_openapi.py`` checks it against the URL map and fuzzes the live server against it
(schemathesis).

Like every route but the health probes, the document needs the API key when keys are set.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from werkzeug.routing import Rule

from tasks.names import MODEL_NAME_RE
from tasks.settings import Settings
from web.schemas_http import ErrorResponse, OpenAPIDocument, UnavailableResponse

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
SKIP_METHODS = frozenset({"HEAD", "OPTIONS"})
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
NODE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ATTRIBUTE = "__openapi__"  # where documented() keeps a view's Op
TAGS = ("models", "jobs", "nodes", "health", "ui", "operations", "openai", "meta")  # in the document's order

ERRORS: dict[int, str] = {
    400: "invalid request: malformed JSON, an invalid name or parameter, a refused source, a request "
         "over a limit (`limit_exceeded`), a manifest naming an unknown backend (`unknown_backend`) or an "
         "option its backend does not read (`unknown_option`), a task the model's backend does not do "
         "(`unsupported_task`); on the OpenAI-compatible routes also a body that does not fit",
    401: "no valid API key (`Authorization: Bearer <key>`; only when MODELBAY_API_KEYS is set)",
    404: "no such model, job or node; also `no such route` for a path parameter no route matches",
    409: "a conflict: the job already ended, a load is not cancellable, the pinned node cannot run the "
         "backend, the job was cancelled",
    413: "the body is larger than MODELBAY_MAX_BODY_MB",
    415: "the body is not application/json",
    422: "the JSON body does not fit the schema (`validation_error`, `param` names the field); an "
         "Idempotency-Key sent before with another request (`idempotency_key_reused`)",
    429: "the model's queue is full (`queue_full`: MODELBAY_MAX_QUEUED_PER_MODEL or the manifest's "
         "`max_queued` interactive jobs wait); nothing was queued; see `Retry-After`",
    503: "the job store is unreachable, no live node can run the backend, a load is cooling down or "
         "still loading (`loading` tells its progress); see `Retry-After`",
}

RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "the job's URL, /v1/jobs/{id}", "schema": {"type": "string"}},
    "X-Modelbay-Node": {"description": "the node the job runs on", "schema": {"type": "string"}},
    "X-Modelbay-Job": {"description": "the id of the inference job of this call", "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true`: the answer of an earlier request with this "
                            "Idempotency-Key (the same job, batch or file)", "schema": {"type": "string"}},
    "Preference-Applied": {"description": "`respond-async`: the job was queued and not waited for (Prefer)",
                           "schema": {"type": "string"}},
}

# Request headers a route may honour (documented(idempotent=..., prefer_async=...)).
REQUEST_HEADERS: dict[str, dict[str, Any]] = {
    "Idempotency-Key": {"description": "the same key with the same request (within MODELBAY_IDEMPOTENCY_TTL_S) "
                        "answers what the first one created, with `Idempotent-Replayed: true`; with another "
                        "request, 422 `idempotency_key_reused`. Scoped per API key", "schema": {"type": "string",
                                                                                                "maxLength": 255}},
    "Prefer": {"description": "`respond-async` (RFC 7240): answer 202 with the queued job, as POST /v1/jobs "
               "does, instead of waiting for it", "schema": {"type": "string"}},
}

LINKS: dict[str, dict[str, Any]] = {
    "GetJob": {"operationId": "jobs_get", "parameters": {"job_id": "$response.body#/id"},
               "description": "poll the job"},
    "CancelJob": {"operationId": "jobs_cancel", "parameters": {"job_id": "$response.body#/id"},
                  "description": "cancel the job"},
    **{f"{verb}Model": {"operationId": f"models_{verb.lower()}_model", "parameters": {"name": "$request.path.name"},
                        "description": f"{verb.lower()} this model"} for verb in ("Get", "Load", "Unload", "Delete")},
}

PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "name": {"description": "the model name; it may contain `/` (send it as is or as %2F)",
             "schema": {"type": "string", "pattern": f"^{MODEL_NAME_RE.pattern}$"}, "example": "my-org/echo-2"},
    "job_id": {"description": "the job id", "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
               "example": "0" * 32},
}

# Shared by several views' declarations.
STORE = (503,)                      # every route that reads the job store
BODY = (400, 413, 415, 422, 503)    # modelbay's own routes that parse a JSON body
JOB_HEADERS = ("Location", "X-Modelbay-Node")
EXAMPLE_MODEL = "echo"  # the demo catalog's echo model (`modelbay up`), which the examples use

# A query parameter's OpenAPI fields (``schema``, ``description``), or a function of the
# settings giving them (a bound that is a setting).
QueryParam = Mapping[str, Any] | Callable[[Settings], Mapping[str, Any]]
View = TypeVar("View", bound=Callable[..., object])


@dataclass(frozen=True)
class Ok:
    """A success answer: its status, body model and whether it may be a server-sent-event stream."""

    status: int
    model: type[BaseModel] | None
    description: str
    stream: bool = False
    headers: tuple[str, ...] = ()
    links: tuple[str, ...] = ()  # names in LINKS
    media: str | None = None     # a body that is not JSON (its media type; the schema is a string)


@dataclass(frozen=True)
class Op:
    """What the URL map does not tell about one route."""

    tag: str
    summary: str
    ok: tuple[Ok, ...]
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True
    example: dict[str, Any] | None = None
    query: Mapping[str, QueryParam] = field(default_factory=dict)
    pin: bool = False          # honours the X-Modelbay-Node header
    open: bool = False         # needs no API key
    idempotent: bool = False   # honours Idempotency-Key
    prefer_async: bool = False  # honours Prefer: respond-async


class Undocumented(RuntimeError):
    """Routes of the URL map whose view :func:`documented` does not describe."""


def documented(tag: str, summary: str, *ok: Ok, errors: Iterable[int] = (), body: type[BaseModel] | None = None,
               body_required: bool = True, example: dict[str, Any] | None = None,
               query: Mapping[str, QueryParam] | None = None, pin: bool = False,
               open: bool = False, idempotent: bool = False, prefer_async: bool = False) -> Callable[[View], View]:
    """Declare a view's OpenAPI operation: its ``tag`` (one of :data:`TAGS`), ``summary``, success
    answers ``ok`` and the error statuses it answers (401 is added unless the route is ``open``,
    needing no key). A name that is not in this module's vocabulary fails here, at import."""
    codes = set(errors) if open else {*errors, 401}
    op = Op(tag, summary, ok, tuple(sorted(codes)), body, body_required, example, dict(query or {}), pin, open,
            idempotent, prefer_async)
    _check(op)

    def mark(view: View) -> View:
        setattr(view, ATTRIBUTE, op)
        return view

    return mark


def _check(op: Op) -> None:
    wrong = [f"tag {op.tag!r}"] if op.tag not in TAGS else []
    wrong += [f"error status {s}" for s in op.errors if s not in ERRORS]
    wrong += [f"success status {ok.status}" for ok in op.ok if not 200 <= ok.status < 400]
    wrong += [f"header {h!r}" for ok in op.ok for h in ok.headers if h not in RESPONSE_HEADERS]
    wrong += [f"link {name!r}" for ok in op.ok for name in ok.links if name not in LINKS]
    if not op.ok:
        wrong.append("no success answer")
    if wrong:
        raise ValueError(f"@documented({op.summary!r}): {', '.join(wrong)}")


def operation(app: Flask, rule: Rule) -> Op | None:
    """The :func:`documented` declaration of ``rule``'s view, if any."""
    op = getattr(app.view_functions.get(rule.endpoint), ATTRIBUTE, None)
    return op if isinstance(op, Op) else None


def check_documented(app: Flask) -> None:
    """Raise :class:`Undocumented` naming every rule of ``app`` whose view is not documented."""
    missing = sorted(f"{rule.rule} ({rule.endpoint})" for rule in app.url_map.iter_rules()
                     if operation(app, rule) is None)
    if missing:
        raise Undocumented(f"routes without @documented (web/openapi.py): {', '.join(missing)}")


def openapi_path(rule: str) -> tuple[str, list[str]]:
    """Flask's ``/v1/models/<path:name>/load`` as ``/v1/models/{name}/load``, with the names."""
    out, names, rest = [], [], rule
    while "<" in rest:
        before, _, tail = rest.partition("<")
        spec, _, rest = tail.partition(">")
        name = spec.rpartition(":")[2]
        out.append(f"{before}{{{name}}}")
        names.append(name)
    return "".join(out) + rest, names


def _schemas(ops: Iterable[Op]) -> tuple[dict[tuple[type[BaseModel], JsonSchemaMode], Any], dict[str, Any]]:
    pairs: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
    for op in ops:
        if op.body is not None:
            pairs[(op.body, "validation")] = None
        for ok in op.ok:
            if ok.model is not None:
                pairs[(ok.model, "serialization")] = None
    pairs[(ErrorResponse, "serialization")] = None
    pairs[(UnavailableResponse, "serialization")] = None
    refs, defs = models_json_schema(list(pairs), ref_template=REF)
    return refs, defs.get("$defs", {})


def _json(schema: Any, example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _parameters(op: Op, params: list[str], settings: Settings) -> list[dict[str, Any]]:
    parameters = [{"name": p, "in": "path", "required": True, **PATH_PARAMETERS[p]} for p in params]
    for name, spec in op.query.items():
        fields = spec(settings) if callable(spec) else spec
        parameters.append({"name": name, "in": "query", "required": False, **fields})
    if op.pin:
        parameters.append({"name": "X-Modelbay-Node", "in": "header", "required": False,
                           "description": "run on this node (a pin); the body's `node` is the other way",
                           "schema": {"type": "string", "pattern": NODE_PATTERN}})
    for name, on in (("Idempotency-Key", op.idempotent), ("Prefer", op.prefer_async)):
        if on:
            parameters.append({"name": name, "in": "header", "required": False, **REQUEST_HEADERS[name]})
    return parameters


def _responses(op: Op, refs: dict[Any, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for ok in op.ok:
        content: dict[str, Any] = _json(refs[(ok.model, "serialization")]) if ok.model is not None else {}
        if ok.stream:
            content["text/event-stream"] = {}
        if ok.media is not None:
            content[ok.media] = {"schema": {"type": "string"}}
        entry: dict[str, Any] = {"description": ok.description, "content": content}
        if ok.headers:
            entry["headers"] = {h: RESPONSE_HEADERS[h] for h in ok.headers}
        if ok.links:
            entry["links"] = {name: LINKS[name] for name in ok.links}
        responses[str(ok.status)] = entry
    for status in op.errors:
        model = UnavailableResponse if status == 503 else ErrorResponse
        entry = {"description": ERRORS[status], "content": _json(refs[(model, "serialization")])}
        header = {401: "WWW-Authenticate", 429: "Retry-After", 503: "Retry-After"}.get(status)
        if header:
            entry["headers"] = {header: RESPONSE_HEADERS[header]}
        responses[str(status)] = entry
    return responses


def _operation(endpoint: str, op: Op, params: list[str], refs: dict[Any, Any], settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"tags": [op.tag], "summary": op.summary, "operationId": endpoint.replace(".", "_")}
    parameters = _parameters(op, params, settings)
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required,
                              "content": _json(refs[(op.body, "validation")], op.example)}
        if not op.body_required:
            out["requestBody"]["description"] = "optional: an empty body is the same as {}"
    out["responses"] = _responses(op, refs)
    if op.open:
        out["security"] = []
    return out


def build_document(app: Flask, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of ``app``: every rule of its URL map, each method; a rule whose
    view is not :func:`documented` raises :class:`Undocumented`."""
    check_documented(app)
    rules = [(rule, op) for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule)
             if (op := operation(app, rule)) is not None]
    refs, schemas = _schemas(op for _, op in rules)
    paths: dict[str, dict[str, Any]] = {}
    for rule, op in rules:
        path, params = openapi_path(rule.rule)
        for method in sorted((rule.methods or set()) - SKIP_METHODS):
            paths.setdefault(path, {})[method.lower()] = _operation(rule.endpoint, op, params, refs, settings)
    try:
        version = metadata.version("modelbay")
    except metadata.PackageNotFoundError:
        version = "0"
    used = {op.tag for _, op in rules}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "modelbay", "version": version,
                 "description": "A job-queue model server. Errors: one envelope, "
                                "`{\"error\": {type, code, message, param}}`. Every route but /healthz and "
                                "/readyz needs `Authorization: Bearer <key>` when MODELBAY_API_KEYS is set."},
        "tags": [{"name": t} for t in TAGS if t in used],
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a key of MODELBAY_API_KEYS"}}},
        "security": [{"bearer": []}],
    }


_lock = threading.Lock()


def get_document(app: Flask) -> dict[str, Any]:
    """``app``'s document, built on first use and kept (the URL map is complete by then)."""
    with _lock:
        doc = app.extensions.get("openapi")
        if doc is None:
            doc = app.extensions["openapi"] = build_document(app, app.extensions["modelbay"].settings)
        return doc


@bp.get("/openapi.json")
@documented("meta", "This OpenAPI document", Ok(200, OpenAPIDocument, "the document"))
def document():
    return jsonify(get_document(current_app._get_current_object()))  # type: ignore[attr-defined]
