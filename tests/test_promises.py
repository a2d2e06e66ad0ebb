"""Promises of the README and docs/reliability.md that had no test (issue 15), the fast ones:
placement and a draining node (fakeredis), the probes, ``?wait=S``'s bound, the metrics key,
the ``no_node`` hint (an app on its own Valkey with hand-written node records), a duplicate
task message (the session's worker), and a non-streaming OpenAI call whose client hangs up
(real gunicorn)."""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import requests

from helpers import backend_status, open_request, poll, unique, wait_job
from tasks.cas import parse_event
from tasks.dispatch import Dispatcher
from tasks.names import TASK_INFER, TASK_LOAD, model_queue, node_queue
from tasks.schemas import Manifest, NodeRecord, utcnow
from modelbay.services import Service, start_valkey
from tasks.settings import load_settings
from tasks.store import Store

# ``store._r``: the store's private Redis client, for the keys these tests look at directly.


class SentTasks:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list, str]] = []

    def send_task(self, name: str, args: list, queue: str, kwargs: dict | None = None) -> None:
        self.sent.append((name, args, queue))


def node_record(node_id: str, backends=("echo",), budget: int = 1000, used: int = 0, draining: bool = False) -> NodeRecord:
    return NodeRecord(id=node_id, hostname="h", celery_hostname=f"modelbay@{node_id}", pid=1,
                      backends=list(backends), memory_budget_mb=budget, memory_used_mb=used,
                      started_at=utcnow(), last_heartbeat=utcnow(), draining=draining)


# -- placement skips a draining node ---------------------------------------------------------

def test_placement_skips_a_draining_node() -> None:
    store = Store(fakeredis.FakeRedis(decode_responses=True), load_settings({}))
    # The draining node would win on every placement rule (all its memory free).
    store.heartbeat(node_record("a-draining", budget=64000, draining=True))
    store.heartbeat(node_record("b-busy", budget=1000, used=900))
    celery = SentTasks()
    dispatcher = Dispatcher(store, celery)
    load, created = dispatcher.ensure_load("m", Manifest(backend="echo", options={"memory_mb": 50}))
    assert created and load is not None and load.node == "b-busy"
    assert [(n, q) for n, _, q in celery.sent] == [(TASK_LOAD, node_queue("b-busy"))]
    # The draining node is still listed (/v1/nodes shows it) but never offered to placement.
    assert {n.id for n in store.live_nodes(include_draining=True)} == {"a-draining", "b-busy"}
    assert [n.id for n in store.live_nodes()] == ["b-busy"]


# -- an app on its own Valkey, with node records written by the test ---------------------------

@pytest.fixture(scope="module")
def own(nats: Service, artifacts: Path) -> Iterator[dict]:
    """A Valkey of this module's own, an app on it (``MODELBAY_MAX_WAIT_S=2``), and a store
    whose node records live 10 minutes (no worker heartbeats them)."""
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-promises-")), appendonly=False,
                          log_path=artifacts / "valkey-promises.log")
    try:
        env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_MAX_WAIT_S": "2"}
        from web import create_app

        app = create_app({"TESTING": True, "MODELBAY_ENV": env})
        store = Store.from_settings(load_settings({**env, "MODELBAY_NODE_TTL_S": "600"}))
        yield {"env": env, "client": app.test_client(), "store": store, "valkey": valkey}
    finally:
        valkey.stop()


def test_readyz_fails_with_no_live_node_and_with_redis_down(nats: Service, artifacts: Path) -> None:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-readyz-")), appendonly=False,
                          log_path=artifacts / "valkey-readyz.log")
    try:
        env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url}
        from web import create_app

        client = create_app({"TESTING": True, "MODELBAY_ENV": env}).test_client()
        store = Store.from_settings(load_settings({**env, "MODELBAY_NODE_TTL_S": "600"}))
        empty = client.get("/readyz")
        assert empty.status_code == 503, empty.get_json()
        assert empty.get_json()["error"]["code"] == "no_node"
        store.heartbeat(node_record("only-draining", draining=True))  # stopping: not ready for work
        assert client.get("/readyz").status_code == 503
        store.heartbeat(node_record("n1"))
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.get_json() == {"status": "ready", "nodes": 1}
        assert client.get("/healthz").status_code == 200
        valkey.stop()
        down = client.get("/readyz")
        assert down.status_code == 503, down.get_json()
        assert down.get_json()["error"]["code"] == "store_unavailable"
        assert client.get("/healthz").status_code == 200  # liveness does not depend on Redis
    finally:
        valkey.stop()


def test_wait_is_bounded_by_max_wait_s(own) -> None:
    client, store = own["client"], own["store"]
    store.heartbeat(node_record(unique("nowork")))  # a node nobody runs: the job never ends
    name = unique("echo")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo", "options": {}}).status_code == 201
    job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "hi"}).get_json()
    above = client.get(f"/v1/jobs/{job['id']}?wait=2.5")
    assert above.status_code == 400, above.get_json()
    error = above.get_json()["error"]
    assert error["param"] == "wait" and "MODELBAY_MAX_WAIT_S" in error["message"]
    started = time.monotonic()
    at_bound = client.get(f"/v1/jobs/{job['id']}?wait=2")
    took = time.monotonic() - started
    assert at_bound.status_code == 200 and at_bound.get_json()["status"] == "loading"
    assert 1.9 <= took < 4.0, took


def test_metrics_needs_a_key_unless_metrics_open(own) -> None:
    from web import create_app

    keyed = create_app({"TESTING": True, "MODELBAY_ENV": {**own["env"], "MODELBAY_API_KEYS": "k1,k2"}}).test_client()
    closed = keyed.get("/metrics")
    assert closed.status_code == 401 and closed.headers["WWW-Authenticate"] == "Bearer"
    assert keyed.get("/metrics", headers={"Authorization": "Bearer k2"}).status_code == 200
    opened = create_app({"TESTING": True, "MODELBAY_ENV": {**own["env"], "MODELBAY_API_KEYS": "k1,k2",
                                                           "MODELBAY_METRICS_OPEN": "1"}}).test_client()
    resp = opened.get("/metrics")
    assert resp.status_code == 200 and b"modelbay_nodes_up" in resp.data
    assert opened.get("/v1/nodes").status_code == 401  # only /metrics opens


def test_no_node_names_the_extra_to_install(own) -> None:
    client, store = own["client"], own["store"]
    store.heartbeat(node_record(unique("echo-only"), backends=("echo",)))  # MODELBAY_BACKENDS=echo
    name = unique("sd")
    put = client.put(f"/v1/models/{name}", json={"backend": "diffusers", "options": {}})
    assert put.status_code == 201, put.get_json()
    resp = client.post("/v1/jobs", json={"model": name, "task": "image", "input": "a cat"})
    assert resp.status_code == 503, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == "no_node"
    assert "pip install 'modelbay[images]'" in error["message"], error["message"]
    assert not store.list_jobs(model=name)  # nothing queued


# -- a duplicate task message (the session's worker) -------------------------------------------

@pytest.mark.usefixtures("worker")
def test_a_duplicate_task_message_does_nothing(client, register, store, app, worker) -> None:
    name = register({"dim": 4})
    load_resp = client.post(f"/v1/models/{name}/load")
    assert load_resp.status_code == 202
    load = wait_job(client, load_resp.get_json()["id"])
    assert load["status"] == "succeeded"
    job_id = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "once only"}).get_json()["id"]
    done = wait_job(client, job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    events: Counter[str] = Counter()
    pubsub = store._r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(**{f"mb:jobev:{job_id}": lambda m: events.update([parse_event(m["data"])[0]]),
                        f"mb:jobev:{load['id']}": lambda m: events.update(["load:" + parse_event(m["data"])[0]])})
    listener = pubsub.run_in_thread(sleep_time=0.02, daemon=True)
    try:
        celery = app.extensions["modelbay"].celery
        sent = [celery.send_task(TASK_INFER, args=[job_id], kwargs={"route": done["routed"]}, queue=model_queue(name)),
                celery.send_task(TASK_INFER, args=[job_id], queue=model_queue(name)),  # an older message: no route
                celery.send_task(TASK_LOAD, args=[load["id"]], queue=node_queue(worker.node_id))]
        for task in sent:  # each copy was taken and handled by the worker
            poll(lambda t=task: f"[{t.id}] succeeded" in worker.log(), 20, f"the worker to handle {task.id}")
        # A message published after the duplicates, on the same connection: once it has been
        # seen, every event the duplicates could have caused has been delivered.
        probe = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "probe"}).get_json()["id"]
        assert wait_job(client, probe)["status"] == "succeeded"
    finally:
        listener.stop()
    assert client.get(f"/v1/jobs/{job_id}").get_json() == done  # same finished_at, result, attempts
    assert client.get(f"/v1/jobs/{load['id']}").get_json() == load
    assert events["succeeded"] == 0 and events["load:succeeded"] == 0, events
    assert [s["state"] for s in client.get(f"/v1/models/{name}").get_json()["nodes"]] == ["ready"]


# -- a non-streaming OpenAI call whose client hangs up (real gunicorn) ------------------------

@pytest.mark.usefixtures("worker")
def test_a_non_streaming_chat_whose_client_hangs_up_cancels_the_job_and_the_backend(web_url: str) -> None:
    name = unique("oai")
    requests.put(f"{web_url}/v1/models/{name}", json={"backend": "echo", "options": {"token_delay_s": 0.2}},
                 timeout=10).raise_for_status()
    requests.post(f"{web_url}/v1/models/{name}/load", timeout=10)
    state = poll(lambda: (n := requests.get(f"{web_url}/v1/models/{name}", timeout=5).json()["nodes"])
                 and n[0]["state"] == "ready" and n[0], 20, "the model to be ready")
    words = " ".join(f"w{i}" for i in range(60))  # about 12 s
    sock = open_request(web_url, "/v1/chat/completions",
                        {"model": name, "messages": [{"role": "user", "content": words}]})
    try:
        poll(lambda: backend_status(state, name).tokens_generated >= 2, 15, "the generation to start")
        jobs = requests.get(f"{web_url}/v1/jobs", params={"model": name}, timeout=5).json()["data"]
        [job] = [j for j in jobs if j["kind"] == "inference"]
        assert job["status"] == "running"
    finally:
        sock.close()
    status = poll(lambda: (s := backend_status(state, name)).generations_cancelled == 1 and s.active_calls == 0
                  and s, 5, "the backend to stop generating")
    assert status.tokens_generated < 60 and status.generations_completed == 0
    final = requests.get(f"{web_url}/v1/jobs/{job['id']}", timeout=5).json()
    assert final["status"] == "cancelled" and final["result"] is None
