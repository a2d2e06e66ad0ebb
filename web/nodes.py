"""``/v1/nodes`` and the health probes."""
from __future__ import annotations

from flask import Blueprint, jsonify

from tasks.errors import ErrorCode, Unavailable
from web.extensions import mb
from web.openapi import STORE, Ok, documented
from web.schemas_http import Health, NodeList, Ready

bp = Blueprint("nodes", __name__)


@bp.get("/v1/nodes")
@documented("nodes", "List the live worker nodes and their models", Ok(200, NodeList, "the nodes"), errors=STORE)
def list_nodes():
    store = mb().store
    data = []
    for node in store.live_nodes(include_draining=True):
        entry = node.model_dump()
        entry["models"] = [s.model_dump() for s in store.node_models(node.id).values()]
        data.append(entry)
    return jsonify({"object": "list", "data": data})


@bp.get("/healthz")
@documented("health", "Liveness: the web process answers", Ok(200, Health, "alive"), open=True)
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@documented("health", "Readiness: the store answers and a worker node is live", Ok(200, Ready, "ready"),
            errors=(503,), open=True)
def readyz():
    store = mb().store
    if not store.ping():
        raise Unavailable("Redis is unreachable", code=ErrorCode.STORE_UNAVAILABLE)
    nodes = store.live_nodes()
    if not nodes:
        raise Unavailable("no live worker node", code=ErrorCode.NO_NODE)
    return jsonify({"status": "ready", "nodes": len(nodes)})
