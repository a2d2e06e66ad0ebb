"""The HTTP client of the modelbay API, for the CLI, ``modelbay up`` and the benchmarks: JSON
calls, jobs followed to their end, models registered, loaded and unloaded, and the operations
stream.

It speaks HTTP with the standard library (``urllib``), so the CLI needs nothing the server
does not. Errors come back as :class:`ApiError` carrying the envelope's status, code and message.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from tasks.schemas import TERMINAL


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

    def wait(self, job: dict[str, Any], wait_s: float = 30) -> dict[str, Any]:
        """``job`` (a job record) long-polled until its status is terminal; the last record."""
        while job["status"] not in TERMINAL:
            job = self.job(job["id"], wait_s)
        return job

    def register(self, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """``PUT /v1/models/{name}``: register (or replace) a manifest."""
        return self.call("PUT", f"/v1/models/{quote_name(name)}", manifest)

    def load(self, name: str, node: str | None = None) -> dict[str, Any] | None:
        """Ask for ``name`` to be loaded (on ``node``, when given): the load job, or None when
        the model is ready already."""
        body = self.call("POST", f"/v1/models/{quote_name(name)}/load", {"node": node} if node else None)
        return body if body.get("kind") == "load" else None

    def unload(self, name: str) -> list[dict[str, Any]]:
        """Ask for ``name`` to be unloaded from every node: the unload jobs (none where it is
        held nowhere)."""
        return self.call("POST", f"/v1/models/{quote_name(name)}/unload")["data"]

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
