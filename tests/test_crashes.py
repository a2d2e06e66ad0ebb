"""Backends that crash: a model that cannot run fails its load (the warm-up inside LoadModel),
and a model whose backend keeps crashing after good loads is stopped with a 503 that names
the cause. Real worker, real echo backend processes killing themselves with SIGSEGV."""
from __future__ import annotations

import json


from helpers import poll, wait_job
from workers.supervisor.exits import describe_exit
from tasks.names import model_token

# ``store._r``: the store's private Redis client, for the keys these tests look at directly.


def test_exits_name_the_signal():
    assert describe_exit(-11) == "was killed by SIGSEGV (signal 11)"
    assert describe_exit(-9) == "was killed by SIGKILL (signal 9)"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-200) == "was killed by signal 200"



def submit(client, name: str, text: str = "one two") -> dict:
    resp = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": text})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def load_jobs(client, name: str) -> list[dict]:
    return [j for j in client.get(f"/v1/jobs?model={name}&limit=100").get_json()["data"] if j["kind"] == "load"]


def test_a_model_that_crashes_in_its_warm_up_fails_its_load(client, register, store, worker):
    name = register({"crash_at": "warmup"})
    resp = client.post(f"/v1/models/{name}/load")
    assert resp.status_code == 202
    load = wait_job(client, resp.get_json()["id"])
    assert load["status"] == "failed", load
    assert load["error"]["type"] == "backend_crashed"
    message = load["error"]["message"]
    assert "killed by SIGSEGV (signal 11)" in message and "during the load" in message, message
    assert "code -11" not in message
    # The load failed, so its cooldown started (not a ready model whose every job fails).
    cooldown = json.loads(store._r.get(f"mb:cooldown:{model_token(name)}"))
    assert cooldown["failures"] == 1 and "SIGSEGV" in cooldown["error"]
    assert all(n["state"] != "ready" for n in client.get(f"/v1/models/{name}").get_json()["nodes"])


def test_a_crash_loop_is_stopped_with_a_503_that_names_the_cause(client, register, worker):
    name = register({"crash_at": "generate"})
    ended = []
    for _ in range(3):  # a job is retried once after a crash, so three crashes take two or three jobs
        resp = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "one two"})
        if resp.status_code == 503:
            break
        assert resp.status_code == 202, resp.get_json()
        ended.append(wait_job(client, resp.get_json()["id"], timeout_s=60))
    assert ended and all(j["status"] == "failed" for j in ended), ended
    assert ended[0]["error"]["type"] == "backend_crashed"
    assert "was killed by SIGSEGV (signal 11)" in ended[0]["error"]["message"], ended[0]
    # Three crashes in the window: loads stop, and every call says why and when to retry.
    cooling = poll(lambda: (r := client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "x"}))
                   .status_code == 503 and r, 10, "the crash loop's 503")
    body = cooling.get_json()["error"]
    assert body["code"] == "load_cooldown", body
    assert "crashed 3 times" in body["message"] and "SIGSEGV (signal 11)" in body["message"], body
    assert 1 <= int(cooling.headers["Retry-After"]) <= 60
    assert len(load_jobs(client, name)) == 3  # one load per crash, none after the loop was seen
    again = client.post(f"/v1/models/{name}/load")
    assert again.status_code == 503 and again.get_json()["error"]["code"] == "load_cooldown"
