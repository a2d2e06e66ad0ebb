"""``GET /api/queues`` (web/queues.py), the operations page's queue view.

On fakeredis: depths and the oldest job per model queue and its batch-chunk priority lists, per
node queue; holders; an unreadable tail or a record gone still answers; no queue is read
whole; the store's throughput measures pass through, and their absence or failure gives
``null``. On the real stack (a real worker): jobs of a model that is still loading wait in its
queue, so its depth rises with them and its oldest job's age grows; once the model is loaded
the depth falls to zero as they run, the node that loaded it is its holder, and its heartbeat
reports their throughput."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import fakeredis
import pytest

from conftest import NODE
from helpers import poll, wait_job
from tasks.keys import job_key
from tasks.names import TASK_INFER, model_queue, node_queue
from tasks.publish import queue_key, task_message
from tasks.queues import QueueStore
from tasks.schemas import JobRecord, Manifest, ModelNode, NodeRecord
from tasks.settings import load_settings
from tasks.store import Store, new_job_id
from web.queues import queue_view


def iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
def fake() -> Store:
    store = Store(fakeredis.FakeRedis(decode_responses=True), load_settings({}))
    for name in ("org/a", "b"):
        store.put_manifest(name, Manifest(backend="echo"))
    return store


def queued(store: Store, model: str, age_s: float, queue: str | None = None, priority: int = 0) -> str:
    """A job record created ``age_s`` ago and its message pushed onto the queue's list."""
    record = JobRecord(id=new_job_id(), kind="inference", model=model, task="generate", input="x",
                       created_at=iso(datetime.now(UTC) - timedelta(seconds=age_s)))
    store.create_job(record)
    queue = queue or model_queue(model)
    store.queues.push(queue_key(queue, priority), task_message(TASK_INFER, [record.id], {}, queue, priority))
    return record.id


def node(store: Store, node_id: str, draining: bool = False) -> None:
    now = iso(datetime.now(UTC))
    store.heartbeat(NodeRecord(id=node_id, hostname="h", celery_hostname=f"c@{node_id}", pid=1, backends=["echo"],
                               memory_budget_mb=1000, started_at=now, last_heartbeat=now, draining=draining))


def test_depth_and_the_oldest_job_per_queue_and_chunk_list(fake: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    oldest = queued(fake, "org/a", 30)
    queued(fake, "org/a", 10)
    queued(fake, "org/a", 1)
    queued(fake, "org/a", 50, priority=9)  # a batch chunk: its own list, not in the depth
    node(fake, "n1")
    pinned = queued(fake, "b", 20, queue=node_queue("n1"))
    monkeypatch.setattr(QueueStore, "messages", lambda *a: pytest.fail("a queue was read whole"))
    monkeypatch.setattr(fake._r, "lrange", lambda *a, **k: pytest.fail("a queue was read by LRANGE"))
    view = queue_view(fake, time.time())
    b, a = view["models"]  # by name
    assert a["model"] == "org/a" and a["depth"] == 3 and a["oldest_job"] == oldest
    assert 29 < a["oldest_age_s"] < 120 and a["oldest_created_at"].endswith("Z")
    assert a["chunk_depth"] == 1 and a["chunk_oldest_age_s"] >= 49
    assert b["depth"] == 0 and b["oldest_job"] is None and b["oldest_age_s"] is None and b["chunk_depth"] == 0
    assert view["nodes"] == [{"node": "n1", "draining": False, "depth": 1, "oldest_job": pinned,
                              "oldest_age_s": view["nodes"][0]["oldest_age_s"]}]
    assert view["nodes"][0]["oldest_age_s"] >= 19


def test_holders_are_live_nodes_not_draining_with_the_model_ready(fake: Store) -> None:
    for node_id, draining in (("n1", False), ("n2", False), ("n3", True)):
        node(fake, node_id, draining)
    fake.set_model_state(ModelNode(model="org/a", node="n1", state="ready"))
    fake.set_model_state(ModelNode(model="org/a", node="n2", state="loading"))
    fake.set_model_state(ModelNode(model="org/a", node="n3", state="ready"))
    fake.set_model_state(ModelNode(model="b", node="n2", state="ready"))
    models = {m["model"]: m for m in queue_view(fake, time.time())["models"]}
    assert models["org/a"]["holders"] == ["n1"] and models["b"]["holders"] == ["n2"]


def test_an_unreadable_tail_or_a_lost_record_still_answers(fake: Store) -> None:
    fake.queues.push(model_queue("b"), b"not a celery message")
    gone = queued(fake, "org/a", 5)
    fake._r.delete(job_key(gone))  # the record expired while its message waits
    models = {m["model"]: m for m in queue_view(fake, time.time())["models"]}
    assert models["b"]["depth"] == 1 and models["b"]["oldest_age_s"] is None
    assert models["org/a"]["depth"] == 1 and models["org/a"]["oldest_job"] is None


def test_throughput_comes_from_the_store_when_it_keeps_it(fake: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    first = queue_view(fake, time.time())["models"][0]  # "b"
    if not hasattr(Store, "model_throughput"):
        assert first["throughput"] is None and first["history"] == []
    monkeypatch.setattr(fake, "model_throughput", lambda m: {"jobs_per_s": 2.5, "p50_ms": 40.0, "p95_ms": 90.0,
                                                           "holders": 1}, raising=False)
    monkeypatch.setattr(fake, "model_history", lambda m: [{"t": 1.0, "jobs": 3, "p50_ms": 41.0, "p95_ms": 80.0}],
                        raising=False)
    model = queue_view(fake, time.time())["models"][0]
    assert model["throughput"] == {"jobs_per_s": 2.5, "p50_ms": 40.0, "p95_ms": 90.0}
    assert model["history"] == [{"t": 1.0, "jobs": 3, "p50_ms": 41.0, "p95_ms": 80.0}]

    def broken(model: str) -> dict[str, float]:
        raise RuntimeError("measures unreadable")

    monkeypatch.setattr(fake, "model_throughput", broken, raising=False)
    model = queue_view(fake, time.time())["models"][0]
    assert model["throughput"] is None and model["history"] == [] and model["depth"] == 0


# ---- on the real stack ------------------------------------------------------------------------

def entry(client, name: str) -> dict:
    resp = client.get("/api/queues")
    assert resp.status_code == 200, resp.get_json()
    return next(m for m in resp.get_json()["models"] if m["model"] == name)


def test_depth_rises_with_queued_jobs_and_falls_as_they_run(client, register, worker) -> None:
    name = register({"load_delay_s": 6})  # its jobs wait in its queue while it loads
    assert entry(client, name)["depth"] == 0
    jobs = []
    for i in range(4):
        resp = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": f"job {i}"})
        assert resp.status_code == 202, resp.get_json()
        jobs.append(resp.get_json()["id"])
    seen = poll(lambda: (e := entry(client, name))["depth"] == 4 and e["oldest_age_s"] > 0 and e, 30,
                "four jobs waiting in the model's queue")
    assert seen["oldest_job"] == jobs[0] and seen["holders"] == [] and seen["chunk_depth"] == 0
    assert seen["oldest_created_at"] == client.get(f"/v1/jobs/{jobs[0]}").get_json()["created_at"]
    done = poll(lambda: (e := entry(client, name))["depth"] == 0 and e["holders"] and e, 90,
                "the queue drained by its holder")
    assert done["holders"] == [NODE] and done["oldest_job"] is None and done["oldest_age_s"] is None
    for job_id in jobs:
        assert wait_job(client, job_id, 60)["status"] == "succeeded"
    nodes = client.get("/api/queues").get_json()["nodes"]
    assert any(n["node"] == NODE and n["depth"] == 0 for n in nodes)
    if hasattr(Store, "model_throughput"):  # the workers' heartbeats report what they ran
        # The jobs may straddle two heartbeats: wait until every one has been reported.
        measured = poll(lambda: (e := entry(client, name))["throughput"]["jobs_per_s"]
                        and sum(p["jobs"] for p in e["history"]) >= len(jobs) and e, 30,
                        "the model's throughput reported by its holder, all four jobs")
        assert measured["throughput"]["p95_ms"] >= measured["throughput"]["p50_ms"] > 0
        assert sum(p["jobs"] for p in measured["history"]) == len(jobs)
    client.post(f"/v1/models/{name}/unload")


def test_the_queue_view_needs_the_key(stack_env: dict[str, str]) -> None:
    from web import create_app

    keyed = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_API_KEYS": "qv-key"}}).test_client()
    refused = keyed.get("/api/queues")
    assert refused.status_code == 401 and refused.get_json()["error"]["code"]
    assert keyed.get("/api/queues", headers={"Authorization": "Bearer qv-key"}).status_code == 200


def test_the_queue_view_without_valkey_is_a_503_envelope(stack_env: dict[str, str]) -> None:
    from modelbay.services import free_port
    from web import create_app

    down = create_app({"TESTING": True, "MODELBAY_ENV": {
        **stack_env, "MODELBAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}}).test_client()
    resp = down.get("/api/queues")
    assert resp.status_code == 503 and resp.headers.get("Retry-After"), resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"]
