"""Two worker nodes with small memory budgets on their own Valkey: eviction, pinned models,
insufficient memory, work stealing on model queues, and backend crashes."""
from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Worker, backend_status, pid_alive, poll, start_worker, unique, wait_job
from modelbay.services import Service, start_valkey
from tasks.settings import load_settings
from tasks.store import Store

BUDGET_MB = 100


@pytest.fixture(scope="module")
def cluster(nats: Service, artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-")), appendonly=False)
    run = tmp_path_factory.mktemp("cluster")
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(run),
           "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_NODE_TTL_S": "3",
           "MODELBAY_NODE_MEMORY_MB": str(BUDGET_MB), "MODELBAY_WORKER_CONCURRENCY": "2",
           "MODELBAY_BACKEND_STOP_GRACE_S": "3", "MODELBAY_CANCEL_POLL_S": "0.05",
           "MODELBAY_LOAD_COOLDOWN_BASE_S": "1"}
    store = Store.from_settings(load_settings(env))
    workers: list[Worker] = []
    try:
        for node in (f"a{os.getpid()}", f"b{os.getpid()}"):
            workers.append(start_worker(env, node, artifacts, store, concurrency=2))
        from web import create_app

        app = create_app({"TESTING": True, "MODELBAY_ENV": env})
        yield {"client": app.test_client(), "a": workers[0], "b": workers[1], "store": store}
    finally:
        for w in workers:
            w.stop()
        valkey.stop()


def register(client, memory_mb: int, **manifest) -> str:
    name = unique("c")
    body = {"backend": "echo", "memory_mb": memory_mb, **manifest}
    assert client.put(f"/v1/models/{name}", json=body).status_code == 201
    return name


def load_on(client, name: str, node: str) -> dict:
    resp = client.post(f"/v1/models/{name}/load", headers={"X-Modelbay-Node": node})
    assert resp.status_code in (200, 202), resp.get_json()
    return wait_job(client, resp.get_json()["id"]) if resp.status_code == 202 else {"status": "succeeded"}


def unload(client, *names: str) -> None:
    """Unload and wait, so the next test starts with the memory free."""
    for name in names:
        for job in client.post(f"/v1/models/{name}/unload").get_json()["data"]:
            assert wait_job(client, job["id"])["status"] == "succeeded"


def states(client, name: str) -> dict[str, str]:
    return {s["node"]: s["state"] for s in client.get(f"/v1/models/{name}").get_json()["nodes"]}


def test_a_load_that_does_not_fit_evicts_the_least_recently_used_idle_model(cluster):
    client, node = cluster["client"], cluster["a"].node_id
    m1, m2, m3 = (register(client, 40) for _ in range(3))
    for m in (m1, m2):
        assert load_on(client, m, node)["status"] == "succeeded"
    # Use m1 so that m2 is the least recently used.
    job = client.post("/v1/jobs", json={"model": m1, "task": "generate", "input": "touch"}).get_json()
    assert wait_job(client, job["id"])["status"] == "succeeded"
    assert load_on(client, m3, node)["status"] == "succeeded"
    assert states(client, m2) == {}
    assert states(client, m1) == {node: "ready"} and states(client, m3) == {node: "ready"}
    # The evicted model loads again on request (evicting the next LRU one).
    again = client.post("/v1/jobs", json={"model": m2, "task": "generate", "input": "back"}).get_json()
    assert wait_job(client, again["id"])["result"]["text"] == "back"
    unload(client, m1, m2, m3)


def test_pinned_models_are_never_evicted_and_a_model_that_cannot_fit_fails_clearly(cluster):
    client, node = cluster["client"], cluster["b"].node_id
    pinned = register(client, 70, pinned=True)
    assert load_on(client, pinned, node)["status"] == "succeeded"
    other = register(client, 60)
    failed = load_on(client, other, node)
    assert failed["status"] == "failed" and failed["error"]["type"] == "insufficient_memory"
    assert "needs 60 MB" in failed["error"]["message"]
    assert states(client, pinned) == {node: "ready"}
    huge = register(client, 10 * BUDGET_MB)
    job = client.post("/v1/jobs", json={"model": huge, "task": "generate", "input": "x"}).get_json()
    done = wait_job(client, job["id"])
    assert done["status"] == "failed" and "insufficient_memory" == done["error"]["type"]
    unload(client, pinned)


def test_jobs_for_a_model_on_both_nodes_are_served_by_both(cluster):
    client = cluster["client"]
    name = register(client, 10, options={"token_delay_s": 0.15})
    for w in (cluster["a"], cluster["b"]):
        assert load_on(client, name, w.node_id)["status"] == "succeeded"
    assert set(states(client, name).values()) == {"ready"} and len(states(client, name)) == 2
    jobs = [client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "a b c d"}).get_json()
            for _ in range(8)]
    done = [wait_job(client, j["id"]) for j in jobs]
    assert all(d["status"] == "succeeded" for d in done)
    assert {d["node"] for d in done} == {cluster["a"].node_id, cluster["b"].node_id}
    unload(client, name)


def test_a_backend_killed_mid_job_fails_the_job_cleanly_and_the_next_job_reloads(cluster):
    client, worker = cluster["client"], cluster["a"]
    name = register(client, 10, options={"token_delay_s": 0.3})
    load_on(client, name, worker.node_id)
    state = client.get(f"/v1/models/{name}").get_json()["nodes"][0]
    pid = state["pid"]
    job = client.post("/v1/jobs", json={"model": name, "task": "generate",
                                        "input": " ".join(["w"] * 40)}).get_json()
    wait_job(client, job["id"], statuses={"running"})
    poll(lambda: backend_status(state, name).tokens_generated >= 2, 10, "tokens streamed")
    os.kill(pid, signal.SIGKILL)
    failed = wait_job(client, job["id"], timeout_s=15)
    assert failed["status"] == "failed" and failed["error"]["type"] == "backend_crashed", failed
    assert worker.proc.poll() is None and cluster["store"].get_node(worker.node_id) is not None
    poll(lambda: states(client, name).get(worker.node_id) == "failed", 10, "model marked lost")
    assert not pid_alive(pid)
    nxt = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "again"}).get_json()
    assert nxt["status"] == "loading"  # the lost model loads again
    assert wait_job(client, nxt["id"], timeout_s=30)["result"]["text"] == "again"
    unload(client, name)


def test_a_backend_killed_before_any_output_is_retried_once(cluster):
    client, worker = cluster["client"], cluster["b"]
    name = register(client, 10, options={"token_delay_s": 4.0})
    load_on(client, name, worker.node_id)
    pid = client.get(f"/v1/models/{name}").get_json()["nodes"][0]["pid"]
    job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "only"}).get_json()
    wait_job(client, job["id"], statuses={"running"})
    os.kill(pid, signal.SIGKILL)  # the first token is 4 s away
    done = wait_job(client, job["id"], timeout_s=40)
    assert done["status"] == "succeeded" and done["result"]["text"] == "only"
    assert done["attempts"] == 2
    unload(client, name)
