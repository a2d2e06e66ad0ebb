"""A small HTTP client of the modelbay API for the CLI: JSON calls and the operations stream.

Standard library only (``urllib``), so the CLI needs nothing the server does not. Errors come
back as :class:`ApiError` carrying the envelope's status, code and message.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any


class ApiError(Exception):
    """A 4xx/5xx answer: ``status``, the envelope's ``code`` and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Client:
    """``base_url`` like ``http://127.0.0.1:8080``; ``api_key`` sent as a bearer token."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 timeout_s: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers=headers or {})
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        return urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s)  # noqa: S310 - http(s) only

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout_s: float | None = None) -> Any:
        """The decoded JSON answer; raises :class:`ApiError` on an error status."""
        try:
            with self._request(method, path, body, headers, timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                error = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": raw.decode(errors="replace")[:200] or exc.reason}
            raise ApiError(exc.code, error.get("code", "error"), error.get("message", "")) from None
        return json.loads(raw) if raw else None

    def job(self, job_id: str, wait_s: float = 0) -> dict[str, Any]:
        query = f"?wait={wait_s:g}" if wait_s else ""
        return self.call("GET", f"/v1/jobs/{job_id}{query}", timeout_s=wait_s + self.timeout_s)

    def operations(self, timeout_s: float = 20.0) -> Iterator[list[dict[str, Any]]]:
        """The rows of ``/api/operations/stream``, one list per event (the snapshot first);
        ends when the server ends the stream. Raises ``TimeoutError`` after ``timeout_s``
        seconds without a byte (the server sends a heartbeat every 15 s)."""
        with self._request("GET", "/api/operations/stream", timeout_s=timeout_s) as resp:
            for raw in resp:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: "):
                    yield json.loads(line[6:]).get("operations", [])


def quote_name(name: str) -> str:
    """A model name in a URL path: ``/`` stays (the routes take nested names)."""
    return urllib.parse.quote(name, safe="/:@+")
