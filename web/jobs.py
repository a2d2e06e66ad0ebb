"""``/v1/jobs``: submit, poll (with long-poll ``?wait=S``), cancel, list."""
from __future__ import annotations

import re

from flask import Blueprint, jsonify, request

from tasks.errors import Conflict, ErrorCode, InvalidRequest, NotFound
from web.limits import check_limits
from web.metrics import count_submitted
from tasks.schemas import ACTIVE, TERMINAL, JobRecord, JobRequest
from tasks.store import new_job_id
from tasks.settings import Settings, env_name
from tasks.webhooks import check_callback_url, job_ended, watch_job
from web.extensions import mb
from web.idempotent import REPLAYED, once
from web.openapi import BODY, EXAMPLE_MODEL, JOB_HEADERS, STORE, Ok, documented
from web.schemas_http import JobList
from web.util import job_manifest, parse_body, pin

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

_JOB_ID = re.compile(r"[0-9a-f]{32}")
LIMIT_MAX, LIMIT_DEFAULT = 1000, 50  # GET /v1/jobs?limit=
JOB_LINKS = ("GetJob", "CancelJob")
LIST_QUERY = {
    "status": {"schema": {"type": "string", "enum": sorted(ACTIVE | TERMINAL)},
               "description": "only jobs with this status"},
    "model": {"schema": {"type": "string"}, "description": "only jobs of this model"},
    "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX, "default": LIMIT_DEFAULT},
              "description": "at most this many jobs"},
}


def _wait_query(settings: Settings) -> dict[str, object]:
    return {"schema": {"type": "number", "minimum": 0, "maximum": settings.max_wait_s},
            "description": "long-poll: wait up to this many seconds for the job to end"}


def _job(job_id: str, wait_s: float = 0.0) -> JobRecord:
    """The job ``job_id``; with ``wait_s``, once it has ended or ``wait_s`` seconds passed."""
    if not _JOB_ID.fullmatch(job_id):
        record = None
    else:
        record = mb().waiter.wait(job_id, wait_s) if wait_s else mb().store.get_job(job_id)
    if record is None:
        raise NotFound(f"job {job_id!r} not found", param="id", code=ErrorCode.JOB_NOT_FOUND)
    return record


def _float_arg(name: str, low: float, high: float, limit: str = "") -> float | None:
    """The query argument ``name`` as a number in [low, high], or None when absent; ``limit``
    says where ``high`` comes from (e.g. " seconds (MODELBAY_MAX_WAIT_S)")."""
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}{limit}", param=name)
    return value


def _wait_arg() -> float:
    """``?wait=S`` in seconds, 0 when absent; above ``MODELBAY_MAX_WAIT_S`` is a 400."""
    limit = f" seconds (the upper limit is the setting {env_name('max_wait_s')})"
    return _float_arg("wait", 0, mb().settings.max_wait_s, limit) or 0.0


@bp.post("")
@documented("jobs", "Submit an inference job; with `wait`, answer once it ends (200) or the wait runs out (202)",
            Ok(202, JobRecord, "queued", headers=JOB_HEADERS, links=JOB_LINKS),
            Ok(200, JobRecord, "ended within `wait`, or an Idempotency-Key's replay",
               headers=(*JOB_HEADERS, "Idempotent-Replayed"), links=JOB_LINKS),
            errors=(*BODY, 404, 409, 429), idempotent=True, body=JobRequest, pin=True, query={"wait": _wait_query},
            example={"model": EXAMPLE_MODEL, "task": "generate", "input": "hello there", "params": {"max_tokens": 8}})
def submit():
    wait_s = _wait_arg()  # checked before anything is queued
    req = parse_body(JobRequest)
    check_limits(req.task, req.input_json(), req.params, mb().settings)
    req.node = pin(req.node)
    manifest = job_manifest(mb().catalog, req.model, req.task)  # before anything is queued
    check_callback_url(req.callback_url, mb().settings)
    job_id = new_job_id()
    if wait_s:  # listened for before it exists: its end needs no read
        mb().waiter.expect(job_id)
    try:
        record, replayed = once(lambda: mb().dispatcher.submit(req, manifest, webhooks=True, job_id=job_id),
                                mb().store.get_job, lambda r: r.id)  # an Idempotency-Key's retry: the first job
        watch_job(mb().store.webhooks, record, mb().settings)  # a webhook's outbox entry (none: no round trip)
        count_submitted("inference", req.task)
        status = 200 if replayed else 202
        if wait_s:  # submit and long-poll in one request: one HTTP round trip less per job
            record = mb().waiter.wait(record.id, wait_s, known=None if replayed else record) or record
            status = 200 if record.status in TERMINAL or replayed else 202
    finally:
        mb().waiter.forget(job_id)  # when the wait did not take it
    headers = {"Location": f"/v1/jobs/{record.id}", **(REPLAYED if replayed else {})}
    if record.node:
        headers["X-Modelbay-Node"] = record.node
    return jsonify(record.public()), status, headers


@bp.get("/<job_id>")
@documented("jobs", "Get a job; with `wait` long-poll until it ends",
            Ok(200, JobRecord, "the job", headers=("X-Modelbay-Node",)), errors=(400, 404, 503),
            query={"wait": _wait_query})
def get(job_id: str):
    record = _job(job_id, _wait_arg())
    live = mb().live.job_progress(record)
    if live is not None:
        record.progress = live
    mb().store.place_in_queue(record)  # queue_position and eta_s while it waits
    headers = {"X-Modelbay-Node": record.node} if record.node else {}
    return jsonify(record.public()), 200, headers


@bp.delete("/<job_id>")
@documented("jobs", "Cancel an inference job", Ok(202, JobRecord, "cancelled"), errors=(404, 409, 503))
def cancel(job_id: str):
    record = _job(job_id)
    if record.kind == "load":
        raise Conflict("a load is not cancellable; unload the model to stop it",
                       code=ErrorCode.LOAD_NOT_CANCELLABLE)
    change = mb().store.cancel(job_id)
    if not change.applied:
        status = change.record.status if change.record else "gone"
        raise Conflict(f"job {job_id} is already {status}", code=ErrorCode.JOB_FINISHED)
    job_ended(mb().store.webhooks, change.record)  # its webhook is due (a worker posts it)
    return jsonify(change.record.public()), 202


@bp.get("")
@documented("jobs", "List recent jobs, newest first", Ok(200, JobList, "the jobs"), errors=(400, *STORE),
            query=LIST_QUERY)
def list_jobs():
    status = request.args.get("status")
    if status is not None and status not in ACTIVE | TERMINAL:
        raise InvalidRequest(f"status must be one of {sorted(ACTIVE | TERMINAL)}", param="status")
    model = request.args.get("model")
    limit = _float_arg("limit", 1, LIMIT_MAX)
    jobs = mb().store.list_jobs(model=model, status=status, limit=int(limit or LIMIT_DEFAULT))
    return jsonify({"object": "list", "data": [j.public() for j in jobs]})
