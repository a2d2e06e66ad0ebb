"""A whole modelbay stack for benchmarks: Valkey, NATS, one worker node and gunicorn, as real
processes in a temp dir (:class:`modelbay.stack.LocalStack`, stopped in reverse order on
exit), and the API client (:class:`modelbay.client.Client`) with the few calls the benchmarks
time."""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelbay.client import Client
from modelbay.stack import LocalStack

NODE = "bench"


@dataclass
class Stack:
    local: LocalStack
    client: Client

    def job(self, body: dict[str, Any], path: str = "/v1/jobs") -> dict[str, Any]:
        """Submit (POST ``path``) and long-poll the job to its end; raise unless it succeeded."""
        return self.wait(self.client.call("POST", path, body))

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        job = self.client.wait(job)
        if job["status"] != "succeeded":
            raise RuntimeError(job)
        return job

    def register(self, name: str, manifest: dict[str, Any]) -> None:
        self.client.register(name, manifest)

    def load(self, name: str) -> float:
        """Load ``name`` and wait until it is ready; wall seconds."""
        t0 = time.perf_counter()
        job = self.client.load(name)
        if job is not None:
            self.wait(job)
        return time.perf_counter() - t0

    def unload(self, name: str) -> None:
        """Unload ``name`` everywhere and wait for it."""
        for job in self.client.unload(name):
            self.wait(job)


@contextlib.contextmanager
def running_stack(concurrency: int = 8, web_workers: int = 2, web_threads: int = 16,
                  env: dict[str, str] | None = None) -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="mb-bench-"))
    with LocalStack(tmp, env={"MODELBAY_RUN_DIR": str(tmp / "run"), "MODELBAY_MODELS_DIR": str(tmp / "models"),
                              **(env or {})}) as local:
        local.start_valkey(appendonly=False)
        local.start_nats()
        local.start_worker(NODE, concurrency)
        web = local.start_web(workers=web_workers, threads=web_threads)
        local.wait_http(f"{web.url}/readyz", 60, "modelbay (a worker node is live)")
        yield Stack(local, Client(web.url, timeout_s=120))
