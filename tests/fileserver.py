"""A small HTTP file server for staging tests: throttling, dropped connections, redirects,
Range and If-Range (see :class:`FileServer`)."""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """A tiny HTTP file server. ``files``: path → bytes; ``redirects``: path → Location.
    ``rate_bps`` throttles bodies; ``drop_after[path]`` closes the first response of ``path``
    after that many body bytes; ``ignore_range`` answers 200 to ranged requests. ``requests``
    records ``(path, Range header)`` of every GET."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.status: dict[str, int] = {}
        self.rate_bps: float | None = None
        self.drop_after: dict[str, int] = {}
        self.ignore_range = False
        self.replace_after_drop: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def gets(self, path: str) -> list[str | None]:
        with self.lock:
            return [rng for p, rng in self.requests if p == path]

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path, rng = req.path, req.headers.get("Range")
        with self.lock:
            first = all(p != path for p, _ in self.requests)
            self.requests.append((path, rng))
        if path in self.status:
            req.send_response(self.status[path])
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        if path in self.redirects:
            req.send_response(302)
            req.send_header("Location", self.redirects[path])
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        data = self.files.get(path)
        if data is None:
            req.send_error(404)
            return
        etag = f'"{sha(data)[:16]}"'
        if_range = req.headers.get("If-Range")
        start = 0
        if rng and not self.ignore_range and if_range in (None, etag):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            req.send_response(206)
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            req.send_response(200)
        req.send_header("Content-Length", str(len(data) - start))
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("ETag", etag)
        req.end_headers()
        body = memoryview(data)[start:]
        limit = self.drop_after.get(path) if first else None
        sent, began, step = 0, time.monotonic(), 16 << 10
        while sent < len(body):
            n = min(step, len(body) - sent) if limit is None else min(step, len(body) - sent, limit - sent)
            if n <= 0:  # drop the connection mid-body
                if path in self.replace_after_drop:
                    self.files[path] = self.replace_after_drop.pop(path)
                req.wfile.flush()
                req.connection.shutdown(socket.SHUT_RDWR)
                req.close_connection = True
                return
            try:
                req.wfile.write(body[sent:sent + n])
            except OSError:
                return
            sent += n
            if self.rate_bps:
                ahead = sent / self.rate_bps - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)  # throttling the server, not synchronising the test

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, not all one byte
    return (block * (size // len(block) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
