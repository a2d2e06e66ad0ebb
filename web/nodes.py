"""``/v1/nodes`` and the health probes."""
from __future__ import annotations

from flask import Blueprint, jsonify

from tasks.errors import Unavailable
from web.extensions import mb

bp = Blueprint("nodes", __name__)


@bp.get("/v1/nodes")
def list_nodes():
    store = mb().store
    data = []
    for node in store.live_nodes(include_draining=True):
        entry = node.model_dump()
        entry["models"] = [s.model_dump() for s in store.node_models(node.id).values()]
        data.append(entry)
    return jsonify({"object": "list", "data": data})


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    store = mb().store
    if not store.ping():
        raise Unavailable("Redis is unreachable", code="store_unavailable")
    nodes = store.live_nodes()
    if not nodes:
        raise Unavailable("no live worker node", code="no_node")
    return jsonify({"status": "ready", "nodes": len(nodes)})
