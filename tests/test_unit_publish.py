"""The job's message written straight onto the broker's list (tasks/publish.py) against what
Celery's own ``send_task`` writes, on a real Valkey; and the dispatcher's choice of the two. (A
real worker consuming these messages is every end-to-end test: the API sends every job so.)"""
from __future__ import annotations

import base64
import json

import pytest
import redis

from helpers import unique
from tasks.celery_app import make_celery
from tasks.names import TASK_INFER
from tasks.publish import queue_key, task_message
from tasks.settings import load_settings

# Differ on every send: the task id (and so root_id, correlation_id), the delivery tag, the
# producer's pid (origin), and Celery's reply_to (the app's id, read only by a result backend,
# which modelbay has none of).
PER_SEND = {"id", "root_id", "origin", "correlation_id", "delivery_tag", "reply_to"}


def decoded(raw: str | bytes) -> dict:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for part in ("headers", "properties"):
        message[part] = {k: v for k, v in message[part].items() if k not in PER_SEND}
    return message


@pytest.fixture
def client(stack_env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(stack_env["MODELBAY_REDIS_URL"])


@pytest.mark.parametrize("priority", [0, 9])
def test_the_message_is_the_one_send_task_writes(client, stack_env, priority) -> None:
    celery = make_celery(load_settings(stack_env))
    queue = unique("model.publish")
    args, kwargs = ["0123456789abcdef0123456789abcdef"], {"route": 2, "reroutes": 1}
    celery.send_task(TASK_INFER, args=args, kwargs=kwargs, queue=queue, priority=priority)
    key = queue_key(queue, priority)
    assert client.llen(key) == 1, f"send_task wrote elsewhere: {client.keys(queue + '*')}"
    theirs = client.rpop(key)
    ours = task_message(TASK_INFER, args, kwargs, queue, priority)
    assert decoded(ours) == decoded(theirs)
    raw = json.loads(ours)
    assert raw["headers"]["root_id"] == raw["headers"]["id"] == raw["properties"]["correlation_id"]
    assert raw["headers"]["origin"].startswith("gen")


def test_priority_keys_follow_kombus_steps() -> None:
    assert queue_key("q") == queue_key("q", 0) == queue_key("q", 2) == "q"
    assert queue_key("q", 3) == queue_key("q", 5) == "q\x06\x163"
    assert queue_key("q", 9) == queue_key("q", 12) == "q\x06\x169"


class SentTasks:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list, str]] = []

    def send_task(self, name: str, args: list, queue: str, kwargs: dict | None = None) -> None:
        self.sent.append((name, args, queue))


@pytest.mark.parametrize("events", [False, True])
def test_routing_pushes_the_message_unless_task_events_are_on(events: bool) -> None:
    import fakeredis

    from tasks.batches import new_chunk_job_id
    from tasks.dispatch import Dispatcher
    from tasks.names import model_queue
    from tasks.schemas import JobRecord, Manifest, ModelNode, NodeRecord, utcnow
    from tasks.store import Store, new_job_id

    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    store = Store(fakeredis.FakeRedis(server=server, decode_responses=True), load_settings({"MODELBAY_CELERY_EVENTS": "1" if events else "0"}))
    store.heartbeat(NodeRecord(id="n1", hostname="h", celery_hostname="modelbay@n1", pid=1, backends=["echo"],
                               memory_budget_mb=1000, started_at=utcnow(), last_heartbeat=utcnow()))
    store.set_model_state(ModelNode(model="m", node="n1", state="ready"))
    celery = SentTasks()
    dispatcher = Dispatcher(store, celery)
    jobs = [JobRecord(id=new_job_id(), kind="inference", model="m", task="generate"),
            JobRecord(id=new_chunk_job_id(), kind="inference", model="m", task="batch")]
    for job in jobs:
        dispatcher.route(job, Manifest(backend="echo"), create=True)
    queue = model_queue("m")
    if events:  # Celery's producer, for Flower's task-sent events
        assert [(name, args[0]) for name, args, _ in celery.sent] == [(TASK_INFER, j.id) for j in jobs]
        return
    assert celery.sent == []
    interactive, chunk = (json.loads(raw) for key in (queue, queue_key(queue, 9)) for raw in r.lrange(key, 0, -1))
    assert json.loads(base64.b64decode(interactive["body"]))[0] == [jobs[0].id]
    assert json.loads(base64.b64decode(chunk["body"]))[0] == [jobs[1].id] and chunk["properties"]["priority"] == 9
