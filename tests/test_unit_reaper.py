"""The reaper's rules on a fakeredis store (the fault tests show it on real processes)."""
from __future__ import annotations

import fakeredis
import pytest

from helpers import pushed
from tasks.dispatch import Dispatcher
from workers.node.reaper import Reaper
from tasks.schemas import JobRecord, Manifest
from tasks.settings import load_settings
from tasks.store import Store
from test_unit_tasks import FakeCelery, node

# ``store._r``: the store's private Redis client, for the keys these tests look at directly.


@pytest.fixture
def world() -> tuple[Store, FakeCelery, Reaper]:
    settings = load_settings({}, node_id="me", job_max_attempts=2)
    store = Store(fakeredis.FakeRedis(decode_responses=True), settings)
    celery = FakeCelery()
    store.put_manifest("m", Manifest(backend="echo"))
    for n, instance in (("alive", "i-alive"), ("draining", "i-drain")):
        store.heartbeat(node(n).model_copy(update={"instance": instance, "draining": n == "draining"}))
    return store, celery, Reaper(store, Dispatcher(store, celery), settings, instance="i-me")


def running(store: Store, job_id: str, on: str, runner: str, attempts: int = 1) -> None:
    store.create_job(JobRecord(id=job_id, kind="inference", model="m", task="generate", input="x"))
    store.transition(job_id, "running", node=on, runner=runner, attempts=attempts)


def test_jobs_of_lost_nodes_are_requeued_others_left_alone(world) -> None:
    store, celery, reaper = world
    running(store, "a" * 32, "gone", "i-gone")            # its node's heartbeat expired
    running(store, "b" * 32, "alive", "i-old")            # the node came back as a new process
    running(store, "c" * 32, "alive", "i-alive")          # healthy
    running(store, "d" * 32, "draining", "i-drain")       # stopping: finishes its jobs
    running(store, "e" * 32, "me", "i-me")                # this worker: alive whatever its record says
    running(store, "f" * 32, "gone", "i-gone", attempts=2)  # attempts used up
    counts = reaper.run_once()
    assert counts == {"requeued": 2, "failed": 1, "skipped": 0, "loads_failed": 0}
    status = {i: store.get_job(i * 32).status for i in "abcdef"}
    assert status == {"a": "loading", "b": "loading", "c": "running", "d": "running", "e": "running",
                      "f": "failed"}  # requeued jobs wait for a new load (nobody holds m)
    assert store.get_job("f" * 32).error.type == "node_lost"
    assert {store.get_job(i * 32).node for i in "ab"} == {None}  # not pinned to the lost node
    assert sorted(pushed(store, "model.m")) == ["a" * 32, "b" * 32]


def test_one_reaper_per_round(world) -> None:
    store, _, reaper = world
    running(store, "a" * 32, "gone", "i-gone")
    assert reaper.run_once()["requeued"] == 1
    assert reaper.run_once() == {}  # the round's lock is taken


def test_no_node_is_judged_lost_right_after_redis_was_out_of_reach(world, monkeypatch) -> None:
    """Node records expire while Redis is down only because nobody could refresh them: a round
    whose Redis call was blocked by the outage (its first round included) judges no node until
    every node has had a TTL to beat again; then the really lost one is reaped."""
    store, _, reaper = world
    running(store, "a" * 32, "gone", "i-gone")
    clock = [100.0, 110.0]  # the lock's SET was sent at 100 s and answered at 110 s (then it stays)
    monkeypatch.setattr("workers.node.reaper.time.monotonic", lambda: clock.pop(0) if len(clock) > 1 else clock[0])
    assert reaper.run_once() == {}
    assert store.get_job("a" * 32).status == "running"
    reaped_at = None
    for step in range(1, 40):  # a round every second, as the reaper's loop runs them
        now = 110.0 + step
        monkeypatch.setattr("workers.node.reaper.time.monotonic", lambda now=now: now)
        store._r.delete("mb:reaper")
        if reaper.run_once().get("requeued"):
            reaped_at = now
            break
        assert store.get_job("a" * 32).status == "running"
    assert reaped_at is not None and reaped_at >= 110.0 + reaper.settings.node_ttl_s + 1.0
