"""Bearer API keys (``MODELBAY_API_KEYS``): every route but the health probes needs one."""
from __future__ import annotations

import hmac

from flask import Flask, request

from tasks.errors import Unauthorized

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def init_app(app: Flask, keys: list[str]) -> None:
    if not keys:
        return
    encoded = [k.encode() for k in keys]

    @app.before_request
    def _require_key() -> None:
        if request.path in OPEN_PATHS:
            return
        header = request.headers.get("Authorization", "")
        token = header[7:].strip().encode() if header.lower().startswith("bearer ") else b""
        # Compare against every key, always, so timing does not tell which one nearly matched.
        ok = False
        for key in encoded:
            ok |= hmac.compare_digest(token, key)
        if not ok:
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>",
                               headers={"WWW-Authenticate": "Bearer"})
