"""The routes' side of coalesced embeddings (:mod:`web.openai.coalesce`): a call whose texts
may share a job with other calls of the same caller and model.

What a caller sees is a plain call's answer: its own vectors in its own order and the usage
of its own texts (the job's ``text_tokens``). ``X-Modelbay-Job`` names the shared job, whose
record holds the texts of every call in it. A call with an ``Idempotency-Key`` or
``Prefer: respond-async`` never shares (its job is its own to replay or poll), nor does any
call when ``MODELBAY_COALESCE_EMBED_JOBS`` is 0.

When a shared job fails for its input (a 4xx code, such as a text the model refuses), each
call of it runs again alone, so one caller's bad text fails only that caller. Any other end
(a crash, a cancel, no node) is every call's answer.
"""
from __future__ import annotations

import time
from typing import Any

from flask import request

from tasks.errors import ErrorCode
from tasks.schemas import JobRecord, JobRequest, Manifest
from web.extensions import mb
from web.idempotent import HEADER as IDEMPOTENCY_HEADER, scope
from web.metrics import count_embeddings_call, count_submitted
from web.openai.coalesce import LeftWaiting, Part
from web.openai.serving import SLICE_S, Call, ClientGone, job_error, prefers_async

ALONE_AGAIN = frozenset({400, 413, 422})  # a shared job that failed with these: its input's fault


def embed_call(model: str, input_: str | list[str]) -> Call:
    """The call for ``POST /v1/embeddings``: shared when coalescing is on and nothing in the
    request asks for a job of its own."""
    shareable = (mb().settings.coalesce_embed_jobs > 0 and request.headers.get(IDEMPOTENCY_HEADER) is None
                 and not prefers_async())
    call = (SharedCall if shareable else Call)(model, "embed", input_, {})
    count_embeddings_call(shared=shareable)
    return call


class SharedCall(Call):
    """A :class:`Call` whose job may be shared; see the module docstring."""

    part: Part | None  # None once the call runs alone again

    def _submit(self, req: JobRequest, manifest: Manifest, stream: bool) -> tuple[JobRecord, bool]:
        self._request, self._manifest = req, manifest
        texts = [req.input] if isinstance(req.input, str) else [str(t) for t in req.input]
        key = (scope(), req.model, req.node)
        try:
            self.part = mb().coalescer.join(key, texts, self._job_of, self.gone)
        except LeftWaiting:
            raise ClientGone("") from None
        batch = self.part.batch
        if batch is None or batch.record is None:  # join returns only once the batch is submitted
            raise RuntimeError("a shared embeddings job without a record")
        return batch.record, False

    def _job_of(self, texts: list[str]) -> JobRecord:
        """A job of ``texts``, listened for before it exists (no read when its end comes)."""
        req = self._request.model_copy(update={"input": texts[0] if len(texts) == 1 else texts})
        record = mb().waiter.listened(lambda job_id: mb().dispatcher.submit(req, self._manifest, job_id=job_id),
                                      lambda r: r.id)
        count_submitted("inference", "embed")  # per job: the calls are counted by the route
        return record

    def wait(self, *, until_running: bool = False) -> JobRecord:
        """Wait for the shared job's end (see :meth:`Call.wait`); the last call to leave it
        without its result cancels it."""
        part = self.part
        if part is None or part.batch is None:
            return super().wait(until_running=until_running)
        batch = part.batch
        job_id = self.record.id
        try:
            while True:
                record = batch.watch(lambda: mb().waiter.wait(job_id, SLICE_S, known=batch.record), SLICE_S)
                self.record = record
                if record.terminal:
                    mb().coalescer.release(batch)
                    break
                if self.gone():
                    raise ClientGone(job_id)
                if record.status == "loading" and time.monotonic() - self.started > mb().settings.load_wait_s:
                    raise self._still_loading(record)
        finally:
            if batch.leave():
                mb().store.cancel(job_id, "every client of the shared job disconnected")
                mb().coalescer.release(batch)
        if len(batch.parts) > 1 and self._input_refused(record):
            return self._alone_again(part)
        return record

    @staticmethod
    def _input_refused(record: JobRecord) -> bool:
        return (record.status == "failed" and record.error is not None
                and ErrorCode.of(record.error.type).http_status in ALONE_AGAIN)

    def _alone_again(self, part: Part) -> JobRecord:
        self.part = None
        self.record = self._job_of(part.texts)
        return super().wait()

    def result(self) -> dict[str, Any]:
        """This call's rows of the shared job's result, with the usage of its own texts."""
        part, record = self.part, self.record
        if part is None or part.batch is None or len(part.batch.parts) == 1:
            return super().result()
        if record.status != "succeeded":
            raise job_error(record)
        result = record.result or {}
        rows = slice(part.start, part.start + len(part.texts))
        counts = list(result.get("text_tokens") or [])[rows]
        tokens = sum(int(c) for c in counts)
        return {"embeddings": list(result.get("embeddings") or [])[rows], "dim": result.get("dim"),
                "text_tokens": counts, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
