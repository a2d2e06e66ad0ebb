"""``/v1/models``: the catalog, per-node model state, load and unload."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from tasks.backends import check_backend, check_device
from tasks.schemas import JobRecord, LoadRequest, Manifest, ModelNode
from tasks.sources import check_manifest
from web.extensions import mb
from web.metrics import count_submitted
from web.openapi import BODY, JOB_HEADERS, STORE, Ok, documented
from web.schemas_http import JobList, ModelDeleted, ModelDetail, ModelList
from web.util import check_model_name, not_found_model, parse_body, pin

bp = Blueprint("models", __name__, url_prefix="/v1/models")

_ORDER = ("ready", "loading", "staging", "unloading", "failed")
MODEL_LINKS = ("GetModel", "LoadModel", "UnloadModel", "DeleteModel")


def model_status(states: list[ModelNode]) -> str:
    """The model's overall status: the most useful state any node has, else ``registered``."""
    present = {s.state for s in states}
    return next((s for s in _ORDER if s in present), "registered")


def model_object(name: str, manifest: Manifest, states: list[ModelNode], full: bool = False,
                 created: int | None = None) -> dict[str, Any]:
    if created is None:
        created = mb().store.created_at([name])[name]
    obj: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "modelbay",
                           "backend": manifest.backend, "status": model_status(states),
                           "nodes": [s.model_dump() for s in states]}
    if full:
        obj["manifest"] = manifest.model_dump()
    return obj


def _manifest(name: str) -> Manifest:
    manifest = mb().store.get_manifest(check_model_name(name))
    if manifest is None:
        raise not_found_model(name)
    return manifest


@bp.get("")
@documented("models", "List the catalog", Ok(200, ModelList, "the models"), errors=STORE)
def list_models():
    store = mb().store
    nodes = store.live_nodes()
    manifests = store.manifests()
    created = store.created_at(list(manifests))
    data = [model_object(n, m, store.model_nodes(n, nodes), created=created[n]) for n, m in manifests.items()]
    return jsonify({"object": "list", "data": data})


@bp.put("/<path:name>")
@documented("models", "Register or replace a model's manifest",
            Ok(200, ModelDetail, "replaced", links=MODEL_LINKS), Ok(201, ModelDetail, "registered", links=MODEL_LINKS),
            errors=(*BODY, 404), body=Manifest,
            example={"backend": "echo", "options": {"dim": 16}, "memory_mb": 1})
def put_model(name: str):
    check_model_name(name)
    manifest = parse_body(Manifest)
    check_backend(manifest.backend, manifest.options)  # a typo in the backend or an option: 400
    check_device(manifest)  # "cuda:1" (the worker assigns GPUs), or device settings that disagree: 400
    check_manifest(name, manifest, mb().settings)  # hostile sources and paths: 400
    created = mb().store.put_manifest(name, manifest)
    body = model_object(name, manifest, mb().store.model_nodes(name), full=True)
    return jsonify(body), 201 if created else 200


@bp.get("/<path:name>")
@documented("models", "Get a model, its manifest and its state on each node", Ok(200, ModelDetail, "the model"),
            errors=(400, 404, 503))
def get_model(name: str):
    manifest = _manifest(name)
    return jsonify(model_object(name, manifest, mb().store.model_nodes(name), full=True))


@bp.delete("/<path:name>")
@documented("models", "Remove a model from the catalog, unloading it everywhere", Ok(200, ModelDeleted, "deleted"),
            errors=(400, 404, 503))
def delete_model(name: str):
    _manifest(name)
    jobs = mb().dispatcher.unload(name)
    mb().store.delete_manifest(name)
    return jsonify({"id": name, "object": "model", "deleted": True,
                    "unload_jobs": [j.public() for j in jobs]})


@bp.post("/<path:name>/load")
@documented("models", "Load a model (single-flight per model and node)", Ok(200, ModelDetail, "already ready"),
            Ok(202, JobRecord, "the load job", headers=JOB_HEADERS, links=("GetJob",)),
            errors=(*BODY, 404, 409), body=LoadRequest, body_required=False, pin=True)
def load_model(name: str):
    manifest = _manifest(name)
    node = pin(parse_body(LoadRequest, optional=True).node)
    job, created = mb().dispatcher.ensure_load(name, manifest, node)
    if created:
        count_submitted("load", None)
    if job is None:
        return jsonify(model_object(name, manifest, mb().store.model_nodes(name), full=True)), 200
    return jsonify(job.public()), 202, {"Location": f"/v1/jobs/{job.id}", "X-Modelbay-Node": job.node}


@bp.post("/<path:name>/unload")
@documented("models", "Unload a model from every node that holds it (or the pinned one)",
            Ok(200, JobList, "held nowhere: no job"), Ok(202, JobList, "one unload job per node"),
            errors=(*BODY, 404), body=LoadRequest, body_required=False, pin=True)
def unload_model(name: str):
    _manifest(name)
    node = pin(parse_body(LoadRequest, optional=True).node)
    jobs = mb().dispatcher.unload(name, node)
    return jsonify({"object": "list", "data": [j.public() for j in jobs]}), 202 if jobs else 200
