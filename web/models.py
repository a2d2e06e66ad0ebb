"""``/v1/models``: the catalog, per-node model state, load and unload."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from tasks.backends import check_backend
from tasks.schemas import LoadRequest, Manifest, ModelNode
from tasks.sources import check_manifest
from web.extensions import mb
from web.metrics import count_submitted
from web.util import check_model_name, not_found_model, parse_body, pin

bp = Blueprint("models", __name__, url_prefix="/v1/models")

_ORDER = ("ready", "loading", "staging", "unloading", "failed")


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
def list_models():
    store = mb().store
    nodes = store.live_nodes()
    manifests = store.manifests()
    created = store.created_at(list(manifests))
    data = [model_object(n, m, store.model_nodes(n, nodes), created=created[n]) for n, m in manifests.items()]
    return jsonify({"object": "list", "data": data})


@bp.put("/<path:name>")
def put_model(name: str):
    check_model_name(name)
    manifest = parse_body(Manifest)
    check_backend(manifest.backend, manifest.options)  # a typo in the backend or an option: 400
    check_manifest(name, manifest, mb().settings)  # hostile sources and paths: 400
    created = mb().store.put_manifest(name, manifest)
    body = model_object(name, manifest, mb().store.model_nodes(name), full=True)
    return jsonify(body), 201 if created else 200


@bp.get("/<path:name>")
def get_model(name: str):
    manifest = _manifest(name)
    return jsonify(model_object(name, manifest, mb().store.model_nodes(name), full=True))


@bp.delete("/<path:name>")
def delete_model(name: str):
    _manifest(name)
    jobs = mb().dispatcher.unload(name)
    mb().store.delete_manifest(name)
    return jsonify({"id": name, "object": "model", "deleted": True,
                    "unload_jobs": [j.public() for j in jobs]})


@bp.post("/<path:name>/load")
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
def unload_model(name: str):
    _manifest(name)
    node = pin(parse_body(LoadRequest, optional=True).node)
    jobs = mb().dispatcher.unload(name, node)
    return jsonify({"object": "list", "data": [j.public() for j in jobs]}), 202 if jobs else 200
