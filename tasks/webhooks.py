"""Webhooks: the end event of a job or batch, signed, and the outbox its delivery runs from.

A job (``POST /v1/jobs``) or batch (``POST /v1/batches``) that names a ``callback_url``, or any
of them when ``MODELBAY_WEBHOOK_URLS`` is set, carries ``webhook: {status: pending, ...}`` in
its record from the start. When it ends, one event goes to each target: OpenAI's event shape
(``{"id": "evt_…", "object": "event", "created_at", "type", "data": {"id": …}}``; a job's
``data`` also holds its ``status`` and ``error``), signed per Standard Webhooks with
``MODELBAY_WEBHOOK_SECRET`` (headers ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, the key being
the base64 after ``whsec_``). The event id is the same on every try (``evt_<job or batch id>``).

The outbox is ``mb:webhooks``, a sorted set ``job:<id>`` / ``batch:<id>`` → when to look next
(epoch seconds), with ``mb:webhooks:lease`` (hash member → lease end) for the entries a worker
is posting now. The web adds a job's entry when it is submitted (due ``webhook_recheck_s``
later: the safety net), the worker that ends the job moves it to now; a batch's entry is added
in the same MULTI as its final state. Every worker's deliverer (``workers/webhooks.py``) claims
due entries (leased for one round), posts, writes the outcome into the record's ``webhook``
and reschedules or removes the entry in one MULTI: a worker killed anywhere in between leaves
an entry that comes due again, so an event is delivered at least once.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import redis

from tasks.batches import FINAL, BatchRecord
from tasks.errors import ErrorCode, InvalidRequest
from tasks.keys import WEBHOOKS_DUE, batch_key, job_key
from tasks.netguard import blocked_host
from tasks.schemas import JobRecord, WebhookState
from tasks.settings import Settings, env_name

JOB_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired")
LEASES = f"{WEBHOOKS_DUE}:lease"
USER_AGENT = "modelbay-webhooks"

_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], m)
  redis.call('HSET', KEYS[2], m, ARGV[2])
end
return due
"""
_SCHEDULE = """
local lease = redis.call('HGET', KEYS[2], ARGV[1])
if lease and tonumber(lease) > tonumber(ARGV[3]) then return 0 end
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not s) or tonumber(s) > tonumber(ARGV[2]) then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) end
return 1
"""


def job_member(job_id: str) -> str:
    return f"job:{job_id}"


def batch_member(batch_id: str) -> str:
    return f"batch:{batch_id}"


# ---- targets and the SSRF guard -------------------------------------------------------

def url_problem(url: str, allow_private: bool) -> str | None:
    """Why ``url`` may not be a webhook target, or None. Without DNS (the deliverer resolves
    and checks every address it connects to): the scheme, the host, and a literal loopback,
    private or link-local address or ``localhost`` unless ``allow_private``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not host:
        return "has no host"
    reason = None if allow_private else blocked_host(host)
    if reason:
        return (f"points at {reason}; webhooks to loopback, private and link-local addresses are refused "
                f"unless {env_name('allow_private_webhooks')} is set")
    return None


def check_callback_url(url: str | None, settings: Settings) -> None:
    """Raise a 400 ``invalid_callback_url`` (param ``callback_url``) for a refused target."""
    if url is None:
        return
    problem = url_problem(url, settings.allow_private_webhooks)
    if problem:
        raise InvalidRequest(f"callback_url {problem}", param="callback_url", code=ErrorCode.INVALID_CALLBACK_URL)


def pending(callback_url: str | None, settings: Settings) -> WebhookState | None:
    """The ``webhook`` of a new job or batch: pending when anyone is to hear of its end."""
    return WebhookState() if callback_url or settings.webhook_url_list else None


def targets(callback_url: str | None, settings: Settings) -> list[str]:
    """Where an event goes: the record's ``callback_url`` first, then the operator's URLs."""
    return ([callback_url] if callback_url else []) + settings.webhook_url_list


# ---- the event and its signature -------------------------------------------------------

def _epoch(iso: str | None) -> int:
    if not iso:
        return int(time.time())
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def job_event(record: JobRecord) -> dict[str, Any]:
    """``job.<status>`` of an ended job; ``created_at``: when it ended (epoch seconds)."""
    error = record.error.model_dump(mode="json") if record.error is not None else None
    return {"id": f"evt_{record.id}", "object": "event", "created_at": _epoch(record.finished_at),
            "type": f"job.{record.status}",
            "data": {"id": record.id, "object": "job", "status": record.status, "error": error}}


def batch_event(record: BatchRecord) -> dict[str, Any]:
    """``batch.<status>`` of a batch in a final state, as OpenAI sends it."""
    ended = getattr(record, f"{record.status}_at", None)
    return {"id": f"evt_{record.id}", "object": "event", "created_at": int(ended or time.time()),
            "type": f"batch.{record.status}", "data": {"id": record.id}}


def body_of(event: dict[str, Any]) -> bytes:
    """The event as posted: compact JSON, the same bytes on every try."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' ``v1,<base64 HMAC-SHA256>`` of ``"{id}.{timestamp}.{body}"``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def headers(msg_id: str, body: bytes, secret: str, now_s: float | None = None) -> dict[str, str]:
    """The headers of one post: the timestamp is the post's own (receivers refuse old ones),
    the id the event's; no ``webhook-signature`` without a secret."""
    timestamp = int(now_s if now_s is not None else time.time())
    out = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
           "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if secret:
        out["webhook-signature"] = signature(secret, msg_id, timestamp, body)
    return out


# ---- retries ---------------------------------------------------------------------------

def retryable(status: int) -> bool:
    """A 5xx, 408 or 429 is retried; any other answer that is not 2xx stops the retries."""
    return status >= 500 or status in (408, 429)


def backoff_s(attempts: int, base_s: float, max_s: float, rand: Callable[[], float]) -> float:
    """Seconds before the next round after ``attempts`` rounds: ``base_s`` doubling, capped at
    ``max_s``, jittered to between half and all of it."""
    full = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return full / 2 + rand() * full / 2


def advance(state: WebhookState, outcomes: dict[int, tuple[bool, str | None]], ended_s: float, now_s: float,
            settings: Settings, rand: Callable[[], float]) -> tuple[WebhookState, float | None]:
    """The state after one round and when to post again (None: done). ``outcomes``: target
    index → (retry, error), error None when it took the event. Pending while a target may
    still take it; then delivered, or failed when one refused it or the retries ran out."""
    new = state.model_copy(deep=True)
    new.attempts += 1
    errors = [error for _, (_, error) in sorted(outcomes.items()) if error is not None]
    for index, (retry, error) in outcomes.items():
        if error is None:
            new.done = sorted({*new.done, index})
        elif not retry:
            new.refused = sorted({*new.refused, index})  # a refusal stands; the others are still tried
    if errors:
        new.last_error = errors[-1]
    if all(i in new.done or i in new.refused for i in outcomes):
        new.status = "failed" if new.refused else "delivered"
        return new, None
    wait_s = backoff_s(new.attempts, settings.webhook_backoff_base_s, settings.webhook_backoff_max_s, rand)
    if now_s + wait_s > ended_s + settings.webhook_retry_s:
        new.status = "failed"
        new.last_error = (f"gave up after {new.attempts} attempt(s) in {env_name('webhook_retry_s')}="
                          f"{settings.webhook_retry_s:g}s: {new.last_error or 'no answer'}")
        return new, None
    return new, now_s + wait_s


# ---- the outbox ------------------------------------------------------------------------

def _record_key(member: str) -> str:
    kind, _, ident = member.partition(":")
    return job_key(ident) if kind == "job" else batch_key(ident)


class Outbox:
    """The webhook outbox in Valkey (see the module docstring). Thread-safe."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._claim = client.register_script(_CLAIM)
        self._schedule = client.register_script(_SCHEDULE)

    def schedule(self, member: str, at_s: float) -> None:
        """Look at ``member`` at ``at_s`` (epoch seconds), or earlier if it is due earlier
        already; nothing while a deliverer holds its lease (that one settles it)."""
        self._schedule(keys=[WEBHOOKS_DUE, LEASES], args=[member, at_s, time.time()])

    def claim(self, now_s: float, lease_s: float, limit: int = 16) -> list[str]:
        """The entries due by ``now_s``, leased to the caller for ``lease_s`` seconds."""
        return list(self._claim(keys=[WEBHOOKS_DUE, LEASES], args=[now_s, now_s + lease_s, limit]))

    def record(self, member: str) -> JobRecord | BatchRecord | None:
        raw = self._r.get(_record_key(member))
        return None if raw is None else self._parse(member, raw)

    @staticmethod
    def _parse(member: str, raw: str) -> JobRecord | BatchRecord:
        return JobRecord.model_validate_json(raw) if member.startswith("job:") else BatchRecord.model_validate_json(raw)

    def settle(self, member: str, state: WebhookState | None, next_s: float | None, running: bool = False) -> None:
        """Write ``state`` into the record's ``webhook`` (when given; the record keeps its
        expiry), and look again at ``next_s`` or drop the entry, atomically. ``running``: the
        caller found it running; if it has ended since (its end announced while the caller
        held the lease, which the announcement leaves alone), look again now instead."""
        key = _record_key(member)
        with self._r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if running and raw is not None and ended(self._parse(member, raw)):
                        next_s = time.time()
                    pipe.multi()
                    if raw is not None and state is not None:
                        data = json.loads(raw)
                        data["webhook"] = state.model_dump(mode="json")
                        pipe.set(key, json.dumps(data, separators=(",", ":"), ensure_ascii=False), keepttl=True)
                    if next_s is None:
                        pipe.zrem(WEBHOOKS_DUE, member)
                    else:
                        pipe.zadd(WEBHOOKS_DUE, {member: next_s})
                    pipe.hdel(LEASES, member)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def due_count(self) -> int:
        return int(self._r.zcard(WEBHOOKS_DUE))


def ended(record: JobRecord | BatchRecord) -> bool:
    return record.terminal if isinstance(record, JobRecord) else record.status in FINAL


def watch_job(outbox: Outbox, record: JobRecord, settings: Settings) -> None:
    """A new job with a webhook: its entry, due ``webhook_recheck_s`` from now (the safety net
    for an end that no worker announces: a worker killed just after it, the reaper's
    failures). Nothing, no round trip, for a job without one."""
    if record.webhook is not None:
        outbox.schedule(job_member(record.id), time.time() + settings.webhook_recheck_s)


def job_ended(outbox: Outbox, record: JobRecord | None) -> None:
    """A job just ended: its event is due now (when it has a webhook still pending)."""
    if record is not None and record.terminal and record.webhook is not None and record.webhook.status == "pending":
        outbox.schedule(job_member(record.id), time.time())
