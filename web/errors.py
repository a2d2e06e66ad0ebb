"""One error shape for every route: ``{"error": {type, code, message, param}}``."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from tasks.errors import (InvalidRequest, MethodNotAllowed, ModelbayError, NotFound,
                          PayloadTooLarge, Unavailable, UnsupportedMediaType)

log = logging.getLogger("modelbay.web")

_HTTP = {400: InvalidRequest, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge,
         415: UnsupportedMediaType}


def respond(err: ModelbayError):
    response = jsonify(err.envelope())
    response.status_code = err.status
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def init_app(app: Flask) -> None:
    @app.errorhandler(ModelbayError)
    def _modelbay(err: ModelbayError):
        return respond(err)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException):
        status = err.code or 500
        kind = _HTTP.get(status)
        if kind is None:
            e = ModelbayError(err.description or err.name)
            e.status = status
            return respond(e)
        message = {404: "no such route", 405: "method not allowed on this route",
                   413: "request body too large"}.get(status, err.description or err.name)
        return respond(kind(message))

    @app.errorhandler(redis.RedisError)
    def _redis(err: redis.RedisError):
        log.warning("Redis unavailable: %s", err)
        return respond(Unavailable("the job store is unreachable, retry shortly", code="store_unavailable"))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unhandled error")
        return respond(ModelbayError("internal error; see the server log"))
