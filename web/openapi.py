"""``GET /openapi.json``: the OpenAPI 3.1 document of the API, generated, never written by hand.

Paths and methods come from the app's URL map, schemas from the pydantic models (requests:
:mod:`tasks.schemas`, :mod:`web.openai.protocol`; responses: :mod:`web.schemas_http`), limits
from the settings. :data:`OPERATIONS` adds what the code does not say by itself: each route's
summary, query parameters and the status codes it answers. The document is built once per
app, on its first request, so every blueprint is registered by then; ``tests/test_openapi.py``
checks that every route is in it and fuzzes the live server against it (schemathesis).

Like every route but the health probes, the document needs the API key when keys are set.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from tasks.names import MODEL_NAME_RE
from tasks.schemas import ACTIVE, TERMINAL, JobRecord, JobRequest, LoadRequest, Manifest
from tasks.settings import Settings
from web.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest, ImageRequest
from web.schemas_http import (ChatCompletion, Completion, EmbeddingList, ErrorResponse, Health, Images, JobList,
                              ModelDeleted, ModelDetail, ModelList, NodeList, OpenAPIDocument, Operations, Ready,
                              UnavailableResponse)

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
SKIP_METHODS = frozenset({"HEAD", "OPTIONS"})
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
NODE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

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
    422: "the JSON body does not fit the schema (`validation_error`, `param` names the field)",
    503: "the job store is unreachable, no live node can run the backend, a load is cooling down or "
         "still loading (`loading` tells its progress); see `Retry-After`",
}


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
    query: tuple[str, ...] = ()
    pin: bool = False          # honours the X-Modelbay-Node header
    open: bool = False         # needs no API key


STORE = (401, 503)                       # every route that reads the job store
BODY = (400, 401, 413, 415, 422, 503)    # modelbay's own routes that parse a JSON body
OPENAI = (400, 401, 404, 409, 413, 415, 503)
JOB_HEADERS = ("Location", "X-Modelbay-Node")
JOB_LINKS = ("GetJob", "CancelJob")
MODEL_LINKS = ("GetModel", "LoadModel", "UnloadModel", "DeleteModel")
CALL_HEADERS = ("X-Modelbay-Job", "X-Modelbay-Node")
ECHO = "echo"  # the demo catalog's echo model (`modelbay up`)

OPERATIONS: dict[str, Op] = {
    "models.list_models": Op("models", "List the catalog", (Ok(200, ModelList, "the models"),), STORE),
    "models.put_model": Op(
        "models", "Register or replace a model's manifest",
        (Ok(200, ModelDetail, "replaced", links=MODEL_LINKS), Ok(201, ModelDetail, "registered", links=MODEL_LINKS)),
        (*BODY, 404), body=Manifest,
        example={"backend": "echo", "options": {"dim": 16}, "memory_mb": 1}),
    "models.get_model": Op("models", "Get a model, its manifest and its state on each node",
                           (Ok(200, ModelDetail, "the model"),), (400, 401, 404, 503)),
    "models.delete_model": Op("models", "Remove a model from the catalog, unloading it everywhere",
                              (Ok(200, ModelDeleted, "deleted"),), (400, 401, 404, 503)),
    "models.load_model": Op(
        "models", "Load a model (single-flight per model and node)",
        (Ok(200, ModelDetail, "already ready"),
         Ok(202, JobRecord, "the load job", headers=JOB_HEADERS, links=("GetJob",))),
        (*BODY, 404, 409), body=LoadRequest, body_required=False, pin=True),
    "models.unload_model": Op(
        "models", "Unload a model from every node that holds it (or the pinned one)",
        (Ok(200, JobList, "held nowhere: no job"), Ok(202, JobList, "one unload job per node")),
        (*BODY, 404), body=LoadRequest, body_required=False, pin=True),
    "jobs.submit": Op(
        "jobs", "Submit an inference job", (Ok(202, JobRecord, "queued", headers=JOB_HEADERS, links=JOB_LINKS),),
        (*BODY, 404, 409), body=JobRequest, pin=True,
        example={"model": ECHO, "task": "generate", "input": "hello there", "params": {"max_tokens": 8}}),
    "jobs.list_jobs": Op("jobs", "List recent jobs, newest first", (Ok(200, JobList, "the jobs"),),
                         (400, *STORE), query=("status", "model", "limit")),
    "jobs.get": Op("jobs", "Get a job; with `wait` long-poll until it ends",
                   (Ok(200, JobRecord, "the job", headers=("X-Modelbay-Node",)),), (400, 401, 404, 503),
                   query=("wait",)),
    "jobs.cancel": Op("jobs", "Cancel an inference job", (Ok(202, JobRecord, "cancelled"),), (401, 404, 409, 503)),
    "nodes.list_nodes": Op("nodes", "List the live worker nodes and their models",
                           (Ok(200, NodeList, "the nodes"),), STORE),
    "nodes.healthz": Op("health", "Liveness: the web process answers", (Ok(200, Health, "alive"),), open=True),
    "nodes.readyz": Op("health", "Readiness: the store answers and a worker node is live",
                       (Ok(200, Ready, "ready"),), (503,), open=True),
    "ui.index": Op("ui", "The operations page (HTML; its data calls need the key)",
                   (Ok(200, None, "the page", media="text/html"),), open=True),
    "ui.asset": Op("ui", "A file of the operations page (JS, CSS)",
                   (Ok(200, None, "the file", media="*/*"),), (404,), open=True),
    "metrics.metrics": Op("operations", "Prometheus metrics of the web side (MODELBAY_METRICS_OPEN opens it)",
                          (Ok(200, None, "the text exposition format", media="text/plain"),), STORE),
    "operations.list_operations": Op("operations", "Live operations: loads, unloads, staging",
                                     (Ok(200, Operations, "the operations, oldest first"),), STORE),
    "operations.stream": Op(
        "operations", "The live operations as server-sent events",
        (Ok(200, None, "`snapshot` then `operations` events (`data`: the body of GET /api/operations) and "
                       "heartbeat comments; the stream ends after a few minutes", stream=True),), STORE),
    "openai.embeddings": Op("openai", "Embeddings (OpenAI-compatible)",
                            (Ok(200, EmbeddingList, "the vectors", headers=CALL_HEADERS),), OPENAI,
                            body=EmbeddingsRequest, pin=True, example={"model": ECHO, "input": ["hello", "world"]}),
    "openai.completions": Op(
        "openai", "Text completion (OpenAI-compatible)",
        (Ok(200, Completion, "the completion; with `stream` server-sent chunks ending with `data: [DONE]`",
            stream=True, headers=CALL_HEADERS),), OPENAI, body=CompletionRequest, pin=True,
        example={"model": ECHO, "prompt": "one two three", "max_tokens": 2}),
    "openai.chat_completions": Op(
        "openai", "Chat completion (OpenAI-compatible)",
        (Ok(200, ChatCompletion, "the completion; with `stream` server-sent chunks ending with `data: [DONE]`",
            stream=True, headers=CALL_HEADERS),), OPENAI, body=ChatCompletionRequest, pin=True,
        example={"model": ECHO, "messages": [{"role": "user", "content": "hello there"}]}),
    "openai.images": Op("openai", "Image generation (OpenAI-compatible, `b64_json`)",
                        (Ok(200, Images, "the image", headers=CALL_HEADERS),), OPENAI, body=ImageRequest, pin=True,
                        example={"model": "tiny-sd", "prompt": "a lighthouse at dusk", "size": "256x256"}),
    "openapi.document": Op("meta", "This OpenAPI document", (Ok(200, OpenAPIDocument, "the document"),), (401,)),
}

RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "the job's URL, /v1/jobs/{id}", "schema": {"type": "string"}},
    "X-Modelbay-Node": {"description": "the node the job runs on", "schema": {"type": "string"}},
    "X-Modelbay-Job": {"description": "the id of the inference job of this call", "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}},
}


LINKS: dict[str, dict[str, Any]] = {
    "GetJob": {"operationId": "jobs_get", "parameters": {"job_id": "$response.body#/id"},
               "description": "poll the job"},
    "CancelJob": {"operationId": "jobs_cancel", "parameters": {"job_id": "$response.body#/id"},
                  "description": "cancel the job"},
    **{f"{verb}Model": {"operationId": f"models_{verb.lower()}_model", "parameters": {"name": "$request.path.name"},
                        "description": f"{verb.lower()} this model"} for verb in ("Get", "Load", "Unload", "Delete")},
}


def query_parameters(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        "status": {"schema": {"type": "string", "enum": sorted(ACTIVE | TERMINAL)},
                   "description": "only jobs with this status"},
        "model": {"schema": {"type": "string"}, "description": "only jobs of this model"},
        "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                  "description": "at most this many jobs"},
        "wait": {"schema": {"type": "number", "minimum": 0, "maximum": settings.max_wait_s},
                 "description": "long-poll: wait up to this many seconds for the job to end"},
    }


PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "name": {"description": "the model name; it may contain `/` (send it as is or as %2F)",
             "schema": {"type": "string", "pattern": f"^{MODEL_NAME_RE.pattern}$"}, "example": "my-org/echo-2"},
    "job_id": {"description": "the job id", "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
               "example": "0" * 32},
}


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


def _schemas() -> tuple[dict[tuple[type[BaseModel], JsonSchemaMode], Any], dict[str, Any]]:
    pairs: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
    for op in OPERATIONS.values():
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


def _operation(endpoint: str, op: Op, params: list[str], refs: dict[Any, Any],
               query: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tags": [op.tag], "summary": op.summary, "operationId": endpoint.replace(".", "_")}
    parameters = [{"name": p, "in": "path", "required": True, **PATH_PARAMETERS[p]} for p in params]
    parameters += [{"name": q, "in": "query", "required": False, **query[q]} for q in op.query]
    if op.pin:
        parameters.append({"name": "X-Modelbay-Node", "in": "header", "required": False,
                           "description": "run on this node (a pin); the body's `node` is the other way",
                           "schema": {"type": "string", "pattern": NODE_PATTERN}})
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required,
                              "content": _json(refs[(op.body, "validation")], op.example)}
        if not op.body_required:
            out["requestBody"]["description"] = "optional: an empty body is the same as {}"
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
    for status in sorted(set(op.errors)):
        model = UnavailableResponse if status == 503 else ErrorResponse
        entry = {"description": ERRORS[status], "content": _json(refs[(model, "serialization")])}
        header = {401: "WWW-Authenticate", 503: "Retry-After"}.get(status)
        if header:
            entry["headers"] = {header: RESPONSE_HEADERS[header]}
        responses[str(status)] = entry
    out["responses"] = responses
    if op.open:
        out["security"] = []
    return out


def build_document(app: Flask, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of ``app``: every documented rule of its URL map, each method."""
    refs, schemas = _schemas()
    query = query_parameters(settings)
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        op = OPERATIONS.get(rule.endpoint)
        if op is None:
            continue  # not documented: the coverage test in tests/test_openapi.py fails
        path, params = openapi_path(rule.rule)
        for method in sorted((rule.methods or set()) - SKIP_METHODS):
            paths.setdefault(path, {})[method.lower()] = _operation(rule.endpoint, op, params, refs, query)
    try:
        version = metadata.version("modelbay")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "modelbay", "version": version,
                 "description": "A job-queue model server. Errors: one envelope, "
                                "`{\"error\": {type, code, message, param}}`. Every route but /healthz and "
                                "/readyz needs `Authorization: Bearer <key>` when MODELBAY_API_KEYS is set."},
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in OPERATIONS.values())],
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
def document():
    return jsonify(get_document(current_app._get_current_object()))  # type: ignore[attr-defined]
