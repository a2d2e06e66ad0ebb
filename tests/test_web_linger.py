"""modelbay's gunicorn worker (web/gthread.py) on a real gunicorn: after a response that keeps
the connection, the thread waits for that connection's next request and serves it itself,
but only while another thread is free, so no other connection waits for it.

gunicorn serves :func:`app` below (this module), which answers with the name of the thread
that served the request, with 2 threads and a 1 s linger: long enough that a request stuck
behind a lingering thread would show.
"""
from __future__ import annotations

import http.client
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from helpers import poll
from modelbay.services import Started, free_port
from modelbay.stack import LocalStack

LINGER_MS = 1000
PROMPTLY_S = LINGER_MS / 1000 / 2  # well before a lingering thread would give up


def app(environ: dict[str, object], start_response: Callable[[str, list[tuple[str, str]]], object]) -> Iterable[bytes]:
    """The WSGI app gunicorn serves in these tests: the serving thread's name."""
    body = threading.current_thread().name.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture(scope="module")
def server(local_stack: LocalStack) -> Iterator[tuple[str, int]]:
    port = free_port()
    here = Path(__file__).parent
    started: Started = local_stack.spawn(
        "linger-web", [sys.executable, "-m", "gunicorn", "test_web_linger:app", "--chdir", str(here),
                       "--worker-class", "web.gthread.Worker", "--workers", "1", "--threads", "2",
                       "--bind", f"127.0.0.1:{port}"],
        {"MODELBAY_WEB_LINGER_MS": str(LINGER_MS), "PYTHONPATH": str(here.parent)})
    poll(lambda: _answers(port), 30, "gunicorn with web.gthread.Worker to answer")
    try:
        yield "127.0.0.1", port
    finally:
        local_stack.stop(started)


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except OSError:
        return False


def get(conn: http.client.HTTPConnection) -> tuple[str, float]:
    """The serving thread's name and the seconds the request took."""
    began = time.monotonic()
    conn.request("GET", "/")
    response = conn.getresponse()
    body = response.read().decode()
    assert response.status == 200
    return body, time.monotonic() - began


def test_a_kept_alive_connection_is_served_by_the_thread_that_lingers_on_it(server: tuple[str, int]) -> None:
    a, b, c = (http.client.HTTPConnection(*server, timeout=10) for _ in range(3))
    try:
        first, _ = get(a)       # its thread now waits on a for up to LINGER_MS
        other, _ = get(b)       # so b is served by the other thread...
        assert other != first
        again, took = get(a)    # ...and a's next request by the thread still waiting on it
        assert again == first and took < PROMPTLY_S
        # Both threads are held (one lingers on a, the other may not): a third connection is
        # served at once, not after a linger runs out.
        _, took = get(c)
        assert took < PROMPTLY_S, f"a new connection waited {took:.2f}s for a lingering thread"
    finally:
        for conn in (a, b, c):
            conn.close()


def test_pipelined_requests_are_served_at_once(server: tuple[str, int]) -> None:
    """Two requests in one packet: the second is already read ahead, not waited for."""
    with socket.create_connection(server, timeout=10) as sock:
        began = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 2 and time.monotonic() - began < 5:
            data += sock.recv(65536)
        took = time.monotonic() - began
    assert data.count(b"HTTP/1.1 200 OK") == 2, data
    assert took < PROMPTLY_S, f"the second pipelined request waited {took:.2f}s"


def test_a_client_that_goes_while_a_thread_lingers_frees_the_thread(server: tuple[str, int]) -> None:
    for _ in range(3):  # more times than there are threads: a leaked thread would stall a later round
        gone = http.client.HTTPConnection(*server, timeout=10)
        get(gone)
        gone.close()
        fresh = [http.client.HTTPConnection(*server, timeout=10) for _ in range(2)]
        try:
            for conn in fresh:
                _, took = get(conn)
                assert took < PROMPTLY_S, f"a request waited {took:.2f}s after a client left"
        finally:
            for conn in fresh:
                conn.close()
