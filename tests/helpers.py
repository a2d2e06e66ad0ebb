"""Test helpers: real processes (started by :mod:`modelbay.stack`, the one launcher), polling
with deadlines (never fixed sleeps)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modelbay.stack import Worker, http_ok, launch_web, launch_worker, ready_or_stop
from tasks.schemas import TERMINAL
from tasks.store import Store


def poll(check: Callable[[], Any], timeout_s: float, what: str = "the condition", interval_s: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def every(interval_s: float, for_s: float) -> Iterator[int]:
    """Yield 0, 1, 2, ... every ``interval_s`` seconds for ``for_s`` seconds: for tests that
    *sample* state at a cadence over a span of time (observing, not waiting for something;
    to wait for a condition use :func:`poll`)."""
    deadline = time.monotonic() + for_s
    n = 0
    while time.monotonic() < deadline:
        yield n
        n += 1
        time.sleep(interval_s)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def backend_pids(marker: str) -> list[int]:
    """Pids of backend processes whose command line contains ``marker``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "workers.backends." in cmd and marker in cmd and pid_alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def unique(prefix: str = "echo") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def start_worker(env: dict[str, str], node_id: str, log_dir: Path, store: Store,
                 concurrency: int = 8, timeout_s: float = 60) -> Worker:
    """A worker node that the caller owns (stop it), up once its record is in ``store``.
    Its metrics port is 0 (many workers on one host: metrics only when ``env`` asks)."""
    worker = launch_worker(env, node_id, log_dir, concurrency)
    ready_or_stop(worker, lambda: store.get_node(node_id), timeout_s, f"node {node_id}")
    return worker


@contextlib.contextmanager
def modelbay_up(args: list[str], env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``modelbay up <args>`` in ``tmp_path`` (its output in ``up.log``), once it says it is up;
    on leaving, Ctrl-C and up to 60 s for it to stop (else killed). The caller asserts how it
    ended (``returncode``, the log)."""
    with open(tmp_path / "up.log", "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "modelbay.cli", "up", *args], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            poll(lambda: up.poll() is not None or "is up at" in (tmp_path / "up.log").read_text(), 120, "modelbay up")
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            yield up
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            finally:
                if up.poll() is None:
                    up.kill()


def pushed(store: Store, queue: str) -> list[str]:
    """The job ids of the inference messages waiting on ``queue``, in the order a worker takes
    them (priority lists in order, oldest first in each): the dispatcher pushes them onto the
    lists itself (tasks/publish.py), so a fake Celery never sees them."""
    import base64

    from tasks.publish import PRIORITY_STEPS, queue_key

    raws = [raw for step in PRIORITY_STEPS for raw in reversed(store.queues.messages(queue_key(queue, step)))]
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in raws]


def wait_job(client: Any, job_id: str, timeout_s: float = 30, statuses: set[str] | None = None) -> dict:
    """Long-poll a job until its status is in ``statuses`` (default: terminal)."""
    want = statuses or TERMINAL

    def check() -> dict | None:
        body = client.get(f"/v1/jobs/{job_id}?wait=1").get_json()
        return body if body["status"] in want else None

    return poll(check, timeout_s, f"job {job_id} to reach {sorted(want)}")


def backend_status(state: dict, name: str) -> Any:
    """Ask a backend process itself for its Status, over its unix socket (``state`` is the
    model's per-node state from ``GET /v1/models/{name}``)."""
    import grpc

    from workers.backends.proto.modelbay.backend.v1 import backend_pb2 as pb
    from workers.backends.proto.modelbay.backend.v1 import backend_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix:{state['socket']}") as channel:
        stub = pb_grpc.BackendStub(channel)
        return stub.Status(pb.StatusRequest(model=pb.ModelRef(name=name, instance=state["instance"])), timeout=5)


@contextlib.contextmanager
def gunicorn(env: dict[str, str], log_path: Path, workers: int = 1, threads: int = 16) -> Iterator[str]:
    """gunicorn serving the app with ``env`` on a free port; yields its base URL and stops it
    (gunicorn's graceful timeout is 10 s: it gets 20)."""
    web = launch_web(env, log_path, workers=workers, threads=threads)
    ready_or_stop(web, lambda: http_ok(f"{web.url}/healthz"), 30, "gunicorn")
    try:
        yield web.url
    finally:
        web.stop(20)


@contextlib.contextmanager
def a_roomier_node(stack_env: dict[str, str], artifacts: Path, store: Store, prefix: str) -> Iterator[str]:
    """A second worker node with far more free memory than the session's: placement's natural
    choice for an unpinned load (both have no load in flight), so a pin to the session's node
    is one that placement would not make. Stopped afterwards, even on failure."""
    node = f"{prefix}{os.getpid()}"
    worker = start_worker({**stack_env, "MODELBAY_NODE_MEMORY_MB": "4000000"}, node, artifacts, store, concurrency=2)
    try:
        yield node
    finally:
        worker.stop(20)


def unpinned_load_goes_to(client: Any, node: str) -> None:
    """An unpinned load lands on ``node`` (so a pin elsewhere is not placement's own choice)."""
    probe = unique("probe")
    assert client.put(f"/v1/models/{probe}", json={"backend": "echo"}).status_code == 201
    resp = client.post(f"/v1/models/{probe}/load")
    assert resp.status_code == 202 and resp.get_json()["node"] == node, resp.get_json()
    assert wait_job(client, resp.get_json()["id"])["status"] == "succeeded"


def open_request(url: str, path: str, body: dict) -> socket.socket:
    """POST ``body`` as JSON to ``url`` + ``path`` on a raw socket and return the socket, so a
    test can hang up at the moment it chooses (a client that goes away)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    return sock
