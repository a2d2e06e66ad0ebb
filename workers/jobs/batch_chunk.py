"""One chunk of a batch, run as an inference job of task ``batch`` against the loaded backend
(registered in :data:`workers.jobs.inference.RUNNERS` by :mod:`workers.jobs.batch`, so it is placed, loaded, cancelled,
requeued by the reaper and retried after a backend crash exactly as any job of its model).

The chunk's lines (``batches/<id>/in/<chunk>.jsonl``) run together: an embeddings chunk sends
the texts of all its lines in one Embed call (the backend's batcher cuts it into forward passes;
the backend answers each text's token count, so each line's ``usage`` is its own, as the
synchronous route's), a generation chunk runs up to ``batch_generate_concurrency`` lines at a
time. Each line's body is parsed and
answered by the same code as the synchronous route (:mod:`tasks.openai_requests`,
:mod:`tasks.openai_bodies`). The results go to one part per chunk (``.out.jsonl``/``.err.jsonl``,
overwritten when the chunk runs again), then the chunk is marked done with its counts.

A cancelled chunk (its batch cancelled or expired) writes what it finished and answers its
other lines ``batch_cancelled``/``batch_expired``. A backend that dies under the chunk fails the
whole chunk call (:class:`BackendCallError`), so the job path runs it again once.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tasks.batches import BATCH_CANCELLED, BATCH_EXPIRED, FINAL, ChunkDone, error_line, output_line, part_key
from tasks.errors import ErrorCode, JobFailed, ModelbayError
from tasks.limits import check_limits
from tasks.names import TASK_BATCH_ADVANCE
from tasks.openai_bodies import completion_body, embeddings_body
from tasks.openai_requests import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest
from tasks.schemas import JobRecord
from workers import metrics
from workers.jobs.batch_files import filestore
from workers.jobs.inference import Delivery
from workers.runtime import Runtime
from workers.supervisor.calls import BackendCallError, BackendCancelled
from workers.supervisor.process import BackendProcess

log = logging.getLogger("modelbay.worker")
BULK_PARAMS = {"priority": "bulk"}  # Embed: behind every interactive call in the backend's batcher
_FLUSH_MS = 1000  # Generate: a batch line is never streamed; its tokens come in a message a second at most


class Calls:
    """The backend calls in flight for one chunk job, cancelled together when the job is
    (the cancel watcher holds one callback per job)."""

    def __init__(self, rt: Runtime, job_id: str) -> None:
        self.rt, self.job_id = rt, job_id
        self._lock = threading.Lock()
        self._cancels: list[Callable[[], None]] = []
        self.cancelled = False
        rt.cancels.watch(job_id, self.cancel_all)

    def add(self, cancel: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._cancels.append(cancel)
                return
        cancel()

    def cancel_all(self) -> None:
        with self._lock:
            self.cancelled = True
            cancels, self._cancels = self._cancels, []
        for cancel in cancels:
            cancel()

    def finish(self) -> bool:
        """Stop watching; True when the job was cancelled meanwhile."""
        return self.rt.cancels.unwatch(self.job_id) or self.cancelled


@dataclass
class Outcome:
    """One line's answer: its output or error line, its tokens, and whether it ran at all."""

    line: bytes = b""
    ok: bool = False
    ran: bool = True
    tokens: tuple[int, int] = (0, 0)


@dataclass
class Chunk:
    rt: Runtime
    job: JobRecord
    proc: BackendProcess
    endpoint: str
    lines: list[dict[str, Any]]
    calls: Calls
    crashed: list[BackendCallError] = field(default_factory=list)


def _embed(chunk: Chunk, body: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    req = EmbeddingsRequest.model_validate(body)
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    check_limits("embed", req.input, {}, chunk.rt.settings, params_prefix="")
    vectors, tokens = chunk.proc.embed(texts, {}, chunk.rt.settings.inference_timeout_s, on_call=chunk.calls.add)
    result = {"embeddings": vectors, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return embeddings_body(req.model, result, req.encoding_format), (tokens, 0)


def _generate(chunk: Chunk, body: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    chat = chunk.endpoint == "/v1/chat/completions"
    req: ChatCompletionRequest | CompletionRequest
    if chat:
        req = ChatCompletionRequest.model_validate(body)
        messages = [m.as_job() for m in req.messages]
        check_limits("chat", messages, req.params(), chunk.rt.settings, input_name="messages", params_prefix="")
        call = chunk.proc.generate("", messages, req.params(), chunk.rt.settings.inference_timeout_s, flush_ms=_FLUSH_MS)
    else:
        req = CompletionRequest.model_validate(body)
        check_limits("generate", req.text(), req.params(), chunk.rt.settings, input_name="prompt", params_prefix="")
        call = chunk.proc.generate(req.text(), [], req.params(), chunk.rt.settings.inference_timeout_s,
                                   flush_ms=_FLUSH_MS)
    chunk.calls.add(call.cancel)
    pieces: list[str] = []
    final: Any = None
    for piece in call:
        pieces.append(piece.text)
        if piece.done:
            final = piece
    usage = {"prompt_tokens": getattr(final, "prompt_tokens", 0),
             "completion_tokens": getattr(final, "completion_tokens", len(pieces))}
    result = {"text": "".join(pieces), "finish_reason": getattr(final, "finish_reason", "") or "stop", "usage": usage}
    return completion_body(uuid.uuid4().hex, req.model, result, chat), (usage["prompt_tokens"],
                                                                          usage["completion_tokens"])


def _died(proc: BackendProcess, exc: BackendCallError) -> bool:
    """The call failed because the backend process died (not because it refused the request)."""
    if not proc.alive():
        return True
    if exc.grpc_code not in (None, "UNAVAILABLE", "CANCELLED", "UNKNOWN", "INTERNAL"):
        return False  # the backend answered: the request's own failure
    return proc.crash_reason(wait_s=1.0) is not None


def _one(chunk: Chunk, line: dict[str, Any]) -> Outcome:
    """Run one line; its outcome. A dead backend is noted (the chunk fails after)."""
    custom_id = str(line.get("custom_id"))
    if chunk.calls.cancelled:
        return Outcome(ran=False)
    run = _embed if chunk.endpoint == "/v1/embeddings" else _generate
    try:
        body, tokens = run(chunk, line.get("body") or {})
        return Outcome(output_line(custom_id, body), ok=True, tokens=tokens)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return Outcome(error_line(custom_id, ErrorCode.INVALID_REQUEST.value, message))
    except BackendCancelled:
        return Outcome(ran=False)
    except BackendCallError as exc:
        if chunk.calls.cancelled:
            return Outcome(ran=False)
        if _died(chunk.proc, exc):
            chunk.crashed.append(exc)
            return Outcome(ran=False)
        return Outcome(error_line(custom_id, exc.job_code.value, str(exc)))
    except (JobFailed, ModelbayError) as exc:  # a limit (limit_exceeded), a backend's own refusal
        return Outcome(error_line(custom_id, exc.code.value, exc.message))
    except Exception as exc:  # a bug answers this line, not the whole chunk
        log.exception("batch line %s of job %s crashed", custom_id, chunk.job.id)
        return Outcome(error_line(custom_id, ErrorCode.INTERNAL_ERROR.value, f"the request failed unexpectedly: {exc}"))


def _parse_embeds(chunk: Chunk) -> list[tuple[EmbeddingsRequest, list[str]] | Outcome]:
    """Each line of an embeddings chunk: its request and texts, or (a line the synchronous route
    would refuse) its error outcome, answered by :func:`_one` as a line run alone would be."""
    parsed: list[tuple[EmbeddingsRequest, list[str]] | Outcome] = []
    for line in chunk.lines:
        try:
            req = EmbeddingsRequest.model_validate(line.get("body") or {})
            check_limits("embed", req.input, {}, chunk.rt.settings, params_prefix="")
        except (ValidationError, JobFailed, ModelbayError):
            parsed.append(_one(chunk, line))
            continue
        parsed.append((req, [req.input] if isinstance(req.input, str) else list(req.input)))
    return parsed


def _embed_together(chunk: Chunk) -> list[Outcome]:
    """An embeddings chunk: the texts of all its lines in one Embed call (the backend's batcher
    cuts them into forward passes), each line's rows and token counts split back out, so each
    body and ``usage`` is the synchronous route's. When that call fails and the backend lives
    (it refused some text), each line runs alone, so only the line at fault fails."""
    parsed = _parse_embeds(chunk)
    texts = [text for p in parsed if not isinstance(p, Outcome) for text in p[1]]
    if not texts or chunk.calls.cancelled:
        return [p if isinstance(p, Outcome) else Outcome(ran=False) for p in parsed]
    try:
        vectors, counts = chunk.proc.embed_each(texts, BULK_PARAMS, chunk.rt.settings.inference_timeout_s,
                                                on_call=chunk.calls.add)
    except BackendCancelled:
        return [p if isinstance(p, Outcome) else Outcome(ran=False) for p in parsed]
    except BackendCallError as exc:
        if chunk.calls.cancelled or _died(chunk.proc, exc):
            if not chunk.calls.cancelled:
                chunk.crashed.append(exc)
            return [p if isinstance(p, Outcome) else Outcome(ran=False) for p in parsed]
        return [p if isinstance(p, Outcome) else _one(chunk, line) for p, line in zip(parsed, chunk.lines)]
    outcomes: list[Outcome] = []
    at = 0
    for p, line in zip(parsed, chunk.lines):
        if isinstance(p, Outcome):
            outcomes.append(p)
            continue
        req, n = p[0], len(p[1])
        tokens = sum(counts[at:at + n])
        result = {"embeddings": vectors[at:at + n], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        at += n
        body = embeddings_body(req.model, result, req.encoding_format)
        outcomes.append(Outcome(output_line(str(line.get("custom_id")), body), ok=True, tokens=(tokens, 0)))
    return outcomes


def _run_lines(chunk: Chunk, concurrency: int) -> list[Outcome]:
    """Every line's outcome: an embeddings chunk in one call, generations ``concurrency`` at a time."""
    if chunk.endpoint == "/v1/embeddings":
        return _embed_together(chunk)
    with ThreadPoolExecutor(max(1, min(concurrency, len(chunk.lines))), thread_name_prefix="modelbay-batch") as pool:
        return list(pool.map(lambda line: _one(chunk, line), chunk.lines))


def run_chunk(rt: Runtime, job: JobRecord, proc: BackendProcess, delivery: Delivery) -> dict[str, Any]:
    """The ``batch`` task's runner (see the module); returns the chunk's counts."""
    spec = job.input if isinstance(job.input, dict) else {}
    batch_id, index = str(spec.get("batch")), int(spec.get("chunk", -1))
    batches = rt.store.batches
    batch = batches.get(batch_id)
    if batch is None or batch.status in FINAL or batches.closed(batch_id):
        return {"skipped": True}
    if batch.status == "cancelling" or batch.ending:
        rt.store.cancel(job.id, f"batch {batch_id} is {batch.ending or 'cancelled'}")
        raise BackendCancelled(f"batch {batch_id} was stopped")
    fs = filestore(rt.settings)
    lines = [json.loads(raw) for raw in fs.iter_lines(part_key(batch_id, index, "in")) if raw.strip()]
    chunk = Chunk(rt, job, proc, batch.endpoint, lines, Calls(rt, job.id))
    try:
        outcomes = _run_lines(chunk, rt.settings.batch_generate_concurrency)
    finally:
        cancelled = chunk.calls.finish()
    if chunk.crashed and not cancelled:
        raise chunk.crashed[0]  # the job path retries the chunk once (a new backend), or fails it
    done = _write(rt, batch_id, index, lines, outcomes, cancelled)
    if cancelled:
        raise BackendCancelled(f"job {job.id} cancelled")
    return done.model_dump()


def _write(rt: Runtime, batch_id: str, index: int, lines: list[dict[str, Any]], outcomes: list[Outcome],
           cancelled: bool) -> ChunkDone:
    """Write the chunk's part (lines that did not run answered as the batch's stop says), mark
    it done, and, as the last chunk, have the batch finalized."""
    out, err = bytearray(), bytearray()
    done = ChunkDone()
    stopped: tuple[str, str] | None = None
    skipped = 0
    for line, outcome in zip(lines, outcomes):
        if outcome.ran:
            (out if outcome.ok else err).extend(outcome.line)
            done.completed += outcome.ok
            done.failed += not outcome.ok
            done.input_tokens += outcome.tokens[0]
            done.output_tokens += outcome.tokens[1]
            continue
        if stopped is None:
            batch = rt.store.batches.get(batch_id)
            expired = batch is not None and batch.ending == "expired"
            stopped = ((BATCH_EXPIRED, "the batch expired before this request ran") if expired else
                       (BATCH_CANCELLED, "the batch was cancelled before this request ran"))
        err.extend(error_line(str(line.get("custom_id")), *stopped))
        skipped += 1
    fs = filestore(rt.settings)
    fs.put_bytes(part_key(batch_id, index, "out"), bytes(out))
    fs.put_bytes(part_key(batch_id, index, "err"), bytes(err))
    count = rt.store.batches.mark_done(batch_id, index, done)
    if count is not None:
        metrics.batch_lines("completed", done.completed)
        metrics.batch_lines("failed", done.failed)
        metrics.batch_lines("expired" if stopped and stopped[0] == BATCH_EXPIRED else "cancelled", skipped)
    batch = rt.store.batches.get(batch_id)
    if count is not None and batch is not None and count >= batch.chunks and not cancelled:
        rt.dispatcher.celery.send_task(TASK_BATCH_ADVANCE, args=[batch_id], queue=rt.settings.node_queue)
    return done

