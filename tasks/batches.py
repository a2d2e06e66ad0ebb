"""Batches (OpenAI's Batch API): their records in Valkey, their keys in the file store, and the
state machine both the web (create, cancel, read) and the workers (split, run, finalize) follow.

A batch's states, as OpenAI's: ``validating`` → ``in_progress`` → ``finalizing`` → ``completed``;
``failed`` (a bad input file, with ``errors``); ``cancelling`` → ``cancelled``; ``expired`` (past
``expires_at``; internally it goes through ``finalizing`` with ``ending="expired"``). A final state
is never overwritten (WATCH/MULTI).

The lines run as chunk jobs: inference jobs of task ``batch`` whose input names the batch and the
chunk (up to ``batch_chunk_lines`` lines of one model), routed like any job of that model. Each
chunk writes its results as one part in the file store (:func:`part_key`) and then marks itself
done in ``mb:batch:<id>:done`` (hash chunk index → counts), so a chunk that runs again overwrites
its own part and is counted once. Finalizing first closes the batch (``mb:batch:<id>:closed``,
atomically with reading the done marks): a chunk that ends after that is not counted, and its
lines are answered as not run, so every ``custom_id`` is in the output or the error file exactly
once and the counts are exact.
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from collections.abc import Callable
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from tasks.keys import BATCHES, BATCHES_ACTIVE, WEBHOOKS_DUE, batch_key
from tasks.schemas import WebhookState

BatchStatus = Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired",
                      "cancelling", "cancelled"]
FINAL: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})
ENDPOINTS: dict[str, str] = {"/v1/embeddings": "embed", "/v1/chat/completions": "chat",
                             "/v1/completions": "generate"}  # endpoint → the job task of its lines

# ``errors.data[].code`` of a refused input file, and ``error.code`` of lines that did not run.
INVALID_JSON_LINE = "invalid_json_line"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
INVALID_URL = "invalid_url"
INVALID_METHOD = "invalid_method"
MODEL_NOT_FOUND = "model_not_found"
EMPTY_FILE = "empty_file"
BATCH_EXPIRED = "batch_expired"
BATCH_CANCELLED = "batch_cancelled"
MAX_ERRORS = 1000  # errors listed for a refused file (the first ones, by line)

_DONE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HLEN', KEYS[1])
"""


CHUNK_PRIORITY = 9  # kombu's Redis transport: 0 (every other message) is taken first, 9 last
_CHUNK_MARK = "b"    # the 13th hex digit of a chunk job's id (a uuid4's is always "4")


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def new_chunk_job_id() -> str:
    """A job id (32 hex digits, as any) that says it is a batch chunk's (see :func:`chunk_route`)."""
    hexid = uuid.uuid4().hex
    return hexid[:12] + _CHUNK_MARK + hexid[13:]


def is_chunk_job(job_id: str) -> bool:
    return len(job_id) == 32 and job_id[12] == _CHUNK_MARK


def chunk_route(name: str, args: tuple[Any, ...] | list[Any] | None, kwargs: dict[str, Any] | None,
                options: dict[str, Any], task: object = None, **_: object) -> dict[str, Any] | None:
    """A Celery router (``task_routes``): a chunk job's message goes with :data:`CHUNK_PRIORITY`,
    so on a model's queue a waiting interactive job is always taken before any chunk (kombu's
    Redis transport keeps each priority in its own list and BRPOPs the lists of priority 0
    first); every other message keeps the default (0). Every route of a chunk job (the split,
    a requeue by the reaper, a re-route) is sent by a worker, whose app has this router."""
    if args and isinstance(args[0], str) and is_chunk_job(args[0]):
        return {"priority": CHUNK_PRIORITY}
    return None


def part_key(batch_id: str, chunk: int, kind: Literal["out", "err", "in"]) -> str:
    """A chunk's object in the file store: its results (``out``/``err``, ``.jsonl``, one line per
    request) or its input lines (``in``, written when the batch is split)."""
    if kind == "in":
        return f"batches/{batch_id}/in/{chunk:06d}.jsonl"
    return f"batches/{batch_id}/parts/{chunk:06d}.{kind}.jsonl"


def batch_prefix(batch_id: str) -> str:
    return f"batches/{batch_id}/"


class BatchLineError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None  # 1-based line of the input file


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchLineError] = Field(default_factory=list)


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class TokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: TokensDetails = Field(default_factory=TokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputDetails = Field(default_factory=OutputDetails)
    total_tokens: int = 0


class Batch(BaseModel):
    """OpenAI's batch object (``GET /v1/batches/{id}``); timestamps in epoch seconds."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    usage: BatchUsage = Field(default_factory=BatchUsage)


class BatchRecord(Batch):
    """The stored record: the batch object and the runner's own fields."""

    chunks: int = 0          # chunks the lines were split into (known once split)
    models: list[str] = Field(default_factory=list)          # the models the lines name
    chunk_models: list[int] = Field(default_factory=list)    # each chunk's model (an index into models)
    ending: Literal["", "cancelled", "expired"] = ""  # why finalizing started early
    expires_at_s: float = 0.0  # the deadline with sub-second precision (tests shorten the window)
    callback_url: str | None = None       # where its end event goes (tasks/webhooks.py)
    webhook: WebhookState | None = None   # that event's delivery, when anyone is to hear of it

    def public(self) -> dict[str, Any]:
        out = Batch.model_validate(self.model_dump(include=set(Batch.model_fields))).model_dump(mode="json")
        if self.webhook is not None:
            out["webhook"] = self.webhook.model_dump(mode="json", exclude={"done", "refused"})
        return out


class ChunkDone(BaseModel):
    """What one chunk did (``mb:batch:<id>:done``)."""

    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def tally(done: dict[str, ChunkDone]) -> tuple[int, int, BatchUsage]:
    """Completed and failed lines, and the usage, of the chunks marked done."""
    completed = sum(d.completed for d in done.values())
    failed = sum(d.failed for d in done.values())
    inp = sum(d.input_tokens for d in done.values())
    out = sum(d.output_tokens for d in done.values())
    return completed, failed, BatchUsage(input_tokens=inp, output_tokens=out, total_tokens=inp + out)


class BatchStore:
    """Batch records and their chunk bookkeeping (``store.batches``); see the module."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._r = client
        self.ttl_s = ttl_s
        self._done = client.register_script(_DONE_SCRIPT)

    def create(self, record: BatchRecord) -> None:
        with self._r.pipeline() as pipe:
            pipe.set(batch_key(record.id), record.model_dump_json())
            pipe.zadd(BATCHES, {record.id: time.time()})
            pipe.sadd(BATCHES_ACTIVE, record.id)
            pipe.execute()

    def get(self, batch_id: str) -> BatchRecord | None:
        raw = self._r.get(batch_key(batch_id))
        return BatchRecord.model_validate_json(raw) if raw else None

    def list(self, after: str | None = None, limit: int = 20) -> tuple[list[BatchRecord], bool]:
        """Newest first, those created before ``after`` (a batch id); and whether more follow."""
        start = 0
        if after:
            rank = self._r.zrevrank(BATCHES, after)
            start = rank + 1 if rank is not None else 0
        ids = self._r.zrevrange(BATCHES, start, start + limit)
        raws = self._r.mget([batch_key(i) for i in ids]) if ids else []
        gone = [i for i, raw in zip(ids, raws) if raw is None]
        if gone:
            self._r.zrem(BATCHES, *gone)
        records = [BatchRecord.model_validate_json(raw) for raw in raws if raw]
        return records[:limit], len(records) > limit

    def active_ids(self) -> list[str]:
        return sorted(self._r.smembers(BATCHES_ACTIVE))

    def active(self) -> list[BatchRecord]:
        """The batches not yet in a final state (one SMEMBERS, one MGET)."""
        ids = self.active_ids()
        raws = self._r.mget([batch_key(i) for i in ids]) if ids else []
        return [BatchRecord.model_validate_json(raw) for raw in raws if raw]

    def update(self, batch_id: str, fn: Callable[[BatchRecord], BatchRecord | None]) -> BatchRecord | None:
        """Apply ``fn(record) -> record | None`` atomically; a final record is never passed
        to it. Returns the record as stored after (None if there is none)."""
        key = batch_key(batch_id)
        with self._r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    current = BatchRecord.model_validate_json(raw)
                    new = None if current.status in FINAL else fn(current.model_copy(deep=True))
                    if new is None:
                        pipe.unwatch()
                        return current
                    pipe.multi()
                    pipe.set(key, new.model_dump_json(), ex=self.ttl_s if new.status in FINAL else None)
                    if new.status in FINAL:
                        pipe.srem(BATCHES_ACTIVE, batch_id)
                        if new.webhook is not None and new.webhook.status == "pending":  # its end event is due
                            pipe.zadd(WEBHOOKS_DUE, {f"batch:{batch_id}": time.time()})
                        for part in ("jobs", "done", "closed", "lease"):
                            pipe.expire(batch_key(batch_id, part), 3600)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def move(self, batch_id: str, status: str, *, allowed_from: tuple[str, ...], **fields: object) -> BatchRecord | None:
        """Set ``status`` (stamping its ``<status>_at``) and ``fields`` if the status is one of
        ``allowed_from``; the record after (unchanged when not allowed)."""
        def apply(rec: BatchRecord) -> BatchRecord | None:
            if rec.status not in allowed_from:
                return None
            data = rec.model_dump()
            data.update(fields)
            data["status"] = status
            stamp = f"{status}_at"
            if stamp in Batch.model_fields and not data.get(stamp):
                data[stamp] = int(time.time())
            return BatchRecord.model_validate(data)

        return self.update(batch_id, apply)

    # ---- chunks ------------------------------------------------------------------------

    def claim_chunk(self, batch_id: str, chunk: int, job_id: str) -> str:
        """The job id of chunk ``chunk``: ``job_id`` if it had none, else the one it has."""
        key = batch_key(batch_id, "jobs")
        if self._r.hsetnx(key, str(chunk), job_id):
            return job_id
        return str(self._r.hget(key, str(chunk)))

    def chunk_jobs(self, batch_id: str) -> dict[int, str]:
        return {int(k): v for k, v in self._r.hgetall(batch_key(batch_id, "jobs")).items()}

    def mark_done(self, batch_id: str, chunk: int, done: ChunkDone) -> int | None:
        """Count chunk ``chunk`` (again: the same index is counted once); the number of chunks
        done, or None when the batch is already closed (the chunk is not counted)."""
        out = self._done(keys=[batch_key(batch_id, "done"), batch_key(batch_id, "closed")],
                         args=[str(chunk), done.model_dump_json()])
        return int(out) if out else None

    def done(self, batch_id: str) -> dict[str, ChunkDone]:
        raw = self._r.hgetall(batch_key(batch_id, "done"))
        return {k: ChunkDone.model_validate_json(v) for k, v in raw.items()}

    def close(self, batch_id: str) -> dict[int, ChunkDone]:
        """Close the batch to late chunks and read the done marks, atomically."""
        with self._r.pipeline() as pipe:
            pipe.set(batch_key(batch_id, "closed"), "1", ex=self.ttl_s)
            pipe.hgetall(batch_key(batch_id, "done"))
            _, raw = pipe.execute()
        return {int(k): ChunkDone.model_validate_json(v) for k, v in raw.items()}

    def closed(self, batch_id: str) -> bool:
        return bool(self._r.exists(batch_key(batch_id, "closed")))

    # ---- who advances it ---------------------------------------------------------------

    def lease(self, batch_id: str, holder: str, ttl_s: int) -> bool:
        """Take (or, for its holder, extend) the right to advance the batch for ``ttl_s``."""
        key = batch_key(batch_id, "lease")
        if self._r.set(key, holder, nx=True, ex=ttl_s):
            return True
        if self._r.get(key) == holder:
            self._r.expire(key, ttl_s)
            return True
        return False

    def release(self, batch_id: str, holder: str) -> None:
        key = batch_key(batch_id, "lease")
        if self._r.get(key) == holder:
            self._r.delete(key)

    def leased(self, batch_id: str) -> bool:
        return bool(self._r.exists(batch_key(batch_id, "lease")))


def operation_row(batch: BatchRecord, done: dict[str, ChunkDone], now_s: float) -> dict[str, Any]:
    """A running batch as a row of ``GET /api/operations`` (kind ``batch``): lines done of its
    total, its rate since it started running (lines/s) and the time left at that rate (s). From
    Valkey alone, so every replica shows the same row."""
    completed, failed, _ = tally(done)
    lines, total = completed + failed, batch.request_counts.total
    started = batch.in_progress_at or batch.created_at
    elapsed_s = max(0.0, now_s - started)
    rate = lines / elapsed_s if lines and elapsed_s > 0 else None
    eta = round((total - lines) / rate, 1) if rate else None
    stamp = datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"id": batch.id, "kind": "batch", "model": ",".join(batch.models) or None, "node": None, "job": batch.id,
            "phase": batch.status, "progress": round(100.0 * lines / total, 1) if total else None,
            "message": f"{lines}/{total} lines ({failed} failed)", "error": None, "started_at": stamp,
            "updated_at": stamp, "lines_done": lines, "lines_total": total,
            "rate_lps": round(rate, 2) if rate else None, "eta_s": eta, "live": False}


def output_line(custom_id: str, body: dict[str, Any], status_code: int = 200) -> bytes:
    """One line of a batch's output file."""
    request_id = uuid.uuid4().hex
    return json.dumps({"id": f"batch_req_{request_id}", "custom_id": custom_id,
                       "response": {"status_code": status_code, "request_id": request_id, "body": body},
                       "error": None}, separators=(",", ":")).encode() + b"\n"


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """One line of a batch's error file."""
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
                       "error": {"code": code, "message": message}}, separators=(",", ":")).encode() + b"\n"
