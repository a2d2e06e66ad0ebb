"""The job waiter (web/extensions.py) and the events it listens to (tasks/cas.py) on the
session's real Valkey: a terminal event carries a small record, so a waiter answers without
reading it back; a large one carries only the status; a job listened for before it exists
needs no read on entry; and without that, the waiter reads as before."""
from __future__ import annotations

import threading

import pytest

from helpers import poll
from tasks.cas import parse_event
from tasks.keys import EVENT_RECORD_MAX_BYTES, job_channel
from tasks.schemas import JobRecord
from tasks.store import Store, new_job_id
from web.extensions import JobWaiter


class Reads:
    """Counts ``store.get_job`` calls (the real ones run)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = store.get_job

        def counted(job_id: str) -> JobRecord | None:
            self.count += 1
            return real(job_id)

        monkeypatch.setattr(store, "get_job", counted)


def queued(store: Store, stream: bool = False) -> JobRecord:
    record = JobRecord(id=new_job_id(), kind="inference", model="waiter-test", task="embed", input="x",
                       status="queued", stream=stream)
    store.create_job(record)
    return record


def events_of(store: Store, job_id: str) -> tuple[list[str], threading.Thread]:
    seen: list[str] = []
    pubsub = store._r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(job_channel(job_id))

    def run() -> None:
        for message in pubsub.listen():
            seen.append(message["data"])
            if parse_event(message["data"])[0] in ("succeeded", "failed", "cancelled"):
                pubsub.close()
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return seen, t


@pytest.mark.parametrize("size", [10, EVENT_RECORD_MAX_BYTES])
@pytest.mark.parametrize("stream", [False, True])
def test_a_terminal_event_carries_a_small_record_only(store: Store, size: int, stream: bool) -> None:
    """And a step on the way is published for a streamed job only (its waiter stops at
    ``running``; every other waiter wants the end)."""
    record = queued(store, stream)
    seen, t = events_of(store, record.id)
    poll(lambda: store._r.pubsub_numsub(job_channel(record.id))[0][1] == 1, 5, "the subscription")
    store.transition(record.id, "running", allowed_from=("queued",))
    store.finish(record.id, "succeeded", result={"text": "y" * size})
    t.join(5)
    statuses = [parse_event(d) for d in seen]
    assert [s for s, _ in statuses] == (["running", "succeeded"] if stream else ["succeeded"])
    assert statuses[0][1] is None or not stream  # a step on the way: the status alone
    final = statuses[-1][1]
    if size < EVENT_RECORD_MAX_BYTES:
        assert final is not None and JobRecord.model_validate_json(final) == store.get_job(record.id)
    else:
        assert final is None  # too large to send to every web process


def test_a_waiter_answers_from_the_event_without_a_read(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    waiter = JobWaiter(store)
    job_id = new_job_id()
    waiter.expect(job_id)  # before the job exists, as a coalesced call's submit does
    assert waiter.subscribed.wait(5)  # the listener starts with the first wait (a server's first request)
    record = JobRecord(id=job_id, kind="inference", model="waiter-test", task="embed", input="x", status="queued")
    store.create_job(record)
    reads = Reads(store, monkeypatch)
    out: list[JobRecord | None] = []
    t = threading.Thread(target=lambda: out.append(waiter.wait(job_id, 10, known=record)), daemon=True)
    t.start()
    store.transition(job_id, "running", allowed_from=("queued",))
    store.finish(job_id, "succeeded", result={"embeddings": [[1.0, 0.0]]})
    t.join(10)
    assert out and out[0] is not None and out[0].status == "succeeded" and out[0].result == {"embeddings": [[1.0, 0.0]]}
    assert reads.count == 0
    assert not waiter._waiting and not waiter._expected  # nothing left registered


def test_without_expect_the_waiter_reads_on_entry(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    waiter = JobWaiter(store)
    record = queued(store)
    store.finish(record.id, "succeeded", result={"done": True})  # it ended before anyone waited
    reads = Reads(store, monkeypatch)
    got = waiter.wait(record.id, 5, known=record)  # ``known`` without expect() is not trusted
    assert got is not None and got.status == "succeeded" and reads.count == 1


def test_forget_drops_an_expected_job(store: Store) -> None:
    waiter = JobWaiter(store)
    job_id = new_job_id()
    waiter.expect(job_id)
    waiter.forget(job_id)
    assert not waiter._waiting and not waiter._expected


@pytest.mark.usefixtures("worker")
def test_no_route_leaves_a_job_listened_for(app, client, register) -> None:
    """Every way a route can end (an answer, a replay, respond-async, a refused submit)
    drops what it listened for."""
    name = register({"dim": 4})
    waiter = app.extensions["modelbay"].waiter
    assert client.post("/v1/jobs?wait=10", json={"model": name, "task": "embed", "input": "a"}).status_code == 200
    keyed, keyed_chat = ({"Idempotency-Key": f"k-{new_job_id()}"} for _ in range(2))
    for _ in range(2):  # the second is a replay of the first
        assert client.post("/v1/jobs?wait=10", json={"model": name, "task": "embed", "input": "b"},
                           headers=keyed).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "c"}]},
                           headers=keyed_chat).status_code == 200
    assert client.post("/v1/embeddings", json={"model": name, "input": "d"},
                       headers={"Prefer": "respond-async"}).status_code == 202
    assert client.post("/v1/jobs?wait=10", json={"model": "no-such-model", "task": "embed", "input": "e"}).status_code == 404
    assert client.post("/v1/embeddings", json={"model": name, "input": "f"}).status_code == 200
    assert not waiter._expected and not waiter._waiting
