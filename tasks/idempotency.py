"""``Idempotency-Key``: the same key with the same request, within ``MODELBAY_IDEMPOTENCY_TTL_S``,
answers with what the first request created (a job, a batch, a file) instead of creating again.

One Redis key per (scope, key): ``mb:idem:<scope>:<sha256(key)>`` (:mod:`tasks.keys`), whose
value is ``{"h": <the request's hash>, "id": <what it created, "" while creating>}``. The first
request takes it with ``SET NX`` (a *pending* marker, expiring after :data:`PENDING_S` so a
request that died while creating does not hold the key for good), creates, then writes the id
(:meth:`IdempotencyKeys.idem_done`, the key then lives ``idempotency_ttl_s``). A concurrent
request with the key (another replica) that finds it pending polls for the id, up to
``idempotency_wait_s``, then answers 409 ``idempotency_key_in_use``. A request whose hash
differs answers 422 ``idempotency_key_reused``. ``scope``: the caller's API key (hashed), so
two tenants never share a key; the hash covers the method, the path and the body.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import redis

from tasks.errors import Conflict, ErrorCode, InvalidRequest, Unprocessable
from tasks.keys import idempotency_key
from tasks.settings import Settings

PENDING_S = 60     # how long a pending marker outlives a request that died while creating, seconds
POLL_S = 0.05      # how often a request that found the key pending looks again, seconds
MAX_KEY_CHARS = 255


@dataclass
class Claim:
    """The outcome of :meth:`IdempotencyKeys.idem_claim`: ``first`` (create, then
    :meth:`~IdempotencyKeys.idem_done`), or the ``id`` the first request created (replay it)."""

    key: str
    digest: str
    first: bool
    id: str = ""


def request_digest(*parts: bytes) -> str:
    """The hash two requests must share to be the same request (sha256 hex)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


class IdempotencyKeys:
    """Idempotency keys (a mixin of :class:`tasks.store.Store`, via ``NodeStore``)."""

    _r: redis.Redis
    settings: Settings

    def idem_claim(self, scope: str, key: str, digest: str) -> Claim:
        """Take ``key`` for a request hashing to ``digest``, or find what its first request made.
        Raises 400 (a key over 255 characters), 422 (same key, other request) or 409 (the first
        request still creating after ``idempotency_wait_s``)."""
        if not 0 < len(key) <= MAX_KEY_CHARS:
            raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters", param="Idempotency-Key")
        rkey = idempotency_key(scope, hashlib.sha256(key.encode()).hexdigest())
        pending = json.dumps({"h": digest, "id": ""})
        deadline = time.monotonic() + self.settings.idempotency_wait_s
        while True:
            if self._r.set(rkey, pending, nx=True, ex=min(PENDING_S, self.settings.idempotency_ttl_s)):
                return Claim(rkey, digest, True)
            raw = self._r.get(rkey)
            if raw is None:
                continue  # it expired in between: take it
            held = json.loads(raw)
            if held.get("h") != digest:
                raise Unprocessable("this Idempotency-Key was used with a different request; use a new key",
                                    param="Idempotency-Key", code=ErrorCode.IDEMPOTENCY_KEY_REUSED)
            if held.get("id"):
                return Claim(rkey, digest, False, str(held["id"]))
            if time.monotonic() > deadline:
                raise Conflict("the first request with this Idempotency-Key is still being answered; retry",
                               param="Idempotency-Key", code=ErrorCode.IDEMPOTENCY_KEY_IN_USE,
                               headers={"Retry-After": "1"})
            time.sleep(POLL_S)

    def idem_done(self, claim: Claim, created_id: str) -> None:
        """The first request created ``created_id``: later ones with the key get it."""
        self._r.set(claim.key, json.dumps({"h": claim.digest, "id": created_id}),
                    ex=self.settings.idempotency_ttl_s)

    def idem_release(self, claim: Claim) -> None:
        """The first request created nothing (it failed): the key is free again. What it
        created, if another request's id is there by now, stays."""
        if claim.first and self._r.get(claim.key) == json.dumps({"h": claim.digest, "id": ""}):
            self._r.delete(claim.key)

    def idem_forget(self, claim: Claim) -> None:
        """What the key names is gone (expired before the key): the key is free again."""
        self._r.delete(claim.key)
