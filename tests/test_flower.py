"""Celery Flower pointed at the same broker sees modelbay's workers and tasks. Task events are
off by default (``MODELBAY_CELERY_EVENTS``); Flower turns them on in the workers itself
(``enable_events``), so it needs nothing of ours."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import NODE
from helpers import poll, unique, wait_job
from modelbay.services import free_port, spawn, stop_process

pytest.importorskip("flower")
pytestmark = pytest.mark.usefixtures("worker")


def test_flower_sees_the_workers_and_their_tasks(stack_env: dict[str, str], artifacts: Path, client) -> None:
    port = free_port()
    proc = spawn([sys.executable, "-m", "celery", "--broker", stack_env["MODELBAY_REDIS_URL"], "flower",
                  f"--port={port}", "--address=127.0.0.1"], {"FLOWER_UNAUTHENTICATED_API": "true"},
                 artifacts / "flower.log")
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> dict | None:
        try:
            resp = requests.get(f"{base}{path}", timeout=10)
        except requests.RequestException:
            return None
        return resp.json() if resp.status_code == 200 else None

    try:
        workers = poll(lambda: (w := get("/api/workers?refresh=1")) and f"modelbay@{NODE}" in w and w, 60,
                       "Flower to list the session's worker")
        assert workers[f"modelbay@{NODE}"]["stats"]["pool"]["implementation"] == "celery.concurrency.thread:TaskPool"
        name = unique("flower")
        assert client.put(f"/v1/models/{name}", json={"backend": "echo"}).status_code == 201
        # Task events are off by default; Flower turns them on in the workers every
        # events_enable_interval (5 s, the first time 5 s after it starts). A job a second
        # until Flower has seen one of them end.
        jobs: list[str] = []
        last = [0.0]

        def seen_by_flower() -> list[dict]:
            if time.monotonic() - last[0] >= 1.0:
                job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "seen by flower"})
                assert wait_job(client, job.get_json()["id"])["status"] == "succeeded"
                jobs.append(job.get_json()["id"])
                last[0] = time.monotonic()
            tasks = get("/api/tasks?limit=200") or {}
            return [v for v in tasks.values() if v.get("name") == "modelbay.infer" and v.get("state") == "SUCCESS"
                    and any(j in (v.get("args") or "") for j in jobs)]

        seen = poll(seen_by_flower, 40, "Flower to see a job's task succeed", interval_s=0.2)
        assert seen[0]["worker"] == f"modelbay@{NODE}"
    finally:
        stop_process(proc, 10)
