"""modelbay's gunicorn worker: gthread, with a kept-alive connection's next request served by
the thread that answered the last one (``--worker-class web.gthread.Worker``).

gunicorn's gthread hands a kept-alive connection back to its main thread after each
response. The next request then takes three thread hand-offs: the main thread's poller
wakes, it queues the connection for the pool, and a pool thread wakes to serve it (and a
fourth, off the path, to put the connection back). A client that sends its next request at
once (the job path's ``POST`` then ``GET ?wait``, any client in a loop) pays them on every
request: on 2 cores about 0.1 ms of latency and 0.02–0.06 ms of CPU per request, of the
0.3 ms that gunicorn costs for a trivial one (docs/benchmarks.md, "Sixth round").

So after a response that keeps the connection, the thread waits up to
``MODELBAY_WEB_LINGER_MS`` for the next request on that connection and serves it itself.
Nothing else changes: a connection with nothing to read by then goes back to the poller as
before. A thread lingers only while another thread of the pool is free, so a request on
another connection finds a thread at once unless every thread is held, and then waits at most
the linger for one. HTTP/2 connections keep gunicorn's own path.
"""
from __future__ import annotations

import select
import ssl
import threading

from gunicorn.workers.gthread import TConn, ThreadWorker

from tasks.settings import load_settings


def next_request_ready(conn: TConn, timeout_s: float) -> bool:
    """Whether the connection's next request has begun to arrive within ``timeout_s``
    seconds: bytes read ahead by the parser, bytes TLS has decrypted, or a readable socket
    (a client that closed counts: the parser then ends the connection)."""
    if conn.parser is not None and conn.parser.unreader.buf.getvalue():
        return True
    sock = conn.sock
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()  # one system call per wait (an epoll selector takes four), any fd number
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000.0))
    except (OSError, ValueError):  # closed under us
        return False


class Worker(ThreadWorker):
    """gunicorn's ``gthread`` worker whose threads linger on a kept-alive connection; see
    the module docstring."""

    def init_process(self) -> None:
        self.linger_s = load_settings().web_linger_ms / 1000.0
        self._held_lock = threading.Lock()
        self._held = 0  # threads serving or lingering on a connection
        super().init_process()

    def handle(self, conn: TConn) -> object:
        with self._held_lock:
            self._held += 1
        try:
            keep = super().handle(conn)
            while keep is True and self.alive and self.linger_s > 0 and not conn.is_http2 and self._may_linger():
                if not next_request_ready(conn, self.linger_s):
                    break
                keep = super().handle(conn)
            return keep
        finally:
            with self._held_lock:
                self._held -= 1

    def _may_linger(self) -> bool:
        """True while another thread of the pool is free for a request on another connection."""
        with self._held_lock:
            return self._held < self.cfg.threads
