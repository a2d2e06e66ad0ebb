"""Celery Flower pointed at the same broker sees modelbay's workers and tasks. Task events are
off by default (``MODELBAY_CELERY_EVENTS``); Flower turns them on in the workers itself
(``enable_events``), so it needs nothing of ours."""
from __future__ import annotations

import sys
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
        job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "seen by flower"}).get_json()
        assert wait_job(client, job["id"])["status"] == "succeeded"
        tasks = poll(lambda: (t := get("/api/tasks?limit=100")) and
                     [v for v in t.values() if v.get("name") == "modelbay.infer" and job["id"] in (v.get("args") or "")]
                     and t, 30, "Flower to see the job's task")
        seen = [v for v in tasks.values() if v.get("name") == "modelbay.infer" and job["id"] in (v.get("args") or "")]
        assert seen[0]["state"] == "SUCCESS" and seen[0]["worker"] == f"modelbay@{NODE}"
    finally:
        stop_process(proc, 10)
