"""The model queues' consumer (workers/node/taker.py) on the session's real Valkey, in a database
of its own: what it takes, in which order, when, what it leaves in kombu's ``unacked`` while a
job runs, and that kombu itself restores what it leaves. The tasks are real Celery tasks of a
test app, called in the taker's threads; the end-to-end path (a real worker, its SIGKILL and
SIGTERM) is in test_faults.py, test_stranded.py and test_worker_stop.py."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from kombu import Connection

from tasks.cas import Note
from tasks.keys import UNACKED, UNACKED_INDEX, job_key
from tasks.publish import queue_key, task_message
from tasks.queues import QueueStore
from tasks.redisconn import SOCKET_TIMEOUT_S, make_client
from tasks.schemas import JobRecord
from tasks.settings import load_settings
from tasks.store import Store, new_job_id
from tests.helpers import every, poll
from workers.node.taker import BLOCK_S, QueueTaker

DB = 10


class Calls:
    """What the test tasks saw, and the gate the blocking one waits at."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gate = threading.Event()
        self.lock = threading.Lock()

    def note(self, what: str) -> None:
        with self.lock:
            self.started.append(what)


APP = Celery("taker-test", set_as_current=False)
CALLS = [Calls()]  # the current test's; the tasks are registered once (Celery keeps names per process)


@APP.task(name="taker-test.block")
def block(what: str) -> None:
    calls = CALLS[0]
    calls.note(what)
    if not calls.gate.wait(30):
        raise RuntimeError("the test never opened the gate")


@APP.task(name="taker-test.quick")
def quick(what: str, extra: int = 0) -> None:
    CALLS[0].note(f"{what}:{extra}")


@APP.task(name="taker-test.raise")
def fails(what: str) -> None:
    CALLS[0].note(what)
    raise ValueError("a task that fails")


@pytest.fixture
def world(stack_env: dict[str, str]) -> Iterator[dict[str, object]]:
    url = stack_env["MODELBAY_REDIS_URL"].rsplit("/", 1)[0] + f"/{DB}"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    calls = CALLS[0] = Calls()
    app = APP
    takers: list[QueueTaker] = []

    def make(threads: int) -> QueueTaker:
        taker = QueueTaker(QueueStore(r), app, f"inst{len(takers)}", threads)
        takers.append(taker)
        taker.start()
        return taker

    extra: list[QueueTaker] = []
    yield {"r": r, "calls": calls, "make": make, "url": url, "extra": extra}
    calls.gate.set()
    for taker in takers + extra:
        taker.stop_taking()
        taker.join(5)
    r.flushdb()


def push(r: redis.Redis, queue: str, task: str, *args: object, priority: int = 0, **kwargs: object) -> str:
    raw = task_message(task, list(args), kwargs, queue, priority).decode()
    r.lpush(queue_key(queue, priority), raw)
    return raw


def blocked(r: redis.Redis) -> int:
    return int(r.info("clients")["blocked_clients"])


def test_a_job_runs_in_a_taker_thread_held_in_unacked_until_it_ends(world) -> None:
    r, calls = world["r"], world["calls"]
    taker = world["make"](2)
    raw = push(r, "model.a", "taker-test.block", "one")
    taker.consume("model.a")
    poll(lambda: calls.started == ["one"], 5, "the job to start")
    assert r.llen("model.a") == 0
    entries = r.hgetall(UNACKED)
    assert len(entries) == 1
    (tag, entry), = entries.items()
    assert json.loads(entry) == [json.loads(raw), "", "model.a"]  # kombu's QoS.append format
    assert tag == json.loads(raw)["properties"]["delivery_tag"]
    assert abs(float(r.zscore(UNACKED_INDEX, tag)) - time.time()) < 5
    assert taker.busy()
    calls.gate.set()
    poll(lambda: not r.hlen(UNACKED) and not r.zcard(UNACKED_INDEX), 5, "the acknowledgement")
    poll(lambda: not taker.busy(), 5, "the thread to be free")


def test_kombu_restores_what_the_taker_left_in_unacked(world) -> None:
    """A worker killed while its job runs: kombu (any worker's, after the visibility
    timeout) puts the message back on its queue, at its priority."""
    r, calls = world["r"], world["calls"]
    taker = world["make"](1)
    raw = push(r, "model.b", "taker-test.block", "chunk", priority=9)
    taker.consume("model.b")
    poll(lambda: calls.started == ["chunk"], 5, "the job to start")
    tag = json.loads(raw)["properties"]["delivery_tag"]
    with Connection(world["url"], transport_options={"visibility_timeout": 3600}) as conn:
        conn.default_channel.qos.restore_by_tag(tag, leftmost=True)
    back = r.lrange(queue_key("model.b", 9), 0, -1)
    assert len(back) == 1 and not r.hlen(UNACKED)
    restored = json.loads(back[0])
    assert restored["body"] == json.loads(raw)["body"] and restored["headers"]["redelivered"] is True


def test_a_thread_takes_a_message_only_when_it_is_free(world) -> None:
    r, calls = world["r"], world["calls"]
    taker = world["make"](2)
    for what in ("x1", "x2", "x3"):
        push(r, "model.c", "taker-test.block", what)
    taker.consume("model.c")
    poll(lambda: len(calls.started) == 2, 5, "two jobs to start")
    assert r.llen("model.c") == 1 and r.hlen(UNACKED) == 2  # nothing taken ahead of a free thread
    calls.gate.set()
    poll(lambda: len(calls.started) == 3 and not r.hlen(UNACKED), 5, "the third job")
    assert sorted(calls.started) == ["x1", "x2", "x3"]


def test_interactive_jobs_are_taken_before_chunks_and_queues_take_turns(world) -> None:
    r, calls = world["r"], world["calls"]
    push(r, "model.d", "taker-test.quick", "chunk", priority=9)
    push(r, "model.d", "taker-test.quick", "first", extra=1)
    push(r, "model.d", "taker-test.quick", "second", extra=2)
    push(r, "model.e", "taker-test.quick", "other")
    taker = world["make"](1)
    taker.consume("model.d")
    taker.consume("model.e")
    poll(lambda: len(calls.started) == 4, 5, "the four jobs")
    assert calls.started[-1] == "chunk:0"  # priority 0 of every queue first
    assert calls.started[:3] in (["first:1", "other:0", "second:2"], ["other:0", "first:1", "second:2"])


def test_consuming_and_cancelling_wake_the_blocked_threads(world) -> None:
    """A queue consumed or cancelled takes effect at once, not when a BRPOP times out."""
    r, calls = world["r"], world["calls"]
    before = blocked(r)
    taker = world["make"](1)
    taker.consume("model.f")
    poll(lambda: blocked(r) == before + 1, 5, "the thread blocked on model.f")
    push(r, "model.g", "taker-test.quick", "g")
    began = time.monotonic()
    taker.consume("model.g")
    poll(lambda: calls.started == ["g:0"], BLOCK_S / 2, "model.g's job, well before a BRPOP times out")
    assert time.monotonic() - began < BLOCK_S
    poll(lambda: blocked(r) == before + 1, 5, "the thread blocked again")
    taker.cancel("model.g")
    push(r, "model.g", "taker-test.quick", "not taken")
    push(r, "model.f", "taker-test.quick", "f")
    poll(lambda: calls.started == ["g:0", "f:0"], BLOCK_S / 2, "model.f's job")
    assert r.llen("model.g") == 1 and taker.consumed() == ["model.f"]


def test_an_idle_thread_blocks_under_the_reply_timeout_on_the_connection_it_has(world, stack_env) -> None:
    """A BRPOP the client gives up on may still be handed a message by the server, and that
    message is lost. With the store's own client (tasks/redisconn.py), an idle thread's
    BRPOPs must end on the server's side: no reply timeout, no reconnect, for longer than the
    reply timeout. (With a BRPOP as long as the timeout, each idle thread reconnected every
    5 s, and with 64 mostly idle threads about one message in a few hundred was lost.)"""
    r, calls = world["r"], world["calls"]
    client = make_client(load_settings({**stack_env, "MODELBAY_REDIS_URL": world["url"]}))
    taker = QueueTaker(QueueStore(client), APP, "idle", 2)
    world["extra"].append(taker)
    before = blocked(r)
    taker.consume("model.idle")
    taker.start()
    poll(lambda: blocked(r) == before + 2, 5, "both threads blocked")
    brpops = {c["id"] for c in r.client_list() if "BRPOP" in c.get("cmd", "").upper()}
    connections = r.info("stats")["total_connections_received"]
    for _ in every(0.25, SOCKET_TIMEOUT_S + 2 * BLOCK_S):
        assert r.info("stats")["total_connections_received"] == connections, "a taker thread reconnected"
    assert {c["id"] for c in r.client_list() if "BRPOP" in c.get("cmd", "").upper()} >= brpops
    assert BLOCK_S <= SOCKET_TIMEOUT_S - 2
    push(r, "model.idle", "taker-test.quick", "after")
    poll(lambda: calls.started == ["after:0"], 5, "the job pushed after the idle spell")


def test_bad_messages_and_failing_tasks_are_acknowledged_and_the_thread_goes_on(world, caplog) -> None:
    r, calls = world["r"], world["calls"]
    r.lpush("model.h", "not a message")
    push(r, "model.h", "taker-test.nobody", "unknown task")
    push(r, "model.h", "taker-test.raise", "raises")
    push(r, "model.h", "taker-test.quick", "after")
    taker = world["make"](1)
    taker.consume("model.h")
    poll(lambda: calls.started == ["raises", "after:0"], 5, "the failing task, then the next")
    poll(lambda: not r.hlen(UNACKED) and not r.llen("model.h"), 5, "everything acknowledged")
    logged = caplog.text
    assert "not a task message" in logged and "unknown task 'taker-test.nobody'" in logged and "raised" in logged


def test_stop_taking_lets_the_running_job_end_and_takes_nothing_more(world) -> None:
    r, calls = world["r"], world["calls"]
    taker = world["make"](2)
    push(r, "model.i", "taker-test.block", "running")
    taker.consume("model.i")
    poll(lambda: calls.started == ["running"], 5, "the job to start")
    taker.stop_taking()
    assert not taker.join(0.2) and taker.busy()
    push(r, "model.i", "taker-test.quick", "after the stop")
    calls.gate.set()
    assert taker.join(5)
    assert calls.started == ["running"] and r.llen("model.i") == 1 and not r.hlen(UNACKED)


class Dispatcher:
    """Records what a Celery event dispatcher is asked to send (Flower's source)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.sent: list[tuple[str, dict[str, object]]] = []

    def send(self, type: str, **fields: object) -> None:
        self.sent.append((type, fields))


def test_task_events_are_sent_only_while_the_dispatcher_is_enabled(world) -> None:
    r, calls = world["r"], world["calls"]
    dispatcher = Dispatcher(enabled=False)
    taker = QueueTaker(QueueStore(r), APP, "events", 1, events=lambda: dispatcher)
    world["extra"].append(taker)
    taker.start()
    taker.consume("model.j")
    push(r, "model.j", "taker-test.quick", "quiet")
    poll(lambda: calls.started == ["quiet:0"] and not r.hlen(UNACKED), 5, "the job")
    assert dispatcher.sent == []
    dispatcher.enabled = True  # Flower's enable_events
    ok = json.loads(push(r, "model.j", "taker-test.quick", "seen"))["headers"]["id"]
    bad = json.loads(push(r, "model.j", "taker-test.raise", "fails"))["headers"]["id"]
    poll(lambda: len(dispatcher.sent) == 6, 5, "six events")
    assert [(t, f["uuid"]) for t, f in dispatcher.sent] == [
        ("task-received", ok), ("task-started", ok), ("task-succeeded", ok),
        ("task-received", bad), ("task-started", bad), ("task-failed", bad)]
    received = dispatcher.sent[0][1]
    assert received["name"] == "taker-test.quick" and "seen" in str(received["args"])
    assert "a task that fails" in str(dispatcher.sent[5][1]["exception"])


def test_the_take_reads_a_key_in_the_same_round_trip(world) -> None:
    """An inference message's job record comes with the take (infer then reads nothing)."""
    r = world["r"]
    r.set("mb:job:abc", '{"id": "abc"}')
    queues = QueueStore(r)
    assert queues.note_taken("tag1", "[]", 1.0, read="mb:job:abc") == '{"id": "abc"}'
    assert queues.note_taken("tag2", "[]", 2.0, read="mb:job:gone") is None
    assert queues.note_taken("tag3", "[]", 3.0) is None
    assert r.zrange(UNACKED_INDEX, 0, -1, withscores=True) == [("tag1", 1.0), ("tag2", 2.0), ("tag3", 3.0)]


def test_a_job_write_records_the_take_and_its_final_write_acknowledges_it(world, stack_env) -> None:
    """A message that carried its job's record (tasks/readypath.py) is recorded as taken by the
    job's move to running and acknowledged by its final write, each in that write's round
    trip (tasks/cas.py): recorded whether or not the write is made, acknowledged only with it."""
    r = world["r"]
    store = Store(r, load_settings({**stack_env, "MODELBAY_REDIS_URL": world["url"]}))
    job = store.create_job(JobRecord(id=new_job_id(), kind="inference", model="m", task="generate", input="x"))
    queued = r.get(job_key(job.id))
    running = store.transition(job.id, "running", allowed_from=("queued",), known=queued, note=Note("t1", "[1]", 7.0))
    assert running.applied and r.hget(UNACKED, "t1") == "[1]" and r.zscore(UNACKED_INDEX, "t1") == 7.0
    done = store.finish(job.id, "succeeded", result={}, known=running.raw, ack="t1")
    assert done.applied and not r.hexists(UNACKED, "t1") and r.zscore(UNACKED_INDEX, "t1") is None

    other = store.create_job(JobRecord(id=new_job_id(), kind="inference", model="m", task="generate", input="y"))
    stale = r.get(job_key(other.id))
    assert store.cancel(other.id).applied
    moved = store.transition(other.id, "running", allowed_from=("queued",), known=stale, note=Note("t2", "[2]", 8.0))
    assert not moved.applied and moved.record is not None and moved.record.status == "cancelled"
    assert r.hget(UNACKED, "t2") == "[2]"  # recorded all the same: the taker acknowledges it
    late = store.finish(other.id, "succeeded", result={}, known=moved.raw, ack="t2")
    assert not late.applied and r.hget(UNACKED, "t2") == "[2]"  # no write, no acknowledgement

    third = store.create_job(JobRecord(id=new_job_id(), kind="inference", model="m", task="generate", input="z"))
    assert store.cancel(third.id).applied  # known terminal: nothing to write, the take recorded alone
    assert not store.transition(third.id, "running", known=r.get(job_key(third.id)), note=Note("t3", "[3]", 9.0)).applied
    assert r.hget(UNACKED, "t3") == "[3]"
