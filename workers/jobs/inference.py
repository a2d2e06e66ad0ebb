"""One inference job against a loaded backend: embed, generate/chat, image.

Each runner takes the worker's runtime, the job, the backend process and a :class:`Delivery`
that counts the output produced so far (so a crash can tell "retry" from "fail"), and returns
the job's ``result``. An embed job moves to ``running`` once its backend call is on its way
(:meth:`Delivery.started`), so the backend works during that round trip to Valkey. Every
call is registered with the cancel watcher, so cancelling the job cancels the gRPC call and
the backend stops:
between tokens for text, between denoising steps for images, and a queued embed request
leaves its batch.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from tasks.schemas import JobProgress, JobRecord
from workers.supervisor.calls import BackendCallError, BackendCancelled
from workers.progress.debounce import Debouncer
from workers.runtime import Runtime
from workers.supervisor.process import BackendProcess

Runner = Callable[[Runtime, JobRecord, BackendProcess, "Delivery"], dict[str, Any]]


class NotRunning(Exception):
    """The job could not move to ``running`` here (cancelled, or routed to another holder while
    its backend call started): the call is cancelled and its output is nobody's."""


class Delivery:
    """How much of a job's output had been produced when a call failed (``pieces``), and the
    job's move to ``running`` (``begin``: a compare-and-set, True when made)."""

    def __init__(self, begin: Callable[[], bool] = lambda: True) -> None:
        self.pieces = 0
        self._begin = begin
        self._began: bool | None = None

    def began(self) -> bool:
        """Whether the job is ``running`` here; the first call makes the move."""
        if self._began is None:
            self._began = self._begin()
        return self._began

    def started(self, rt: Runtime, job: JobRecord, cancel: Callable[[], None]) -> None:
        """Every runner calls this once its backend call is on its way (watched for cancels).
        A job of :data:`STARTS_RUNNING` moves to ``running`` here, while the backend works:
        one round trip off the job's latency. When it cannot, the call is cancelled and
        unwatched and :class:`NotRunning` raised."""
        moved = False
        try:
            moved = self.began()
        finally:  # not running here (or the move failed): the call is nobody's
            if not moved:
                rt.cancels.unwatch(job.id)
                cancel()
        if not moved:
            raise NotRunning(job.id)


def _unwatch(rt: Runtime, job: JobRecord) -> None:
    """Stop watching; a cancel that raced with the end of the call still wins."""
    if rt.cancels.unwatch(job.id):
        raise BackendCancelled(f"job {job.id} cancelled")


def _started(rt: Runtime, job: JobRecord, delivery: Delivery, cancel: Callable[[], None]) -> None:
    """The backend call is on its way: watch it for cancels, and move the job to running."""
    rt.cancels.watch(job.id, cancel)
    delivery.started(rt, job, cancel)


def embed(rt: Runtime, job: JobRecord, proc: BackendProcess, delivery: Delivery) -> dict[str, Any]:
    """The vectors in input order, the usage, and each text's token count (``text_tokens``:
    the web answers several coalesced calls from one job, each with its own usage)."""
    texts = [job.input] if isinstance(job.input, str) else list(job.input)
    try:
        vectors, counts = proc.embed_each(texts, job.params, rt.settings.inference_timeout_s,
                                          on_call=lambda cancel: _started(rt, job, delivery, cancel))
    finally:
        _unwatch(rt, job)
    prompt_tokens = sum(counts)
    return {"embeddings": vectors, "dim": len(vectors[0]) if vectors else 0, "text_tokens": counts,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def generate(rt: Runtime, job: JobRecord, proc: BackendProcess, delivery: Delivery) -> dict[str, Any]:
    prompt = job.input if job.task == "generate" else ""
    messages = job.input if job.task == "chat" else []
    # A streamed job gets each token as it is made; for any other, tokens made within a
    # progress interval come in one message (its ticks are debounced at that interval anyway).
    flush_ms = 0 if job.stream else round(rt.settings.progress_interval_s * 1000)
    call = proc.generate(prompt, messages, job.params, rt.settings.inference_timeout_s, flush_ms=flush_ms)
    _started(rt, job, delivery, call.cancel)
    # Token progress on jobs.<id>.progress, debounced like every operation.
    op = rt.live.operation(job.id, "inference", job.model, job.id, quiet_s=rt.settings.progress_interval_s)
    op.update("start", {"message": "generating"})
    max_tokens = job.params.get("max_tokens") if isinstance(job.params.get("max_tokens"), int) else None
    pieces: list[str] = []
    final: Any = None
    try:
        for piece in call:
            delivery.pieces += piece.pieces  # tokens, an empty one too (a message may hold several)
            if piece.text:
                pieces.append(piece.text)
                if job.stream:
                    rt.store.tokens.append(job.id, piece.text)
            if piece.done:
                final = piece
            else:
                op.update("progress", {"message": f"generated {delivery.pieces} token(s)",
                                       "progress": round(100.0 * delivery.pieces / max_tokens, 1) if max_tokens else None})
    except BackendCancelled:
        op.done()  # a cancel ends the operation; it is not an error to show
        raise
    except BaseException as exc:
        op.fail(f"generation failed: {exc}")
        raise
    finally:
        if job.stream:
            rt.store.tokens.end(job.id)
        _unwatch(rt, job)
    op.done()
    finish = getattr(final, "finish_reason", "") or "stop"
    usage = {"prompt_tokens": getattr(final, "prompt_tokens", 0),
             "completion_tokens": getattr(final, "completion_tokens", delivery.pieces)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"text": "".join(pieces), "finish_reason": finish, "usage": usage}


def image(rt: Runtime, job: JobRecord, proc: BackendProcess, delivery: Delivery) -> dict[str, Any]:
    """Step progress goes to the job record (debounced, the last step always written) and
    to the live operation; the result holds the PNG as base64."""
    call = proc.generate_image(job.input, job.params, rt.settings.inference_timeout_s)
    _started(rt, job, delivery, call.cancel)
    op = rt.live.operation(job.id, "inference", job.model, job.id, quiet_s=rt.settings.progress_interval_s)
    op.update("start", {"message": "generating image"})
    record = Debouncer(lambda _e, p: rt.store.set_progress(job.id, JobProgress(**p)), rt.settings.progress_interval_s)
    result: dict[str, Any] | None = None
    try:
        for event in call:
            if event.png is not None:
                result = {"image": {"b64_png": base64.b64encode(event.png).decode("ascii"), "width": event.width,
                                    "height": event.height, "seed": event.seed}}
                continue
            delivery.pieces += 1
            fields = {"phase": "generating", "progress": round(100.0 * event.step / max(1, event.steps), 1),
                      "step": event.step, "steps": event.steps, "message": f"step {event.step}/{event.steps}"}
            last = event.step >= event.steps
            record.submit("complete" if last else "progress", fields)
            op.update("progress", fields)
    except BackendCancelled:
        op.done()
        raise
    except BaseException as exc:
        op.fail(f"image generation failed: {exc}")
        raise
    finally:
        _unwatch(rt, job)
    op.done()
    if result is None:
        raise BackendCallError("the backend ended the image stream without an image")
    return result


RUNNERS: dict[str, Runner] = {"embed": embed, "generate": generate, "chat": generate, "image": image}
STARTS_RUNNING = frozenset({"embed"})
"""The tasks whose job moves to ``running`` once the backend call is on its way
(:meth:`Delivery.started`); any other runner is called with the job already ``running``
(its ``started`` then does nothing). Only the unary Embed gains: moving a generate job
during its stream's start made a serial one-token job 0.3 ms slower, not faster
(docs/benchmarks.md, "Sixth round")."""
