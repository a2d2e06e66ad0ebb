"""One error shape for every route: ``{"error": {type, code, message, param}}``.

A body over ``MODELBAY_MAX_BODY_MB`` is answered 413 only after the rest of it has been read
and discarded (at most ``DRAIN_PAST_LIMIT_BYTES`` past the limit), with ``Connection: close``
(gunicorn drops that header and decides itself: it keeps a connection whose body was read).
Clients that send the whole body before reading (urllib, ``requests``: no ``Expect:
100-continue``) would otherwise see a reset or a broken pipe instead of the 413: closing a
socket with unread bytes in its buffer makes the kernel send RST, and the answer is lost.
Reading the bytes costs no more than accepting a body just under the limit would; a body
announced larger than the bound is not read at all, and its client may see the reset.
"""
from __future__ import annotations

import logging
from typing import IO

import redis
from kombu.exceptions import OperationalError
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from tasks.errors import (ErrorCode, InvalidRequest, MethodNotAllowed, ModelbayError, NotFound,
                          PayloadTooLarge, Unavailable, UnsupportedMediaType)

log = logging.getLogger("modelbay.web")

DRAIN_PAST_LIMIT_BYTES = 64 << 20  # the most of a too-large body read (and dropped) past the limit
DRAIN_CHUNK_BYTES = 1 << 16

_HTTP = {400: InvalidRequest, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
         415: UnsupportedMediaType}


def respond(err: ModelbayError):
    response = jsonify(err.envelope())
    response.status_code = err.status
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def drain_body(limit_bytes: int) -> None:
    """Read and discard what is left of the request's body, up to ``DRAIN_PAST_LIMIT_BYTES``
    past ``limit_bytes``, never past its ``Content-Length`` (a server that does not end
    ``wsgi.input`` there would block). A chunked body is read to its end only where the
    server marks the input terminated (gunicorn does)."""
    stream: IO[bytes] | None = request.environ.get("wsgi.input")
    length = request.content_length
    bound = limit_bytes + DRAIN_PAST_LIMIT_BYTES
    if stream is None or (length is not None and length > bound):
        return
    if length is None and not request.environ.get("wsgi.input_terminated"):
        return
    left = bound if length is None else length
    try:
        while left > 0:
            chunk = stream.read(min(DRAIN_CHUNK_BYTES, left))
            if not chunk:
                return
            left -= len(chunk)
    except (OSError, ValueError):  # the client went away: nothing left to answer
        log.debug("the client left while its too-large body was being read")


def too_large(limit_bytes: int, limit_mb: float) -> Response:
    """The 413, once the body has been read: it names the limit and its setting."""
    drain_body(limit_bytes)
    limit = f"{limit_mb:g} MB ({limit_bytes} bytes, MODELBAY_MAX_BODY_MB)"
    length = request.content_length
    response = respond(PayloadTooLarge(f"the request body is {length} bytes; the limit is {limit}" if length is not None
                                       else f"the request body is over the limit of {limit}"))
    response.headers["Connection"] = "close"
    return response


def init_app(app: Flask) -> None:
    @app.errorhandler(ModelbayError)
    def _modelbay(err: ModelbayError):
        return respond(err)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException):
        status = err.code or 500
        kind = _HTTP.get(status)
        if status == 413:
            settings = app.extensions["modelbay"].settings
            return too_large(settings.max_body_bytes, settings.max_body_mb)
        if kind is None:
            e = ModelbayError(err.description or err.name)
            e.status = status
            return respond(e)
        message = {404: "no such route", 405: "method not allowed on this route"}.get(status, err.description or
                                                                                    err.name)
        return respond(kind(message))

    # Every Redis error that outlives the store's retries, a restart's or a Sentinel
    # failover's (ConnectionError, TimeoutError, READONLY from a demoted master,
    # MasterNotFoundError), and a task publish that found no broker (kombu's
    # OperationalError), is a 503 store_unavailable with Retry-After, never a 500.
    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)
    def _redis(err: Exception):
        log.warning("Redis unavailable: %s", err)
        return respond(Unavailable("the job store is unreachable, retry shortly", code=ErrorCode.STORE_UNAVAILABLE))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unhandled error")
        return respond(ModelbayError("internal error; see the server log"))
