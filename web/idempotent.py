"""The routes' side of ``Idempotency-Key`` (:mod:`tasks.idempotency`): the caller's scope, the
request's hash, and :func:`once`, which creates once and replays after."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from flask import request

from tasks.idempotency import Claim, request_digest
from web.extensions import mb

T = TypeVar("T")
HEADER = "Idempotency-Key"
REPLAYED = {"Idempotent-Replayed": "true"}


def scope() -> str:
    """Whose keys: the bearer token's hash when API keys are set (each tenant its own keys),
    else one scope for everyone."""
    if not mb().settings.api_keys:
        return "-"
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def claim(*extra: bytes) -> Claim | None:
    """This request's claim of its ``Idempotency-Key`` (None without one). The hash covers the
    method, the path and ``extra`` (by default the body)."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    parts = extra or (request.get_data(cache=True),)
    return mb().store.idem_claim(scope(), key.strip(), request_digest(request.method.encode(), request.path.encode(),
                                                                        *parts))


def once(make: Callable[[], T], find: Callable[[str], T | None], ident: Callable[[T], str],
         take: Callable[[], Claim | None] = claim) -> tuple[T, bool]:
    """``(thing, replayed)``: what this request's ``Idempotency-Key`` created before (``find``
    by its id), or ``make()``'s new thing, remembered under the key. Without a key, ``make()``.
    ``take``: how the request claims its key (default: :func:`claim`, hashing the body)."""
    store = mb().store
    for _ in range(3):
        got = take()
        if got is None:
            return make(), False
        if got.first:
            break
        found = find(got.id)
        if found is not None:
            return found, True
        store.idem_forget(got)  # what it named expired before the key: create again
    else:
        return make(), False
    try:
        made = make()
    except BaseException:
        store.idem_release(got)
        raise
    store.idem_done(got, ident(made))
    return made, False
