"""No job waits forever on a queue that nobody consumes (issue 13), with real processes: a
worker SIGKILLed and restarted under the same node id, the last holder of a model going
away while jobs wait in its queue, a load message taken but not started by a worker that
dies, and a pin to a dead node. Two workers on their own Valkey; small ``stranded_s``,
node TTL and reaper interval keep them fast."""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver import FileServer
from helpers import Worker, poll, start_worker, unique, wait_job
from tasks.cas import parse_event
from tasks.celery_app import make_celery
from tasks.dispatch import Dispatcher
from tasks.names import model_queue, node_queue
from modelbay.services import Service, start_valkey
from tasks.settings import load_settings
from tasks.store import Store
from workers.node.stranded import parse_message

# ``store._r``: the store's private Redis client, for the keys these tests look at directly.

STRANDED_S = 2.0
NODE_TTL_S = 2.0
# A worker restarted under its node id comes back well within this: its predecessor's record
# is still live, so only the new process's takeover (not the heartbeat's expiry) can help.
LONG_TTL_S = 30.0


@pytest.fixture(scope="module")
def stack(nats: Service, artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    run = tmp_path_factory.mktemp("stranded")
    valkey = start_valkey(run / "valkey", appendonly=False, log_path=artifacts / "valkey-stranded.log")
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(run),
           "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_NODE_TTL_S": str(NODE_TTL_S),
           "MODELBAY_REAPER_INTERVAL_S": "0.5", "MODELBAY_STRANDED_S": str(STRANDED_S),
           "MODELBAY_WORKER_STOP_GRACE_S": "3", "MODELBAY_BACKEND_STOP_GRACE_S": "2",
           "MODELBAY_CANCEL_POLL_S": "0.05", "MODELBAY_NODE_MEMORY_MB": "100",
           "MODELBAY_ALLOW_PRIVATE_SOURCES": "1", "MODELBAY_LOAD_COOLDOWN_BASE_S": "1"}
    settings = load_settings(env)
    store = Store.from_settings(settings, outage_s=30)
    workers: dict[str, Worker] = {}
    ttls: dict[str, float] = {}

    def start(node: str, ready: bool = True, ttl_s: float | None = None) -> Worker:
        """Start a worker for ``node`` (node TTL ``ttl_s``, default: as before, else
        ``NODE_TTL_S``); with ``ready`` wait until its own record is up (not a killed
        predecessor's that has not expired yet)."""
        ttls[node] = ttl_s or ttls.get(node, NODE_TTL_S)
        w = workers[node] = start_worker({**env, "MODELBAY_NODE_TTL_S": str(ttls[node])}, node, artifacts, store,
                                         concurrency=4)
        if ready:
            poll(lambda: (n := store.get_node(node)) is not None and n.pid == w.proc.pid, 60, f"{node} up")
        return w

    def with_ttl(node: str, ttl_s: float) -> None:
        """Make ``node``'s worker one with node TTL ``ttl_s`` (a graceful restart if needed)."""
        if ttls.get(node) != ttl_s:
            workers[node].stop(20)
            start(node, ttl_s=ttl_s)

    try:
        for node in (f"sa{os.getpid()}", f"sb{os.getpid()}"):
            start(node)
        from web import create_app

        client = create_app({"TESTING": True, "MODELBAY_ENV": env}).test_client()
        yield {"client": client, "store": store, "workers": workers, "start": start, "settings": settings,
               "with_ttl": with_ttl, "env": env}
    finally:
        for w in workers.values():
            w.stop(10)
        valkey.stop()


@pytest.fixture(autouse=True)
def _workers_up(stack) -> None:
    """Each test starts with both workers up as their current process (a test that restarts
    one submits before it is up, and leaves it booting)."""
    store = stack["store"]
    for node, w in stack["workers"].items():
        poll(lambda n=node, w=w: (r := store.get_node(n)) is not None and r.pid == w.proc.pid, 60, f"{node} up")


def register(client, **body) -> str:
    name = unique("s")
    body.setdefault("backend", "echo")
    assert client.put(f"/v1/models/{name}", json=body).status_code == 201
    return name


def load_on(client, name: str, node: str) -> None:
    resp = client.post(f"/v1/models/{name}/load", headers={"X-Modelbay-Node": node})
    if resp.status_code == 202:
        assert wait_job(client, resp.get_json()["id"], 30)["status"] == "succeeded"


def submit(client, name: str, text: str, node: str | None = None) -> dict:
    body = {"model": name, "task": "generate", "input": text, **({"node": node} if node else {})}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def kill(worker: Worker) -> None:
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)


def holders(client, name: str) -> list[str]:
    return [n["node"] for n in client.get(f"/v1/models/{name}").get_json()["nodes"] if n["state"] == "ready"]


def run_long(stack, node: str, threads: int) -> list[str]:
    """Occupy ``threads`` of ``node``'s model queue threads (workers.node.taker) with long jobs (about 8 s) of a model of
    its own (0 MB); returns their ids (cancel them when done)."""
    client, store = stack["client"], stack["store"]
    y = register(client, memory_mb=0, options={"token_delay_s": 0.5})
    load_on(client, y, node)
    long = [submit(client, y, " ".join(f"w{i}" for i in range(16)))["id"] for _ in range(threads)]
    poll(lambda: all(store.get_job(j).status == "running" for j in long), 20, f"{node}'s threads busy")
    return long


def cancel(client, ids: list[str]) -> None:
    for job in ids:
        client.delete(f"/v1/jobs/{job}")


def test_jobs_waiting_when_the_backend_crashes_are_routed_again(stack) -> None:
    client, store, workers = stack["client"], stack["store"], stack["workers"]
    a, _ = sorted(workers)
    x = register(client, memory_mb=10)
    load_on(client, x, a)
    long = run_long(stack, a, 4)
    try:
        waiting = [submit(client, x, f"waiting {i}")["id"] for i in range(2)]
        assert all(store.get_job(j).status == "queued" for j in waiting)  # all four threads are busy
        pid = next(n["pid"] for n in client.get(f"/v1/models/{x}").get_json()["nodes"] if n["node"] == a)
        os.kill(pid, signal.SIGKILL)  # a crash with jobs waiting in x's queue
        for i, job in enumerate(waiting):
            final = wait_job(client, job, 30)
            assert final["status"] == "succeeded" and final["result"]["text"] == f"waiting {i}"
            assert final["routed"] == 2  # routed again once, by the sweep
    finally:
        cancel(client, long)


def test_jobs_waiting_when_the_model_is_evicted_are_routed_again(stack) -> None:
    client, store, workers = stack["client"], stack["store"], stack["workers"]
    a, _ = sorted(workers)
    x = register(client, memory_mb=50)
    load_on(client, x, a)
    long = run_long(stack, a, 4)
    srv = FileServer()
    try:
        # z's size (55 MiB) is known once it is staged; a (100 MB) must then evict x, idle.
        srv.files["/z.bin"] = b"\0" * (55 * 1024 * 1024)
        srv.rate_bps = 20 * 1024 * 1024  # about 3 s of staging, on a Celery thread (loads have their own)
        z = register(client, files=[{"uri": srv.url("/z.bin"), "path": "z.bin"}])
        resp = client.post(f"/v1/models/{z}/load", headers={"X-Modelbay-Node": a})
        assert resp.status_code == 202
        z_load = resp.get_json()["id"]
        poll(lambda: store.get_job(z_load).status == "loading", 20, "z staging on a")
        waiting = [submit(client, x, f"waiting {i}")["id"] for i in range(2)]
        assert all(store.get_job(j).status == "queued" for j in waiting)  # all four threads are busy
        assert wait_job(client, z_load, 30)["status"] == "succeeded"
        assert a not in holders(client, x)  # evicted to make room for z
        for i, job in enumerate(waiting):
            final = wait_job(client, job, 30)
            assert final["status"] == "succeeded" and final["result"]["text"] == f"waiting {i}"
            assert final["routed"] == 2
        client.post(f"/v1/models/{z}/unload")
    finally:
        srv.close()
        cancel(client, long)


def test_jobs_waiting_when_the_model_is_unloaded_are_routed_again(stack) -> None:
    """An unload while a's threads are busy: the keep-alive expiry (the heartbeat thread's
    ``ModelManager.unload``, the path an explicit unload and an eviction take too)."""
    client, workers = stack["client"], stack["workers"]
    a, _ = sorted(workers)
    stack["with_ttl"](a, NODE_TTL_S)  # its heartbeat thread unloads idle models every TTL / 3
    x = register(client, memory_mb=10, keep_alive_s=6)
    load_on(client, x, a)
    long = run_long(stack, a, 4)
    try:
        job = submit(client, x, "still served")
        assert job["status"] == "queued"  # x was still ready on a: the job waits in x's queue
        poll(lambda: a not in holders(client, x), 20, "x unloaded after its keep-alive")
        final = wait_job(client, job["id"], 30)
        assert final["status"] == "succeeded" and final["result"]["text"] == "still served"
        assert final["routed"] == 2
    finally:
        cancel(client, long)


def test_a_job_sent_to_a_restarted_workers_model_queue_succeeds(stack) -> None:
    client, workers = stack["client"], stack["workers"]
    a, _ = sorted(workers)
    stack["with_ttl"](a, LONG_TTL_S)
    name = register(client)
    load_on(client, name, a)  # held on a only
    kill(workers[a])
    stack["start"](a, ready=False)  # the same node id, at once; the old record says a holds the model
    job = submit(client, name, "submitted in between")
    assert job["status"] == "queued"  # sent to the model queue on the old process's state
    final = wait_job(client, job["id"], 30)
    assert final["status"] == "succeeded" and final["result"]["text"] == "submitted in between"
    assert final["routed"] == 2  # handed back once by the takeover (or the reaper's sweep)


def test_100_jobs_in_flight_through_a_restart_succeed_once_each(stack) -> None:
    client, store, workers = stack["client"], stack["store"], stack["workers"]
    a, _ = sorted(workers)
    stack["with_ttl"](a, LONG_TTL_S)
    name = register(client, options={"token_delay_s": 0.05})
    load_on(client, name, a)  # the only holder: its queue loses its last consumer
    counts: Counter[str] = Counter()
    pubsub = store._r.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(**{"mb:jobev:*": lambda m: parse_event(m["data"])[0] == "succeeded" and counts.update([m["channel"][9:]])})
    listener = pubsub.run_in_thread(sleep_time=0.05, daemon=True)
    try:
        ids = [submit(client, name, f"job {i} one two three")["id"] for i in range(90)]
        poll(lambda: any((r := store.get_job(i)) and r.status == "running" and r.node == a for i in ids),
             30, f"a job running on {a}")
        kill(workers[a])
        stack["start"](a, ready=False)
        ids += [submit(client, name, f"job {i} one two three")["id"] for i in range(90, 100)]
        try:
            finals = [wait_job(client, i, 90) for i in ids]
        except AssertionError:
            stuck = [r.model_dump_json() for i in ids if not (r := store.get_job(i)).terminal]
            raise AssertionError(f"{len(stuck)} job(s) never ended:\n" + "\n".join(stuck[:10])) from None
        poll(lambda: all(counts[i] for i in ids), 5, "every success event")
    finally:
        listener.stop()
    assert [j["status"] for j in finals] == ["succeeded"] * 100
    assert [j["result"]["text"] for j in finals] == [f"job {i} one two three" for i in range(100)]
    assert [counts[i] for i in ids] == [1] * 100  # each result written once (loads succeed too)
    assert all(j["attempts"] <= 2 for j in finals)


class _Delayed:
    """Sends every task with a countdown: the worker takes the message at once (an ETA task
    is held unacknowledged in the worker) but starts it only later."""

    def __init__(self, settings) -> None:
        self.app = make_celery(settings)

    def send_task(self, name: str, **kwargs: object) -> object:
        return self.app.send_task(name, countdown=120, **kwargs)


def test_a_load_taken_but_not_started_by_a_killed_worker_is_placed_again(stack) -> None:
    client, store, workers = stack["client"], stack["store"], stack["workers"]
    a, _ = sorted(workers)
    stack["with_ttl"](a, LONG_TTL_S)  # a's old record outlives the restart: the takeover must act
    name = register(client)
    manifest = store.get_manifest(name)
    load, created = Dispatcher(store, _Delayed(stack["settings"])).ensure_load(name, manifest, node=a)
    assert created and load is not None

    def taken() -> bool:  # in the broker's unacked hash, no longer in a's queue
        held = [parse_message(json.dumps(json.loads(v)[0])) for v in store._r.hvals("unacked")]
        return any(m is not None and m.job_id == load.id for m in held) and not store._r.llen(node_queue(a))

    poll(taken, 20, "worker a to take the load message")
    waiter = submit(client, name, "served anyway")
    assert waiter["load_job"] == load.id
    kill(workers[a])
    killed_at = time.monotonic()
    stack["start"](a, ready=False)
    lost = wait_job(client, load.id, 20)
    assert lost["status"] == "failed" and lost["error"]["type"] == "node_lost"
    assert time.monotonic() - killed_at < STRANDED_S + 15  # the worker's boot, not the TTL (30 s)
    final = wait_job(client, waiter["id"], 30)
    assert final["status"] == "succeeded" and final["result"]["text"] == "served anyway"


def test_a_job_the_taker_took_and_a_kill_stopped_before_it_started_runs_elsewhere(stack, artifacts: Path) -> None:
    """The taker records a message in kombu's ``unacked`` before its job starts
    (workers/node/taker.py): a worker SIGKILLed in between loses no job. Here a third worker
    holds every job it takes for 60 s before starting it."""
    client, store, workers = stack["client"], stack["store"], stack["workers"]
    _, b = sorted(workers)
    c = f"sc{os.getpid()}"
    holder = start_worker({**stack["env"], "MODELBAY_TAKER_TEST_HOLD_S": "60"}, c, artifacts, store, concurrency=1)
    try:
        name = register(client)
        load_on(client, name, c)  # c alone holds it: c's taker takes the job
        job = submit(client, name, "taken, never started")

        def taken() -> bool:
            held = [parse_message(json.dumps(json.loads(v)[0])) for v in store._r.hvals("unacked")]
            return any(m is not None and m.job_id == job["id"] for m in held) and not store._r.llen(model_queue(name))

        poll(taken, 20, "c's taker to take the job")
        assert store.get_job(job["id"]).status == "queued"  # taken, not started
        load_on(client, name, b)  # a holder for the rescue
        kill(holder)
        final = wait_job(client, job["id"], NODE_TTL_S + 4 * STRANDED_S + 20)
        assert final["status"] == "succeeded" and final["result"]["text"] == "taken, never started"
        assert final["node"] == b and final["attempts"] == 1 and final["routed"] == 2
        poll(lambda: not any(job["id"] in v for v in store._r.hvals("unacked")), 10, "the old message dropped")
    finally:
        holder.stop(10)


def test_an_embed_job_cancelled_after_its_take_never_runs_and_stays_cancelled(stack, artifacts: Path) -> None:
    """An embed job moves to ``running`` while its backend call starts (workers/jobs/
    inference.py, ``Delivery.started``). One cancelled after its message was taken, from the
    record read at the take, gets as far as the call: the move fails, the call is cancelled,
    nothing is written, and the worker goes on."""
    client, store = stack["client"], stack["store"]
    c = f"se{os.getpid()}"
    holder = start_worker({**stack["env"], "MODELBAY_TAKER_TEST_HOLD_S": "3"}, c, artifacts, store, concurrency=1)
    try:
        name = register(client)
        load_on(client, name, c)  # c alone holds it
        resp = client.post("/v1/jobs", json={"model": name, "task": "embed", "input": ["one", "two"]})
        assert resp.status_code == 202, resp.get_json()
        job_id = resp.get_json()["id"]

        def held() -> bool:
            return any(job_id in v for v in store._r.hvals("unacked"))

        poll(held, 20, "c's taker to take the job")
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
        poll(lambda: not held(), 20, "the message acked once its hold ended")
        final = store.get_job(job_id)
        assert final is not None and final.status == "cancelled"
        assert final.result is None and final.started_at is None and final.attempts == 0 and final.node is None
        after = client.post("/v1/jobs", json={"model": name, "task": "embed", "input": "three"}).get_json()
        done = wait_job(client, after["id"], 30)
        assert done["status"] == "succeeded" and len(done["result"]["embeddings"]) == 1 and done["node"] == c
        log = holder.log_path.read_text()
        assert "Traceback" not in log and "crashed" not in log, log[-3000:]
    finally:
        holder.stop(10)


def test_a_job_cancelled_while_queued_is_taken_from_its_carried_record_and_never_runs(stack, artifacts: Path) -> None:
    """A ready model's job carries its record as queued in its message (tasks/readypath.py),
    and the taker's worker starts from it with no read (workers/node/taker.py). One cancelled
    while it waits is taken with that stale record: its move to ``running`` fails on the
    record it compares with, nothing runs, and the take recorded by that write is acknowledged."""
    client, store = stack["client"], stack["store"]
    c = f"sq{os.getpid()}"
    holder = start_worker(stack["env"], c, artifacts, store, concurrency=1)
    try:
        name = register(client, options={"token_delay_s": 0.5})
        load_on(client, name, c)  # c alone holds it, with one thread
        first = submit(client, name, "busy busy busy")
        poll(lambda: store.get_job(first["id"]).status == "running", 20, "the first job to run")
        second = submit(client, name, "never")
        waiting = [json.loads(m) for m in store._r.lrange(model_queue(name), 0, -1)]
        assert [json.loads(m["modelbay_record"])["id"] for m in waiting] == [second["id"]]
        assert client.delete(f"/v1/jobs/{second['id']}").status_code == 202
        third = submit(client, name, "after")  # the one thread takes it once done with the second
        assert wait_job(client, first["id"], 30)["status"] == "succeeded"
        assert wait_job(client, third["id"], 30)["status"] == "succeeded"
        ids = (first["id"], second["id"], third["id"])  # each acknowledged (earlier tests' kills leave others)
        assert not store._r.llen(model_queue(name)) and not [v for v in store._r.hvals("unacked") if any(i in v for i in ids)]
        final = store.get_job(second["id"])
        assert final is not None and final.status == "cancelled"
        assert final.started_at is None and final.attempts == 0 and final.node is None and final.result is None
        log = holder.log_path.read_text()
        assert "Traceback" not in log and "crashed" not in log, log[-3000:]
    finally:
        holder.stop(10)


def test_a_job_pinned_to_a_dead_node_fails_node_lost(stack) -> None:
    client, workers = stack["client"], stack["workers"]
    a, _ = sorted(workers)
    stack["with_ttl"](a, NODE_TTL_S)
    name = register(client)
    load_on(client, name, a)
    kill(workers[a])
    killed_at = time.monotonic()
    try:
        job = submit(client, name, "pinned", node=a)  # a's record has not expired yet
        final = wait_job(client, job["id"], NODE_TTL_S + STRANDED_S + 10)
        assert final["status"] == "failed" and final["error"]["type"] == "node_lost"
        assert time.monotonic() - killed_at < NODE_TTL_S + STRANDED_S + 3
    finally:
        stack["start"](a)
