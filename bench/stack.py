"""A whole modelbay stack for benchmarks: Valkey, NATS, one worker node and gunicorn, as
real processes in a temp dir, stopped in reverse order on exit."""
from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tasks.names import node_queue
from modelbay.services import (Service, free_port, spawn, start_nats, start_valkey, stop_process, wait_until,
                            web_command, worker_command)

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    base: str
    tmp: Path
    valkey: Service
    nats: Service
    procs: list[Any] = field(default_factory=list)
    _local: threading.local = field(default_factory=threading.local)

    def session(self) -> requests.Session:
        """This thread's HTTP session (sessions are not shared across threads)."""
        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
        return self._local.s

    def job(self, body: dict[str, Any], path: str = "/v1/jobs") -> dict[str, Any]:
        """Submit (POST ``path``) and long-poll the job to its end; raise unless it succeeded."""
        resp = self.session().post(f"{self.base}{path}", json=body)
        resp.raise_for_status()
        return self.wait(resp.json())

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        s = self.session()
        while job["status"] not in TERMINAL:
            job = s.get(f"{self.base}/v1/jobs/{job['id']}?wait=30").json()
        if job["status"] != "succeeded":
            raise RuntimeError(job)
        return job

    def register(self, name: str, manifest: dict[str, Any]) -> None:
        self.session().put(f"{self.base}/v1/models/{name}", json=manifest).raise_for_status()

    def load(self, name: str) -> float:
        """Load ``name`` and wait until it is ready; wall seconds."""
        t0 = time.perf_counter()
        resp = self.session().post(f"{self.base}/v1/models/{name}/load")
        resp.raise_for_status()
        if resp.status_code == 202:
            self.wait(resp.json())
        return time.perf_counter() - t0

    def unload(self, name: str) -> None:
        """Unload ``name`` everywhere and wait for it."""
        resp = self.session().post(f"{self.base}/v1/models/{name}/unload")
        resp.raise_for_status()
        for job in resp.json()["data"]:
            self.wait(job)


@contextlib.contextmanager
def running_stack(concurrency: int = 8, web_workers: int = 2, web_threads: int = 16,
                  env: dict[str, str] | None = None) -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="mb-bench-"))
    valkey = start_valkey(tmp / "valkey", appendonly=False)
    nats = start_nats()
    port = free_port()
    stack = Stack(f"http://127.0.0.1:{port}", tmp, valkey, nats)
    try:
        full = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_NODE_ID": "bench",
                "MODELBAY_RUN_DIR": str(tmp / "run"), "MODELBAY_MODELS_DIR": str(tmp / "models"), **(env or {})}
        stack.procs.append(spawn(worker_command(node_queue("bench"), "bench", concurrency), full, tmp / "worker.log"))
        stack.procs.append(spawn(web_command("127.0.0.1", port, web_workers, web_threads), full, tmp / "web.log"))
        s = stack.session()
        wait_until(lambda: s.get(f"{stack.base}/readyz", timeout=1).status_code == 200, 60, "modelbay")
        wait_until(lambda: s.get(f"{stack.base}/v1/nodes", timeout=1).json()["data"], 60, "the worker node")
        yield stack
    finally:
        for proc in reversed(stack.procs):
            stop_process(proc, 15)
        nats.stop()
        valkey.stop()
