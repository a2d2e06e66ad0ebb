"""Bearer API keys (``MODELBAY_API_KEYS``): every route but the health probes needs one."""
from __future__ import annotations

import hmac

from flask import Flask, request

from tasks.errors import Unauthorized

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_PREFIXES = ("/ui/",)  # the operations page's files; the data they fetch needs the key


def is_open(path: str) -> bool:
    """True for the routes that need no key: the probes and the operations page's files."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def init_app(app: Flask, keys: list[str], open_metrics: bool = False) -> None:
    """With ``keys``, every route but the probes (and ``/metrics`` when ``open_metrics``,
    the ``MODELBAY_METRICS_OPEN`` setting) needs ``Authorization: Bearer <key>``."""
    if not keys:
        return
    encoded = [k.encode() for k in keys]
    metrics_open = {"/metrics"} if open_metrics else set()

    @app.before_request
    def _require_key() -> None:
        if is_open(request.path) or request.path in metrics_open:
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
