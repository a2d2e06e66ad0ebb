"""Promises of the README and docs/reliability.md that had no test (issue 15), those that need
workers of their own: a drain cancels the backend calls it hands back, eviction waits for a
model already unloading, ``MODELBAY_INFERENCE_TIMEOUT_S`` through a worker, and the attempts
cap ending in ``node_lost``. Each test starts its own workers (on this module's Valkey) with
short settings, and stops them whatever happens."""
from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import Worker, backend_status, poll, start_worker, unique, wait_job
from tasks.names import model_token
from modelbay.services import Service, start_valkey
from tasks.settings import load_settings
from tasks.store import Store


@pytest.fixture(scope="module")
def base(nats: Service, artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-pf-")), appendonly=False,
                          log_path=artifacts / "valkey-promises-faults.log")
    run = tmp_path_factory.mktemp("promises-faults")
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(run),
           "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_NODE_TTL_S": "2",
           "MODELBAY_REAPER_INTERVAL_S": "0.5", "MODELBAY_WORKER_STOP_GRACE_S": "1",
           "MODELBAY_BACKEND_STOP_GRACE_S": "2", "MODELBAY_CANCEL_POLL_S": "0.05",
           "MODELBAY_LOAD_COOLDOWN_BASE_S": "1"}
    try:
        from web import create_app

        client = create_app({"TESTING": True, "MODELBAY_ENV": env}).test_client()
        yield {"env": env, "client": client, "store": Store.from_settings(load_settings(env)), "run": run}
    finally:
        valkey.stop()


@pytest.fixture
def cluster(base: dict, artifacts: Path) -> Iterator[Callable[..., Worker]]:
    """``start(node_suffix, **env)`` starts a worker on the module's Valkey; all are stopped
    (SIGTERM, then SIGKILL) at the end of the test."""
    started: list[Worker] = []

    def start(suffix: str, **extra: str) -> Worker:
        w = start_worker({**base["env"], **extra}, f"{suffix}{os.getpid()}", artifacts, base["store"], concurrency=4)
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.stop(15)


def register(client, manifest_extra: dict | None = None, **options) -> str:
    name = unique("pf")
    resp = client.put(f"/v1/models/{name}", json={"backend": "echo", "options": options, **(manifest_extra or {})})
    assert resp.status_code == 201, resp.get_json()
    return name


def load_on(client, name: str, node: str) -> dict:
    resp = client.post(f"/v1/models/{name}/load", headers={"X-Modelbay-Node": node})
    assert resp.status_code == 202, resp.get_json()
    done = wait_job(client, resp.get_json()["id"], 30)
    assert done["status"] == "succeeded", done
    return done


def state_on(client, name: str, node: str) -> dict | None:
    return next((s for s in client.get(f"/v1/models/{name}").get_json()["nodes"] if s["node"] == node), None)


def submit(client, name: str, text: str) -> str:
    resp = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": text})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def test_a_drain_cancels_the_backend_call_of_the_job_it_hands_back(base, cluster) -> None:
    client, store = base["client"], base["store"]
    a, b = cluster("da"), cluster("db")
    name = register(client, token_delay_s=0.5)
    load_on(client, name, b.node_id)  # held on b only: the job runs there
    state = state_on(client, name, b.node_id)
    job = submit(client, name, " ".join(f"w{i}" for i in range(40)))  # about 20 s
    poll(lambda: store.get_job(job).status == "running", 20, "the job to run")
    assert store.get_job(job).node == b.node_id
    poll(lambda: backend_status(state, name).tokens_generated >= 1, 10, "the first token")
    b.proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    # Handed back after the 1 s grace: routed again, and it runs on a.
    moved = poll(lambda: (r := store.get_job(job)).routed >= 2 and r, 20, "the job to be handed back")
    assert moved.status in ("queued", "loading", "running") and moved.attempts == 1
    # Its backend call on b was cancelled: the task returned at once, so b exits long before
    # the generation (about 20 s) could have ended, and its backend says it cancelled it.
    assert b.proc.wait(15) == 0
    assert time.monotonic() - stopped_at < 10
    backend_log = Path(base["run"]) / "logs" / b.node_id / f"{model_token(name)[:80]}.log"
    text = backend_log.read_text()
    assert "generation cancelled" in text, text[-2000:]
    rerun = poll(lambda: (r := store.get_job(job)).status == "running" and r, 30, "the job to run again")
    assert rerun.node == a.node_id and rerun.attempts == 2
    assert client.delete(f"/v1/jobs/{job}").status_code == 202  # no need to wait 20 s more


def test_eviction_waits_for_a_model_already_unloading(base, cluster) -> None:
    client = base["client"]
    # The backends ignore SIGTERM, so an unload takes the whole 4 s stop grace.
    node = cluster("ev", MODELBAY_NODE_MEMORY_MB="100", MODELBAY_ECHO_IGNORE_SIGTERM="1",
                   MODELBAY_BACKEND_STOP_GRACE_S="4").node_id
    first = register(client, {"memory_mb": 80})
    second = register(client, {"memory_mb": 80})
    load_on(client, first, node)
    unload = client.post(f"/v1/models/{first}/unload").get_json()["data"][0]["id"]
    poll(lambda: (s := state_on(client, first, node)) and s["state"] == "unloading", 10, "the first model unloading")
    resp = client.post(f"/v1/models/{second}/load")
    assert resp.status_code == 202, resp.get_json()
    load = wait_job(client, resp.get_json()["id"], 30)
    assert load["status"] == "succeeded", load  # not insufficient_memory: it waited for the memory
    unloaded = wait_job(client, unload, 10)
    assert unloaded["status"] == "succeeded"
    assert load["started_at"] < unloaded["finished_at"] <= load["finished_at"]  # it really waited
    assert state_on(client, first, node) is None and state_on(client, second, node)["state"] == "ready"


def test_inference_deadline_comes_from_the_setting(base, cluster) -> None:
    client = base["client"]
    cluster("dl", MODELBAY_INFERENCE_TIMEOUT_S="2")
    name = register(client, token_delay_s=1.0)
    job = submit(client, name, " ".join(f"w{i}" for i in range(30)))  # about 30 s
    done = wait_job(client, job, 20)
    assert done["status"] == "failed", done
    assert "deadline exceeded after 2s" in done["error"]["message"], done["error"]
    assert done["result"] is None
    from datetime import datetime

    ran_s = (datetime.fromisoformat(done["finished_at"].replace("Z", "+00:00"))
             - datetime.fromisoformat(done["started_at"].replace("Z", "+00:00"))).total_seconds()
    assert 1.9 <= ran_s < 6, ran_s


def test_a_job_whose_node_dies_on_every_attempt_fails_node_lost_at_the_cap(base, cluster) -> None:
    client, store = base["client"], base["store"]
    extra = {"MODELBAY_JOB_MAX_ATTEMPTS": "2"}
    cluster("rp", MODELBAY_BACKENDS="diffusers", **extra)  # reaps, never runs the echo job
    k1, k2 = cluster("k1", **extra), cluster("k2", **extra)
    name = register(client, token_delay_s=1.0)
    load_on(client, name, k1.node_id)
    job = submit(client, name, " ".join(f"w{i}" for i in range(60)))
    for attempt, victim in ((1, k1), (2, k2)):
        poll(lambda a=attempt: (r := store.get_job(job)).status == "running" and r.attempts == a, 30,
             f"attempt {attempt} to run")
        assert store.get_job(job).node == victim.node_id
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        killed_at = time.monotonic()
    done = wait_job(client, job, 20)
    assert done["status"] == "failed" and done["error"]["type"] == "node_lost", done
    assert "gave up after 2 attempt(s)" in done["error"]["message"]
    assert done["attempts"] == 2
    assert time.monotonic() - killed_at < 15
