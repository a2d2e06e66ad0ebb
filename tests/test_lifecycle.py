"""The walking skeleton end to end: HTTP (Flask factory) → Valkey → a real Celery worker
process → a real gRPC echo backend process."""
from __future__ import annotations

import os

import pytest

from helpers import a_roomier_node, backend_status, pid_alive, poll, unpinned_load_goes_to, wait_job

pytestmark = pytest.mark.usefixtures("worker")


def model_state(client, name: str) -> dict | None:
    nodes = client.get(f"/v1/models/{name}").get_json()["nodes"]
    return nodes[0] if nodes else None


def ready_state(client, name: str) -> dict:
    return poll(lambda: (s := model_state(client, name)) and s["state"] == "ready" and s, 20, f"{name} ready")


def load(client, name: str) -> dict:
    resp = client.post(f"/v1/models/{name}/load")
    assert resp.status_code in (200, 202), resp.get_json()
    if resp.status_code == 202:
        assert wait_job(client, resp.get_json()["id"])["status"] == "succeeded"
    return ready_state(client, name)


def submit(client, name: str, task: str, input, **extra) -> dict:
    resp = client.post("/v1/jobs", json={"model": name, "task": task, "input": input, **extra})
    assert resp.status_code == 202, resp.get_json()
    assert resp.headers["Location"] == f"/v1/jobs/{resp.get_json()['id']}"
    return resp.get_json()


def test_register_load_run_and_single_flight(client, register, worker):
    name = register({"load_delay_s": 1.0, "dim": 8}, prefix="org/echo.v1:q4@x+y")
    first = client.post(f"/v1/models/{name}/load")
    assert first.status_code == 202
    job = first.get_json()
    assert job["kind"] == "load" and job["node"] == worker.node_id
    second = client.post(f"/v1/models/{name}/load")
    assert second.status_code == 202 and second.get_json()["id"] == job["id"]
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["pid"] > 0 and done["started_at"] and done["finished_at"]

    ready = client.post(f"/v1/models/{name}/load")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"

    gen = wait_job(client, submit(client, name, "generate", "the quick brown fox")["id"])
    assert gen["status"] == "succeeded", gen
    assert gen["result"]["text"] == "the quick brown fox"
    assert gen["result"]["finish_reason"] == "stop" and gen["result"]["usage"]["completion_tokens"] == 4
    assert gen["load_job"] is None and gen["node"] == worker.node_id and gen["attempts"] == 1

    emb = wait_job(client, submit(client, name, "embed", ["a", "b", "a"])["id"])
    vectors = emb["result"]["embeddings"]
    assert emb["result"]["dim"] == 8 and len(vectors) == 3 and vectors[0] == vectors[2] != vectors[1]

    chat = wait_job(client, submit(client, name, "chat", [{"role": "user", "content": "hi there"}],
                                   params={"max_tokens": 1})["id"])
    assert chat["result"]["text"].strip() == "hi" and chat["result"]["finish_reason"] == "length"

    listed = client.get("/v1/jobs", query_string={"model": name}).get_json()["data"]
    assert {j["kind"] for j in listed} == {"load", "inference"} and len(listed) == 4
    assert client.get("/v1/models").get_json()["data"]
    nodes = client.get("/v1/nodes").get_json()["data"]
    me = next(n for n in nodes if n["id"] == worker.node_id)
    assert "echo" in me["backends"] and any(m["model"] == name for m in me["models"])


def test_submit_with_wait_answers_the_ended_job_in_one_request(client, register):
    name = register({"dim": 8})
    load(client, name)
    resp = client.post("/v1/jobs?wait=20", json={"model": name, "task": "generate", "input": "one two three"})
    assert resp.status_code == 200, resp.get_json()
    job = resp.get_json()
    assert job["status"] == "succeeded" and job["result"]["text"] == "one two three", job
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    # The same record a later poll reads: the wait answered it, nothing was left behind.
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["result"] == job["result"]
    # A job that outlives the wait comes back 202, still running, and ends on its own.
    slow_model = register({"dim": 8, "token_delay_s": 1.0})
    load(client, slow_model)
    slow = client.post("/v1/jobs?wait=0.5", json={"model": slow_model, "task": "generate", "input": "a b c d"})
    assert slow.status_code == 202 and slow.get_json()["status"] in ("queued", "running"), slow.get_json()
    assert wait_job(client, slow.get_json()["id"])["status"] == "succeeded"


def test_cancel_running_generation_stops_the_backend(client, register):
    name = register({"token_delay_s": 1.0})
    state = load(client, name)
    words = " ".join(f"w{i}" for i in range(60))
    job = submit(client, name, "generate", words)
    wait_job(client, job["id"], statuses={"running"})
    poll(lambda: backend_status(state, name).tokens_generated >= 1, 10, "first token")

    resp = client.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 202 and resp.get_json()["status"] == "cancelled"
    status = poll(lambda: (s := backend_status(state, name)).generations_cancelled == 1
                  and s.active_calls == 0 and s, 2.0, "the backend to stop generating")
    assert status.tokens_generated < 10 and status.generations_completed == 0

    final = client.get(f"/v1/jobs/{job['id']}").get_json()
    assert final["status"] == "cancelled" and final["result"] is None
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409
    # The model stays loaded and serves the next job.
    assert model_state(client, name)["state"] == "ready"
    nxt = wait_job(client, submit(client, name, "generate", "still here")["id"])
    assert nxt["result"]["text"] == "still here"


def test_cancelling_a_job_waiting_for_a_load_leaves_the_load_running(client, register):
    name = register({"load_delay_s": 5.0})
    job = submit(client, name, "generate", "hello")
    assert job["status"] == "loading" and job["load_job"]
    cancelled = client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"

    load_job = wait_job(client, job["load_job"], timeout_s=30)
    assert load_job["status"] == "succeeded", load_job
    assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "cancelled"

    nxt = submit(client, name, "generate", "after the load")
    assert nxt["status"] == "queued" and nxt["load_job"] is None
    assert wait_job(client, nxt["id"], timeout_s=10)["result"]["text"] == "after the load"
    loads = [j for j in client.get("/v1/jobs", query_string={"model": name}).get_json()["data"] if j["kind"] == "load"]
    assert [j["id"] for j in loads] == [job["load_job"]]


def test_a_load_request_cannot_be_cancelled(client, register):
    name = register({"load_delay_s": 2.0})
    job = client.post(f"/v1/models/{name}/load").get_json()
    resp = client.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 409 and resp.get_json()["error"]["code"] == "load_not_cancellable"
    assert wait_job(client, job["id"])["status"] == "succeeded"


def test_unload_stops_the_backend_process_and_removes_its_socket(client, register):
    name = register()
    state = load(client, name)
    pid, sock = state["pid"], state["socket"]
    assert pid_alive(pid) and os.path.exists(sock)
    resp = client.post(f"/v1/models/{name}/unload")
    assert resp.status_code == 202
    jobs = resp.get_json()["data"]
    assert len(jobs) == 1 and jobs[0]["kind"] == "unload"
    done = wait_job(client, jobs[0]["id"])
    assert done["status"] == "succeeded" and done["result"]["stopped"] == "terminated"
    assert not pid_alive(pid) and not os.path.exists(sock)
    body = client.get(f"/v1/models/{name}").get_json()
    assert body["status"] == "registered" and body["nodes"] == []
    assert client.post(f"/v1/models/{name}/unload").status_code == 200  # nothing left to unload


def test_unload_during_a_load_stops_the_load(client, register):
    name = register({"load_delay_s": 30.0})
    job = client.post(f"/v1/models/{name}/load").get_json()
    wait_job(client, job["id"], statuses={"loading"})
    pid = poll(lambda: (s := model_state(client, name)) and s["state"] == "loading" and s.get("instance")
               and _pid_of(name), 10, "backend process started")
    unload = client.post(f"/v1/models/{name}/unload").get_json()["data"][0]
    assert wait_job(client, unload["id"])["status"] == "succeeded"
    ended = wait_job(client, job["id"], timeout_s=10)
    assert ended["status"] == "cancelled" and ended["error"]["type"] == "unloaded"
    poll(lambda: not pid_alive(pid), 5, "backend process gone")


def _pid_of(name: str) -> int | None:
    from helpers import backend_pids

    pids = backend_pids(f"--model {name} ")
    return pids[0] if pids else None


def test_a_failed_load_fails_the_jobs_waiting_for_it(client, register):
    name = register({"fail_load": True, "load_delay_s": 0.5})
    jobs = [submit(client, name, "generate", "x") for _ in range(2)]
    assert jobs[0]["load_job"] == jobs[1]["load_job"]
    load_job = wait_job(client, jobs[0]["load_job"])
    assert load_job["status"] == "failed" and load_job["error"]["message"]
    for job in jobs:
        failed = wait_job(client, job["id"])
        assert failed["status"] == "failed" and "model load failed" in failed["error"]["message"]
    state = model_state(client, name)
    assert state["state"] == "failed" and state["error"]
    # No tight retry loop: while the cooldown runs, loads answer 503 with Retry-After.
    cooling = client.post(f"/v1/models/{name}/load")
    assert cooling.status_code == 503 and int(cooling.headers["Retry-After"]) >= 1
    assert cooling.get_json()["error"]["code"] == "load_cooldown"
    assert "failed on purpose" in cooling.get_json()["error"]["message"]
    job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "x"})
    assert job.status_code == 503
    # After it (1 s in the tests, doubling per failure), the next request tries again.
    again = poll(lambda: (r := client.post(f"/v1/models/{name}/load")).status_code == 202 and r.get_json(),
                 10, "the cooldown to end")
    assert again["id"] != jobs[0]["load_job"]
    assert wait_job(client, again["id"])["status"] == "failed"


def test_pinned_jobs_and_loads(client, register, worker, stack_env, artifacts, store):
    name = register()
    with a_roomier_node(stack_env, artifacts, store, "lcbig") as roomier:
        unpinned_load_goes_to(client, roomier)
        resp = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "pinned"},
                           headers={"X-Modelbay-Node": worker.node_id})
        assert resp.status_code == 202
        job = resp.get_json()
        assert job["node"] == worker.node_id and job["status"] == "loading"
        assert resp.headers["X-Modelbay-Node"] == worker.node_id
        load_job = client.get(f"/v1/jobs/{job['load_job']}").get_json()
        assert load_job["kind"] == "load" and load_job["node"] == worker.node_id
        done = wait_job(client, job["id"])
        assert done["result"]["text"] == "pinned" and done["node"] == worker.node_id
        polled = client.get(f"/v1/jobs/{job['id']}")
        assert polled.headers["X-Modelbay-Node"] == worker.node_id
        # A pinned load, too, goes where it is pinned, not where placement would put it.
        other = register()
        pinned_load = client.post(f"/v1/models/{other}/load", headers={"X-Modelbay-Node": worker.node_id})
        assert pinned_load.status_code == 202 and pinned_load.get_json()["node"] == worker.node_id
        assert wait_job(client, pinned_load.get_json()["id"])["status"] == "succeeded"
        ghost = client.post(f"/v1/models/{name}/load", headers={"X-Modelbay-Node": "ghost-node"})
        assert ghost.status_code == 404 and ghost.get_json()["error"]["param"] == "node"


def test_delete_model_unloads_it_everywhere(client, register):
    name = register()
    state = load(client, name)
    resp = client.delete(f"/v1/models/{name}")
    assert resp.status_code == 200 and resp.get_json()["deleted"] is True
    unload = resp.get_json()["unload_jobs"][0]
    assert wait_job(client, unload["id"])["status"] == "succeeded"
    assert not pid_alive(state["pid"])
    assert client.get(f"/v1/models/{name}").status_code == 404


def test_readyz_and_healthz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["nodes"] >= 1


def test_an_idle_model_unloads_after_its_keep_alive(client, register):
    name = register(keep_alive_s=1.5)
    state = load(client, name)
    job = submit(client, name, "generate", "keep me")
    assert wait_job(client, job["id"])["status"] == "succeeded"
    poll(lambda: model_state(client, name) is None, 15, "the idle model to unload")
    poll(lambda: not pid_alive(state["pid"]), 5, "its backend to exit")
    # A pinned model with the same keep-alive stays.
    pinned = register(keep_alive_s=0.5, pinned=True)
    load(client, pinned)
    last = client.get(f"/v1/models/{pinned}").get_json()["nodes"][0]["last_used"]
    # Two heartbeats later (node TTL 3 s → a beat per second) it is still there.
    poll(lambda: client.get("/v1/nodes").get_json()["data"][0]["last_heartbeat"] > last, 5, "a heartbeat")
    first = client.get("/v1/nodes").get_json()["data"][0]["last_heartbeat"]
    poll(lambda: client.get("/v1/nodes").get_json()["data"][0]["last_heartbeat"] > first, 5, "another heartbeat")
    assert model_state(client, pinned)["state"] == "ready"
    client.post(f"/v1/models/{pinned}/unload")
