"""The ready path (tasks/readypath.py): a new job for a model held ready is created and queued
in one round trip, writes what the slow path writes, and writes nothing when it does not apply.
On the session's real Valkey, in a database of its own (no worker or reaper reads it)."""
from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis

from tasks.catalog import CatalogCache
from tasks.dispatch import Dispatcher
from tasks.keys import JOBS, job_key, model_counts_key
from tasks.modelstats import Slot
from tasks.names import TASK_INFER, model_queue, node_queue
from tasks.nodestore import QueueFull
from tasks.publish import queue_key, task_message
from tasks.readypath import RECORD_IN_MESSAGE_MAX_BYTES
from tasks.schemas import JobRecord, JobRequest, Manifest, ModelNode, ModelNodeState, NodeRecord, utcnow
from tasks.settings import load_settings
from tasks.store import Store, new_job_id

DB = 9


class Sent:
    """Celery's producer: the ready path never uses it; a load placed by the slow path does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], str]] = []

    def send_task(self, name: str, args: list[str], queue: str, kwargs: dict[str, int] | None = None) -> None:
        self.sent.append((name, args, queue))


class Counting(redis.Redis):
    """A client that counts the commands (round trips: no pipelines here) it sends."""

    calls: list[str]

    def execute_command(self, *args: object, **options: object) -> object:
        self.calls.append(str(args[0]))
        return super().execute_command(*args, **options)


@pytest.fixture
def store(stack_env: dict[str, str]) -> Iterator[Store]:
    url = stack_env["MODELBAY_REDIS_URL"].rsplit("/", 1)[0] + f"/{DB}"
    client = Counting.from_url(url, decode_responses=True)
    client.calls = []
    client.flushdb()
    yield Store(client, load_settings({**stack_env, "MODELBAY_REDIS_URL": url}))
    client.flushdb()


def _node(store: Store, node: str, state: ModelNodeState = "ready", draining: bool = False, model: str = "m") -> None:
    store.heartbeat(NodeRecord(id=node, hostname="h", celery_hostname=f"modelbay@{node}", pid=1, backends=["echo"],
                               memory_budget_mb=1000, started_at=utcnow(), last_heartbeat=utcnow(),
                               draining=draining))
    store.set_model_state(ModelNode(model=model, node=node, state=state))


def _record(node: str | None = None) -> JobRecord:
    return JobRecord(id=new_job_id(), kind="inference", model="m", task="generate", input="a b", node=node, pin=node)


def _body(raw: str) -> list[object]:
    return json.loads(base64.b64decode(json.loads(raw)["body"]))


def _calls(store: Store) -> list[str]:
    return store._r.calls  # type: ignore[attr-defined]


def test_a_ready_model_is_one_round_trip_and_the_same_record_as_the_slow_path(store: Store) -> None:
    _node(store, "n1")
    dispatcher = Dispatcher(store, Sent())  # type: ignore[arg-type]
    request = JobRequest(model="m", task="generate", input="a b", params={"max_tokens": 2})
    dispatcher.submit(request, Manifest(backend="echo"))  # the first call also loads the script
    _calls(store).clear()
    fast = dispatcher.submit(request, Manifest(backend="echo"))
    assert _calls(store) == ["EVALSHA"], "a ready model's job costs one round trip"
    slow = _record()
    slow.input, slow.params = "a b", {"max_tokens": 2}
    dispatcher.route(slow, Manifest(backend="echo"), create=True, slot=Slot(0))
    stored = [JobRecord.model_validate_json(store._r.get(job_key(r.id)) or "") for r in (fast, slow)]
    assert stored[0] == fast and stored[0].status == "queued" and stored[0].routed == 1 and stored[0].queue_seq == 2
    ignore = {"id", "created_at", "queue_seq"}
    assert stored[0].model_dump(exclude=ignore) == stored[1].model_dump(exclude=ignore)
    assert stored[1].queue_seq == 3  # both took a number in the model's queue
    assert store._r.zscore(JOBS, fast.id) is not None and store._r.ttl(job_key(fast.id)) > store.settings.job_ttl_s
    messages = store._r.lrange(model_queue("m"), 0, -1)
    assert [_body(raw)[:2] for raw in messages[:2]] == [[[slow.id], {"route": 1}], [[fast.id], {"route": 1}]]
    theirs, ours = json.loads(messages[1]), json.loads(task_message(TASK_INFER, [fast.id], {"route": 1}, model_queue("m")))
    # the model queue's message carries the record as stored: the taker reads nothing
    assert theirs.pop("modelbay_record") == store._r.get(job_key(fast.id))
    for doc in (theirs, ours):
        for field in ("id", "root_id", "origin"):
            doc["headers"].pop(field)
        doc["properties"].pop("correlation_id"), doc["properties"].pop("delivery_tag")
    assert theirs == ours


@pytest.mark.parametrize("how", ["loading", "draining", "gone", "other model"])
def test_no_ready_holder_writes_nothing(store: Store, how: str) -> None:
    if how == "loading":
        _node(store, "n1", state="loading")
    elif how == "draining":
        _node(store, "n1", draining=True)
    elif how == "gone":
        _node(store, "n1")
        store.remove_node("n1")  # its id and model states stay until the reaper forgets them
    else:
        _node(store, "n1", model="other")
    before = {k: store._r.dump(k) for k in store._r.keys("*")}
    record = _record()
    assert store.submit_ready(record, Slot(0), model_queue("m"), b"message") is False
    assert {k: store._r.dump(k) for k in store._r.keys("*")} == before


def test_a_pinned_job_counts_only_its_node(store: Store) -> None:
    _node(store, "n1")
    _node(store, "n2", state="loading")
    assert store.submit_ready(_record(node="n2"), Slot(0), node_queue("n2"), b"m2") is False
    record = _record(node="n1")
    assert store.submit_ready(record, Slot(0), node_queue("n1"), b"m1") is True
    assert store._r.lrange(node_queue("n1"), 0, -1) == ["m1"] and store._r.llen(node_queue("n2")) == 0
    assert store.get_job(record.id) == record and record.node == record.pin == "n1"


def test_only_a_model_queue_message_carries_the_record_and_only_a_small_one(store: Store) -> None:
    """The taker's read is saved by the record in the message (workers/node/taker.py); a
    pinned job's message goes to Celery's consumer and carries none, nor does a record
    larger than RECORD_IN_MESSAGE_MAX_BYTES (it is read at the take)."""
    _node(store, "n1")
    dispatcher = Dispatcher(store, Sent())  # type: ignore[arg-type]
    small = dispatcher.submit(JobRequest(model="m", task="generate", input="a b"), Manifest(backend="echo"))
    big = dispatcher.submit(JobRequest(model="m", task="generate", input="x" * RECORD_IN_MESSAGE_MAX_BYTES),
                            Manifest(backend="echo"))
    pinned = dispatcher.submit(JobRequest(model="m", task="generate", input="a b", node="n1"), Manifest(backend="echo"))
    carried = {_body(raw)[0][0]: json.loads(raw).get("modelbay_record")  # type: ignore[index]
               for raw in store._r.lrange(model_queue("m"), 0, -1) + store._r.lrange(node_queue("n1"), 0, -1)}
    assert carried == {small.id: store._r.get(job_key(small.id)), big.id: None, pinned.id: None}
    assert all(r.status == "queued" for r in (small, big, pinned))


def test_the_cap_refuses_with_nothing_written_and_a_taken_id_is_left_alone(store: Store) -> None:
    _node(store, "n1")
    first = _record()
    assert store.submit_ready(first, Slot(1), model_queue("m"), b"one") is True
    with pytest.raises(QueueFull) as err:
        store.submit_ready(_record(), Slot(1), model_queue("m"), b"two")
    assert err.value.status == 429 and store._r.hget(model_counts_key("m"), "enq") == "1"
    again = first.model_copy(update={"input": "other"})
    assert store.submit_ready(again, Slot(0), model_queue("m"), b"three") is False
    assert store.get_job(first.id) == first and store._r.lrange(model_queue("m"), 0, -1) == ["one"]


def test_a_chunk_job_goes_on_the_low_priority_list(store: Store) -> None:
    from tasks.batches import CHUNK_PRIORITY, new_chunk_job_id

    _node(store, "n1")
    dispatcher = Dispatcher(store, Sent())  # type: ignore[arg-type]
    key, message = dispatcher._infer_message(new_chunk_job_id(), {"route": 1}, model_queue("m"))
    assert key == queue_key(model_queue("m"), CHUNK_PRIORITY) and json.loads(message)["properties"]["priority"] == 9


def _kept(store: Store, manifest: Manifest) -> tuple[CatalogCache, Manifest]:
    """A catalog cache holding ``manifest`` for model "m" as this process read it."""
    store.put_manifest("m", manifest)
    catalog = CatalogCache(store.manifest_raw)
    kept = catalog.manifest("m")
    assert kept is not None and catalog.raw_of("m", kept) is not None
    return catalog, kept


def test_a_kept_manifest_costs_no_read_and_a_changed_one_is_decided_again(store: Store) -> None:
    _node(store, "n1")
    catalog, kept = _kept(store, Manifest(backend="echo"))
    dispatcher = Dispatcher(store, Sent(), catalog)  # type: ignore[arg-type]
    request = JobRequest(model="m", task="generate", input="a b")
    dispatcher.submit(request, kept)  # loads the script
    _calls(store).clear()
    dispatcher.submit(request, kept)
    assert _calls(store) == ["EVALSHA"], "the kept manifest is checked in the script, not read"
    store.put_manifest("m", Manifest(backend="echo", max_queued=1))  # changed by another replica
    _calls(store).clear()
    with pytest.raises(QueueFull):  # decided on the stored manifest (its cap), not the kept one
        dispatcher.submit(request, kept)
    assert _calls(store)[:3] == ["EVALSHA", "HGET", "EVALSHA"]  # then the 429's Retry-After reads the rate
    fresh = catalog.manifest("m")
    assert fresh is not None and fresh.max_queued == 1 and catalog.raw_of("m", kept) is None


@pytest.mark.parametrize("change", ["deleted", "backend"])
def test_a_kept_manifest_that_no_longer_allows_the_job_writes_nothing(store: Store, change: str) -> None:
    from tasks.errors import InvalidRequest, NotFound

    _node(store, "n1")
    catalog, kept = _kept(store, Manifest(backend="echo"))
    dispatcher = Dispatcher(store, Sent(), catalog)  # type: ignore[arg-type]
    if change == "deleted":
        store.delete_manifest("m")
    else:
        store.put_manifest("m", Manifest(backend="sentence-transformers"))  # does not generate
    before = {k: store._r.dump(k) for k in store._r.keys("*")}
    with pytest.raises(NotFound if change == "deleted" else InvalidRequest) as err:
        dispatcher.submit(JobRequest(model="m", task="generate", input="a b"), kept)
    assert err.value.code == ("model_not_found" if change == "deleted" else "unsupported_task")
    assert {k: store._r.dump(k) for k in store._r.keys("*")} == before


def test_a_refusal_is_never_answered_from_the_kept_copy(store: Store) -> None:
    from tasks.errors import NotFound
    from web.util import job_manifest

    catalog, _ = _kept(store, Manifest(backend="sentence-transformers"))
    store.put_manifest("m", Manifest(backend="echo"))  # now it generates
    assert job_manifest(catalog, "m", "generate").backend == "echo"
    with pytest.raises(NotFound):
        job_manifest(catalog, "absent", "generate")
    store.put_manifest("absent", Manifest(backend="echo"))  # absence is never kept
    assert job_manifest(catalog, "absent", "generate").backend == "echo"
    store.delete_manifest("m")
    kept = job_manifest(catalog, "m", "embed")  # still kept: the submission's script finds it gone (above)
    assert kept.backend == "echo" and catalog.raw_of("m", kept) is not None
