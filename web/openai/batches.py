"""OpenAI's ``/v1/batches``: create, retrieve, list, cancel (the runner is in workers/jobs/batch.py).

Creating a batch checks what can be checked at once: the input file exists (404) and is a
``purpose="batch"`` upload, and it has at most ``MODELBAY_BATCH_MAX_LINES`` lines (400; counted
on the stored bytes as they stream by, never holding the file). The lines themselves are
validated by a worker (the batch is ``validating`` until then; a bad line fails it, with
``errors.data``). The counts of a running batch are read from its chunks' done marks, so they
are exact and the same on every replica.
"""
from __future__ import annotations

import random
import re
import threading
import time

from flask import Blueprint, current_app, jsonify, request
from pydantic import BaseModel

from tasks.batches import FINAL, Batch, BatchRecord, RequestCounts, new_batch_id, tally
from tasks.errors import Conflict, ErrorCode, InvalidRequest, NotFound
from tasks.files import content_key
from tasks.filestore import FileStore, open_filestore
from tasks.names import TASK_BATCH_ADVANCE, node_queue
from tasks.webhooks import check_callback_url, pending
from web.extensions import mb
from web.idempotent import REPLAYED, once
from web.openai.protocol import BatchCreateRequest, parse
from web.openapi import PATH_PARAMETERS, Ok, documented

bp = Blueprint("batches", __name__, url_prefix="/v1")

_BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
LIMIT_MAX, LIMIT_DEFAULT = 100, 20
EXTENSION = "modelbay.batches.files"
_lock = threading.Lock()

PATH_PARAMETERS.setdefault("batch_id", {"description": "the batch's id", "schema": {"type": "string"},
                                        "example": "batch_" + "0" * 32})


class BatchList(BaseModel):
    object: str = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


@bp.post("/batches")
@documented("openai", "Create a batch (OpenAI-compatible)", Ok(200, Batch, "the batch, `validating`", headers=("Idempotent-Replayed",)),
            errors=(400, 404, 409, 413, 415, 422, 503), idempotent=True, body=BatchCreateRequest,
            example={"input_file_id": "file-" + "0" * 32, "endpoint": "/v1/embeddings", "completion_window": "24h"})
def create():
    req = parse(BatchCreateRequest)
    settings = mb().settings
    file = mb().store.files.get(req.input_file_id)
    if file is None:
        raise NotFound(f"file {req.input_file_id!r} does not exist", param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequest(f"file {req.input_file_id!r} has purpose {file.purpose!r}; a batch's input needs "
                             "purpose 'batch'", param="input_file_id")
    lines = _count_lines(content_key(file.id))
    if lines > settings.batch_max_lines:
        raise InvalidRequest(f"the input file has {lines} lines; a batch takes at most {settings.batch_max_lines} "
                             "(MODELBAY_BATCH_MAX_LINES)", param="input_file_id", code=ErrorCode.LIMIT_EXCEEDED)
    callback_url = _callback_url()
    now = time.time()
    window_s = settings.batch_completion_window_s
    record = BatchRecord(id=new_batch_id(), endpoint=req.endpoint, input_file_id=file.id,
                         completion_window=req.completion_window, created_at=int(now),
                         expires_at=int(now + window_s), expires_at_s=now + window_s, metadata=req.metadata,
                         request_counts=RequestCounts(total=lines),
                         callback_url=callback_url, webhook=pending(callback_url, settings))
    record, replayed = once(lambda: _start(record), mb().store.batches.get, lambda r: r.id)  # Idempotency-Key
    return jsonify(record.public()), 200, REPLAYED if replayed else {}


def _callback_url() -> str | None:
    """The body's ``callback_url`` (the SDK's ``extra_body``), checked (tasks/webhooks.py)."""
    value = (request.get_json(silent=True) or {}).get("callback_url")
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 2048):
        raise InvalidRequest("callback_url must be a URL of at most 2048 characters", param="callback_url",
                             code=ErrorCode.INVALID_CALLBACK_URL)
    check_callback_url(value, mb().settings)
    return value


@bp.get("/batches/<batch_id>")
@documented("openai", "Retrieve a batch (OpenAI-compatible)", Ok(200, Batch, "the batch"), errors=(404, 503))
def retrieve(batch_id: str):
    return jsonify(_public(_get(batch_id))), 200


@bp.get("/batches")
@documented("openai", "List batches, newest first (OpenAI-compatible)", Ok(200, BatchList, "the batches"),
            errors=(400, 503), query={
                "after": {"schema": {"type": "string"}, "description": "the batches created before this batch id"},
                "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX, "default": LIMIT_DEFAULT},
                          "description": "at most this many batches"}})
def list_batches():
    try:
        limit = int(request.args.get("limit", LIMIT_DEFAULT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= LIMIT_MAX:
        raise InvalidRequest(f"limit must be an integer from 1 to {LIMIT_MAX}", param="limit")
    records, more = mb().store.batches.list(after=request.args.get("after") or None, limit=limit)
    data = [_public(r) for r in records]
    return jsonify({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": more}), 200


@bp.post("/batches/<batch_id>/cancel")
@documented("openai", "Cancel a batch (OpenAI-compatible): `cancelling`, then `cancelled` with what it did",
            Ok(200, Batch, "the batch, `cancelling`"), errors=(404, 409, 503))
def cancel(batch_id: str):
    batch = _get(batch_id)
    if batch.status in FINAL or batch.status == "finalizing":
        raise Conflict(f"batch {batch_id} is {batch.status}; it cannot be cancelled", code=ErrorCode.CONFLICT)
    after = mb().store.batches.move(batch_id, "cancelling", allowed_from=("validating", "in_progress"))
    if after is None:
        raise NotFound(f"batch {batch_id!r} does not exist", param="batch_id")
    if after.status not in ("cancelling", "cancelled"):
        raise Conflict(f"batch {batch_id} is {after.status}; it cannot be cancelled", code=ErrorCode.CONFLICT)
    _kick(batch_id)
    return jsonify(_public(after)), 200


def _start(record: BatchRecord) -> BatchRecord:
    mb().store.batches.create(record)
    _kick(record.id)
    return record


def _get(batch_id: str) -> BatchRecord:
    record = mb().store.batches.get(batch_id) if _BATCH_ID.fullmatch(batch_id) else None
    if record is None:
        raise NotFound(f"batch {batch_id!r} does not exist", param="batch_id")
    return record


def _public(record: BatchRecord) -> dict[str, object]:
    """The batch object; while it runs, its counts and usage from the chunks' done marks."""
    if record.status in ("in_progress", "finalizing", "cancelling") and record.chunks:
        completed, failed, usage = tally(mb().store.batches.done(record.id))
        record.request_counts = RequestCounts(total=record.request_counts.total, completed=completed, failed=failed)
        record.usage = usage
    return record.public()


def _count_lines(key: str) -> int:
    """The lines of a stored file (a last line without its newline counts), streamed."""
    count, last = 0, b"\n"
    for block in filestore().iter_bytes(key):
        if block:
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def filestore() -> FileStore:
    """This app's file store (``MODELBAY_FILES_URL``), opened on first use."""
    with _lock:
        fs = current_app.extensions.get(EXTENSION)
        if fs is None:
            fs = current_app.extensions[EXTENSION] = open_filestore(mb().settings)
        return fs


def _kick(batch_id: str) -> None:
    """Have a live worker advance the batch now (else the reaper's round sends it)."""
    nodes = [n for n in mb().store.live_nodes() if not n.draining]
    if nodes:
        mb().celery.send_task(TASK_BATCH_ADVANCE, args=[batch_id], queue=node_queue(random.choice(nodes).id))
