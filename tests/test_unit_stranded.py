"""Stranded queues, taken messages and gone nodes (workers/node/stranded.py) on a fakeredis store;
test_stranded.py shows the same with real processes."""
from __future__ import annotations

import base64
import json
import time
import uuid

import fakeredis
import pytest

from tasks.dispatch import Dispatcher
from tasks.names import TASK_INFER, model_queue, node_queue
from workers.node.reaper import Reaper
from tasks.schemas import JobRecord, JobRequest, Manifest, ModelNode
from tasks.settings import load_settings
from tasks.store import Store
from tasks.keys import ORPHANS, UNACKED, UNACKED_INDEX
from workers.node.stranded import mark_orphaned, parse_message
from test_unit_tasks import node

# ``store._r``: the store's private Redis client, for the keys these tests look at directly.


class Broker:
    """Records sent tasks and stores each one as kombu's Redis transport does (LPUSH of the
    message JSON, the body base64 of [args, kwargs, embed])."""

    def __init__(self, r: fakeredis.FakeRedis) -> None:
        self.r = r
        self.sent: list[tuple[str, list[str], dict[str, int], str]] = []

    def send_task(self, name: str, args: list[str], queue: str, kwargs: dict[str, int] | None = None) -> None:
        self.sent.append((name, args, kwargs or {}, queue))
        self.r.lpush(queue, kombu_message(name, args, kwargs or {}))


def kombu_message(name: str, args: list[str], kwargs: dict[str, int]) -> str:
    body = base64.b64encode(json.dumps([args, kwargs, {}]).encode()).decode()
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"task": name, "id": uuid.uuid4().hex},
                       "properties": {"body_encoding": "base64", "delivery_tag": uuid.uuid4().hex, "priority": 0}})


@pytest.fixture
def world() -> tuple[Store, Broker, Reaper]:
    settings = load_settings({}, node_id="me", stranded_s=5.0)
    r = fakeredis.FakeRedis(decode_responses=True)
    store = Store(r, settings)
    broker = Broker(r)
    store.put_manifest("m", Manifest(backend="echo"))
    store.heartbeat(node("alive").model_copy(update={"instance": "i-alive"}))
    return store, broker, Reaper(store, Dispatcher(store, broker), settings, instance="i-me")


def queued_job(store: Store, broker: Broker) -> JobRecord:
    """A job sent to m's queue while ``alive`` held m; then ``alive`` stops holding it."""
    store.set_model_state(ModelNode(model="m", node="alive", state="ready"))
    job = Dispatcher(store, broker).submit(JobRequest(model="m", task="generate", input="x"),
                                           store.get_manifest("m"))
    store.delete_model_state("alive", "m")
    return job


def test_a_message_carries_the_route_and_only_one_reroute_wins(world) -> None:
    store, broker, _ = world
    job = queued_job(store, broker)
    assert job.routed == 1 and broker.sent == []  # the dispatcher pushes the message itself
    message = parse_message(store._r.lindex(model_queue("m"), 0))
    assert message is not None and (message.task, message.job_id, message.route) == (TASK_INFER, job.id, 1)
    dispatcher = Dispatcher(store, broker)
    dispatcher.route(job, store.get_manifest("m"))
    dispatcher.route(job, store.get_manifest("m"))  # the same snapshot again: someone else won
    assert store.get_job(job.id).routed == 2
    routes = [parse_message(raw).route for raw in reversed(store._r.lrange(model_queue("m"), 0, -1))]
    assert routes == [1, 2]  # the first route's message and the one re-route that won


def test_a_queue_without_holder_is_swept_after_stranded_s(world) -> None:
    store, broker, reaper = world
    job = queued_job(store, broker)
    mark_orphaned(store, ["m"])
    assert "rerouted" not in reaper.run_once()  # not yet: stranded_s has not passed
    store._r.delete("mb:reaper")
    mark_orphaned(store, ["m"], time.time() - 6)  # ZADD GT: an older time does not move it back
    store._r.zadd(ORPHANS, {"m": time.time() - 6})
    assert reaper.run_once()["rerouted"] == 1
    after = store.get_job(job.id)
    assert after.status == "loading" and after.routed == 2 and after.load_job is not None
    assert [parse_message(m).route for m in store._r.lrange(model_queue("m"), 0, -1)] == [2]  # the old one went
    assert store._r.zscore(ORPHANS, "m") is None


def test_a_queue_with_a_holder_is_left_alone(world) -> None:
    store, broker, reaper = world
    job = queued_job(store, broker)
    store.set_model_state(ModelNode(model="m", node="alive", state="ready"))
    store._r.zadd(ORPHANS, {"m": time.time() - 6})
    counts = reaper.run_once()
    assert "rerouted" not in counts and store.get_job(job.id).routed == 1
    assert store._r.llen(model_queue("m")) == 1 and store._r.zscore(ORPHANS, "m") is None


def test_a_gone_node_fails_its_pinned_jobs_once(world) -> None:
    store, broker, reaper = world
    store.set_model_state(ModelNode(model="m", node="alive", state="ready"))
    job = Dispatcher(store, broker).submit(JobRequest(model="m", task="generate", input="x", node="alive"),
                                           store.get_manifest("m"))
    store._r.delete("mb:node:alive")  # its heartbeat expired
    assert "pinned_failed" not in reaper.run_once()  # not yet: it may come back within stranded_s
    store._r.delete("mb:reaper")
    store._r.hset("mb:gone", "alive", time.time() - 6)
    assert reaper.run_once()["pinned_failed"] == 1
    assert store.get_job(job.id).error.type == "node_lost"
    assert store._r.llen(node_queue("alive")) == 0 and "alive" not in store._r.smembers("mb:nodes")
    assert store._r.zscore(ORPHANS, "m") is not None  # the model it held: its queue is checked later


def test_a_queued_load_given_to_a_process_that_restarted_is_placed_again(world) -> None:
    store, broker, reaper = world
    load, created = Dispatcher(store, broker).ensure_load("m", store.get_manifest("m"))
    assert created and load is not None and load.runner == "i-alive"
    waiter = Dispatcher(store, broker).submit(JobRequest(model="m", task="generate", input="x"),
                                              store.get_manifest("m"))
    assert waiter.load_job == load.id
    store.heartbeat(node("alive").model_copy(update={"instance": "i-new"}))  # same id, new process
    counts = reaper.run_once()
    assert counts["loads_failed"] == 1 and store.get_job(load.id).error.type == "node_lost"
    again = store.get_job(waiter.id)
    assert again.load_job not in (None, load.id) and again.routed == 2


def test_a_message_taken_by_a_lost_worker_is_rescued(world) -> None:
    store, broker, reaper = world
    job = queued_job(store, broker)
    raw = store._r.rpop(model_queue("m"))  # a worker took it (BRPOP) ...
    store._r.hset(UNACKED, "tag1", json.dumps([json.loads(raw), "", model_queue("m")]))
    store._r.zadd(UNACKED_INDEX, {"tag1": time.time() - 6})  # ... 6 s ago, and never started it
    assert "rerouted" not in reaper.run_once()  # no worker was lost: nothing is looked at
    store._r.delete("mb:reaper")
    reaper.sweeper.lost_worker()
    assert reaper.run_once()["rerouted"] == 1
    assert store.get_job(job.id).routed == 2 and not store._r.hexists(UNACKED, "tag1")
