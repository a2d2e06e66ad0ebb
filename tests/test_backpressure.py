"""Backpressure and the line, over a real worker with one job thread and a slow echo model:
429 ``queue_full`` at the model's cap with nothing queued (``Retry-After`` a number), on
``POST /v1/jobs`` and the synchronous routes; batch chunks never refused; ``queue_position``
falling as the jobs ahead end; the throughput the heartbeat reports; ``Prefer: respond-async``."""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import poll, start_worker, unique, wait_job
from tasks.store import Store

SLOW = {"token_delay_s": 0.25}
WORDS = "a b c d e f"  # six pieces: about 1.5 s a job


@pytest.fixture(scope="module")
def node(stack_env: dict[str, str], artifacts: Path, store: Store) -> Iterator[str]:
    node_id = f"bp{os.getpid()}"
    worker = start_worker(stack_env, node_id, artifacts, store, concurrency=1)
    try:
        yield node_id
    finally:
        worker.stop(20)


def _slow_model(client, node: str, max_queued: int) -> str:
    name = unique("bp")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo", "options": SLOW,
                                                  "max_queued": max_queued}).status_code == 201
    resp = client.post(f"/v1/models/{name}/load", headers={"X-Modelbay-Node": node})
    assert resp.status_code == 202, resp.get_json()
    assert wait_job(client, resp.get_json()["id"], 60)["status"] == "succeeded"
    return name


def _submit(client, name: str, text: str = WORDS):
    return client.post("/v1/jobs", json={"model": name, "task": "generate", "input": text})


def _inference(store: Store, name: str) -> int:
    return sum(j.kind == "inference" for j in store.list_jobs(model=name, limit=100))


def test_cap_line_and_throughput(client, node: str, store: Store) -> None:
    name = _slow_model(client, node, max_queued=2)
    first = _submit(client, name).get_json()
    wait_job(client, first["id"], 30, {"running"})  # the one thread is busy from now on
    ahead = [_submit(client, name) for _ in range(2)]
    assert [r.status_code for r in ahead] == [202, 202]
    before = _inference(store, name)
    full = _submit(client, name)
    assert full.status_code == 429, full.get_json()
    assert full.get_json()["error"]["code"] == "queue_full" and full.headers["Retry-After"].isdigit()
    sync = client.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]})
    assert sync.status_code == 429 and sync.headers["Retry-After"].isdigit()
    assert _inference(store, name) == before  # nothing queued by the refusals
    last = ahead[1].get_json()["id"]
    seen: list[int] = []

    def moved() -> bool:
        body = client.get(f"/v1/jobs/{last}").get_json()
        if body["status"] not in ("queued", "loading"):
            return True
        assert body["eta_s"] is None or body["eta_s"] > 0
        seen.append(body["queue_position"])
        return False

    poll(moved, 60, "the last job to start", interval_s=0.1)
    assert seen and seen[0] == 1 and 0 in seen and seen == sorted(seen, reverse=True), seen
    for job in (first["id"], *(r.get_json()["id"] for r in ahead)):
        assert wait_job(client, job, 60)["status"] == "succeeded"
    got = poll(lambda: (t := store.model_throughput(name))["jobs_per_s"] > 0 and t, 30, "throughput reported")
    assert got["holders"] == 1 and got["p50_ms"] > 0 and got["p95_ms"] >= got["p50_ms"]
    poll(lambda: sum(h["jobs"] for h in store.model_history(name)) >= 3, 30, "the three jobs in the history")
    counts = store.queue_counts(name)
    assert int(counts["enq"]) - int(counts["started"]) - int(counts.get("gone", 0)) == 0  # all taken


def test_batch_chunks_are_not_refused_at_the_cap(client, node: str) -> None:
    name = _slow_model(client, node, max_queued=1)
    blocker = _submit(client, name).get_json()
    wait_job(client, blocker["id"], 30, {"running"})
    assert _submit(client, name).status_code == 202
    assert _submit(client, name).status_code == 429  # the cap is reached
    lines = "".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                                "body": {"model": name, "prompt": "x", "max_tokens": 1}}) + "\n" for i in range(3))
    up = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(lines.encode()), "in.jsonl")},
                     content_type="multipart/form-data")
    assert up.status_code == 200, up.get_json()
    batch = client.post("/v1/batches", json={"input_file_id": up.get_json()["id"], "endpoint": "/v1/completions",
                                             "completion_window": "24h"}).get_json()

    def done() -> dict | None:
        body = client.get(f"/v1/batches/{batch['id']}").get_json()
        return body if body["status"] in ("completed", "failed", "expired", "cancelled") else None

    final = poll(done, 120, "the batch to end", interval_s=0.5)
    assert final["status"] == "completed" and final["request_counts"]["failed"] == 0, final


def test_prefer_respond_async(client, node: str) -> None:
    name = _slow_model(client, node, max_queued=0)
    resp = client.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "p q"}]},
                       headers={"Prefer": "respond-async, wait=5"})
    assert resp.status_code == 202 and resp.headers["Preference-Applied"] == "respond-async"
    job = resp.get_json()
    assert job["status"] in ("queued", "loading", "running") and job["queue_seq"] > 0
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}" and resp.headers["X-Modelbay-Job"] == job["id"]
    assert wait_job(client, job["id"], 30)["result"]["text"] == "p q"
    plain = client.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "p"}]})
    assert plain.status_code == 200 and "Preference-Applied" not in plain.headers
