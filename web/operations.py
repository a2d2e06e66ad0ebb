"""``/api/operations``: live operations (loads, unloads), the same on every replica, and
their server-sent-event stream."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify, stream_with_context

from web.extensions import mb
from web.openapi import STORE, Ok, documented
from web.schemas_http import Operations

bp = Blueprint("operations", __name__, url_prefix="/api/operations")

STREAM_MAX_S = 300.0       # a stream ends after this long; EventSource reconnects by itself
HEARTBEAT_S = 15.0         # a comment line this often keeps proxies from closing the stream
BASELINE_POLL_S = 1.0      # Redis-side changes are looked for this often


@bp.get("")
@documented("operations", "Live operations: loads, unloads, staging",
            Ok(200, Operations, "the operations, oldest first"), errors=STORE)
def list_operations():
    return jsonify({"operations": mb().live.rows()})


@bp.get("/stream")
@documented("operations", "The live operations as server-sent events",
            Ok(200, None, "`snapshot` then `operations` events (`data`: the body of GET /api/operations) and "
                          "heartbeat comments; the stream ends after a few minutes", stream=True), errors=STORE)
def stream():
    live = mb().live

    def events() -> Iterator[str]:
        last = live.rows()
        yield f"event: snapshot\ndata: {json.dumps({'operations': last})}\n\n"
        started = beat = time.monotonic()
        version = live.table.version()
        while time.monotonic() - started < STREAM_MAX_S:
            version = live.table.wait_change(version, BASELINE_POLL_S)
            rows = live.rows()
            if rows != last:
                last = rows
                yield f"event: operations\ndata: {json.dumps({'operations': rows})}\n\n"
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                yield ": heartbeat\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
    return Response(stream_with_context(events()), mimetype="text/event-stream", headers=headers)
