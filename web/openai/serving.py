"""Run one inference job for a synchronous (OpenAI-style) call, with the right lifetimes.

architecture §2: the call's lifetime is the inference job's, never the load's. While the call waits
(for a load, a queue slot or the generation) it watches the client's socket; when the client
goes, the inference job is cancelled (the backend stops within a token or two) and the load,
a job of its own, goes on and stays cached. A load that is still running after
``MODELBAY_LOAD_WAIT_S`` answers 503 with ``Retry-After`` and the load's progress; the
inference job is cancelled, the load goes on. Once the job runs there is no time limit here.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

from flask import request
from pydantic import ValidationError

from tasks.errors import Conflict, ErrorCode, InvalidRequest, ModelbayError, Unavailable
from web.limits import check_limits
from tasks.schemas import TERMINAL, JobRecord, JobRequest, Manifest
from web.disconnect import client_gone
from web.extensions import mb
from web.idempotent import HEADER as IDEMPOTENCY_HEADER, REPLAYED, once
from web.metrics import count_submitted
from web.schemas_http import LoadingInfo
from web.util import describe, job_manifest, pin

SLICE_S = 0.2  # how often a waiting call looks at the client socket, seconds


class ClientGone(Exception):
    """The client closed the connection; its job was cancelled."""


class Call:
    """One inference job started for this request; see the module docstring."""

    def __init__(self, model: str, task: str, input_: Any, params: dict[str, Any], *, stream: bool = False,
                 input_name: str = "input", param_names: dict[str, str] | None = None) -> None:
        try:
            check_limits(task, input_, params, mb().settings, input_name=input_name, params_prefix="")
        except InvalidRequest as exc:  # name the field as this route spells it
            exc.param = (param_names or {}).get(exc.param or "", exc.param)
            raise
        manifest = job_manifest(mb().catalog, model, task, param="model")  # the registry of tasks/backends.py
        try:
            req = JobRequest(model=model, task=task, input=input_, params=params, node=pin(None))
        except ValidationError as exc:
            message, param = describe(exc)
            raise InvalidRequest(message, param=param) from None
        self.started = time.monotonic()
        # With an Idempotency-Key, a retry attaches to the first call's job (running or ended),
        # and the job is never cancelled by a client that goes: its retry will read the result.
        self.keyed = request.headers.get(IDEMPOTENCY_HEADER) is not None
        self.environ = request.environ
        self.record, self.replayed = self._submit(req, manifest, stream)
        if prefers_async():
            mb().waiter.forget(self.record.id)  # nobody here waits for it
            raise RespondAsync(self)

    def _submit(self, req: JobRequest, manifest: Manifest, stream: bool) -> tuple[JobRecord, bool]:
        """The call's job and whether an Idempotency-Key replayed it. The job is listened for
        before it exists (:meth:`web.extensions.JobWaiter.expect`): its end needs no read."""
        record, replayed = mb().waiter.listened(
            lambda job_id: once(lambda: mb().dispatcher.submit(req, manifest, stream=stream, job_id=job_id),
                                mb().store.get_job, lambda r: r.id),
            lambda made: made[0].id)
        count_submitted("inference", req.task)
        return record, replayed

    @property
    def headers(self) -> dict[str, str]:
        out = {"X-Modelbay-Job": self.record.id, **(REPLAYED if self.replayed else {})}
        if self.record.node:
            out["X-Modelbay-Node"] = self.record.node
        return out

    def cancel(self) -> None:
        if not self.keyed:  # a keyed call's job goes on for its retry
            mb().store.cancel(self.record.id, "the client disconnected")

    def gone(self) -> bool:
        return client_gone(self.environ)

    def wait(self, *, until_running: bool = False) -> JobRecord:
        """Wait until the job ends (or, with ``until_running``, leaves ``loading``/``queued``).
        Raises :class:`ClientGone` or the 503 of a load past ``MODELBAY_LOAD_WAIT_S``."""
        load_wait_s = mb().settings.load_wait_s
        while True:
            stop_at = TERMINAL | {"running"} if until_running else TERMINAL
            record = mb().waiter.wait(self.record.id, SLICE_S, stop_at, known=self.record) or self.record
            self.record = record
            if record.terminal or (until_running and record.status == "running"):
                return record
            if self.gone():
                self.cancel()
                raise ClientGone(record.id)
            if record.status == "loading" and time.monotonic() - self.started > load_wait_s:
                self.cancel()
                raise self._still_loading(record)

    def _still_loading(self, record: JobRecord) -> Unavailable:
        load = mb().store.get_job(record.load_job) if record.load_job else None
        live = mb().live.table.get(load.id) if load is not None else None
        progress = (mb().live.job_progress(load) if load is not None else None) or (load.progress if load else None)
        eta = (live or {}).get("eta_s")
        fields = progress.model_dump(include=set(LoadingInfo.model_fields)) if progress else {"phase": "queued",
                                                                                              "progress": 0.0}
        loading = LoadingInfo(model=record.model, job=record.load_job, **fields,
                              eta_s=round(eta, 1) if isinstance(eta, (int, float)) else None).model_dump()
        retry_s = min(60, max(1, math.ceil(eta))) if isinstance(eta, (int, float)) else 5
        return Unavailable(f"model {record.model!r} is still loading after {mb().settings.load_wait_s:g}s; "
                           "the load goes on: retry later", code=ErrorCode.MODEL_LOADING, retry_after_s=retry_s,
                           beside={"loading": loading}, headers={"X-Modelbay-Job": record.id})

    def result(self) -> dict[str, Any]:
        """The succeeded job's result, or the error its end maps to."""
        record = self.record
        if record.status == "succeeded":
            return record.result or {}
        raise job_error(record)

    def pieces(self) -> Iterator[str]:
        """The generated pieces as the worker streams them, until the job ends. Cancels the
        job when the client goes (a failed write closes this generator)."""
        tokens, after, done = mb().store.tokens, "0", False
        try:
            while True:
                read = tokens.read(self.record.id, after, block_s=SLICE_S)
                after = read.last_id
                yield from read.pieces
                if self.gone():
                    raise ClientGone(self.record.id)
                if read.ended or not read.pieces:
                    record = mb().waiter.wait(self.record.id, 5.0 if read.ended else 0) or self.record
                    self.record = record
                    if record.terminal:
                        yield from tokens.read(self.record.id, after).pieces
                        done = True
                        return
        finally:
            if not done:
                self.cancel()


class RespondAsync(Exception):
    """``Prefer: respond-async``: the call's job is queued; the route answers 202 with it."""

    def __init__(self, call: Call) -> None:
        super().__init__(call.record.id)
        self.record = call.record
        self.headers = {**call.headers, "Location": f"/v1/jobs/{call.record.id}", "Preference-Applied": "respond-async"}
        self.status = 200 if call.replayed else 202


def prefers_async() -> bool:
    """Whether the request's ``Prefer`` header (RFC 7240) asks for ``respond-async``."""
    prefs = ",".join(request.headers.getlist("Prefer")).split(",")
    return any(p.split(";")[0].strip().lower() == "respond-async" for p in prefs)


def job_error(record: JobRecord) -> ModelbayError:
    """The HTTP error for a job that did not succeed: its error's code, whose registry entry
    gives the status and type (a 503 with ``Retry-After``)."""
    if record.status == "cancelled":
        return Conflict(f"job {record.id} was cancelled", code=ErrorCode.JOB_CANCELLED)
    if record.error is None:
        return ModelbayError("the job failed", code=ErrorCode.JOB_FAILED)
    code = ErrorCode.of(record.error.type)
    return ModelbayError(record.error.message, code=code,
                         param="model" if code is ErrorCode.MODEL_NOT_FOUND else None)
