"""Unit tests of the shared contract: names, settings, the store (fakeredis), placement."""
from __future__ import annotations

import multiprocessing
import threading
import time

import fakeredis
import pytest

from helpers import pushed
from tasks.cas import parse_event
from tasks.dispatch import Dispatcher, choose_node
from tasks.errors import Conflict, ErrorCode, NotFound, Unavailable
from tasks.names import invalid_model_name, model_from_token, model_queue, model_token
from tasks.schemas import JobRecord, JobRequest, Manifest, ModelNode, NodeRecord, model_size_mb, utcnow
from tasks.settings import load_settings
from tasks.keys import job_channel
from tasks.store import Store, new_job_id

# ``store._r``: the store's private Redis client, for the keys these tests look at directly.


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), load_settings({}))


class FakeCelery:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list, str]] = []

    def send_task(self, name: str, args: list, queue: str, kwargs: dict | None = None) -> None:
        self.sent.append((name, args, queue))


def node(node_id: str, backends=("echo",), budget=1000, used=0, loads=0) -> NodeRecord:
    return NodeRecord(id=node_id, hostname="h", celery_hostname=f"modelbay@{node_id}", pid=1,
                      backends=list(backends), memory_budget_mb=budget, memory_used_mb=used,
                      started_at=utcnow(), last_heartbeat=utcnow(), loads_in_flight=loads)


@pytest.mark.parametrize("name", ["echo", "org/model", "a.b:c@d+e-f_g", "Qwen/Qwen2.5-7B@v1:q4",
                                  "x" * 128, "ünïcode-free-but-1"[2:]])
def test_model_token_round_trips_and_is_queue_safe(name: str) -> None:
    token = model_token(name)
    assert model_from_token(token) == name
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in token)
    assert model_queue(name) == f"model.{token}"


def test_model_tokens_do_not_collide() -> None:
    names = ["a/b", "a_b", "a.b", "a_2fb", "a-b", "a:b"]
    assert len({model_token(n) for n in names}) == len(names)


def test_model_from_token_rejects_garbage() -> None:
    for bad in ["", "a b", "a/b", "_zz", "a_2"]:
        with pytest.raises(ValueError):
            model_from_token(bad)


@pytest.mark.parametrize("bad", ["", "../etc", "a/../b", "a//b", "/abs", "a/", ".hidden", "a b",
                                 "a\\b", "x" * 129, "m/load", "m/unload", "a\x00b"])
def test_invalid_model_names(bad: str) -> None:
    assert invalid_model_name(bad)


def test_settings_from_env_with_units_and_errors() -> None:
    s = load_settings({"MODELBAY_NODE_TTL_S": "2.5", "MODELBAY_WORKER_CONCURRENCY": "3",
                       "MODELBAY_API_KEYS": "a, b,,", "MODELBAY_NODE_ID": "gpu-0"})
    assert (s.node_ttl_s, s.worker_concurrency, s.api_key_list, s.node_queue) == (2.5, 3, ["a", "b"], "node.gpu-0")
    with pytest.raises(ValueError, match="MODELBAY_WORKER_CONCURRENCY"):
        load_settings({"MODELBAY_WORKER_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="MODELBAY_NODE_ID"):
        load_settings({"MODELBAY_NODE_ID": "has space"})


def test_job_request_input_must_fit_task() -> None:
    JobRequest(model="m", task="embed", input=["a", "b"])
    JobRequest(model="m", task="chat", input=[{"role": "user", "content": "hi"}])
    for task, value in [("embed", []), ("chat", "hi"), ("generate", ["a"]), ("image", 3)]:
        with pytest.raises(ValueError):
            JobRequest(model="m", task=task, input=value)
    with pytest.raises(ValueError):
        JobRequest(model="m", task="embed", input="a", surprise=1)


def test_terminal_state_is_never_overwritten(store: Store) -> None:
    job = store.create_job(JobRecord(id=new_job_id(), kind="inference", model="m", task="embed"))
    assert store.transition(job.id, "running").applied
    assert store.cancel(job.id).applied
    late = store.finish(job.id, "succeeded", result={"x": 1})
    assert not late.applied and late.record.status == "cancelled"
    assert store.get_job(job.id).result is None
    assert store._r.ttl(f"mb:job:{job.id}") > 0  # terminal records expire


def test_transition_respects_allowed_from(store: Store) -> None:
    job = store.create_job(JobRecord(id=new_job_id(), kind="load", model="m"))
    assert not store.transition(job.id, "running", allowed_from=("loading",)).applied
    change = store.transition(job.id, "loading", allowed_from=("queued",))
    assert change.applied and change.record.started_at is not None
    assert store.finish(job.id, "succeeded").record.finished_at is not None
    assert store.transition("0" * 32, "running").record is None


def test_concurrent_finishers_write_once(store: Store) -> None:
    job = store.create_job(JobRecord(id=new_job_id(), kind="inference", model="m", task="embed"))
    wins: list[str] = []

    def finisher(status: str) -> None:
        if store.finish(job.id, status, result=status).applied:
            wins.append(status)

    threads = [threading.Thread(target=finisher, args=(s,)) for s in ["succeeded", "cancelled"] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.get_job(job.id).status == wins[0]


# The same guarantee on a real Valkey (WATCH/MULTI as the server runs it), from threads that
# share one Store and from processes that each build their own from the URL.

JOBS = 40


def _status_of(who: str) -> str:
    return "succeeded" if int(who.rsplit("-", 1)[1]) % 2 else "cancelled"


def _finish_all(store: Store, job_ids: list[str], who: str, barrier) -> list[tuple[str, str]]:
    """Race to finish every job; each finisher writes its own result. The jobs it won."""
    status = _status_of(who)
    barrier.wait(60)
    return [(job_id, who) for job_id in job_ids
            if store.finish(job_id, status, result=who).applied]


def _finisher_process(url: str, job_ids: list[str], who: str, barrier, out) -> None:
    store = Store.from_settings(load_settings({"MODELBAY_REDIS_URL": url}))
    out.put(_finish_all(store, job_ids, who, barrier))


@pytest.fixture
def valkey_store(stack_env: dict[str, str]) -> Store:
    return Store.from_settings(load_settings(stack_env))


def _race_and_check(valkey_store: Store, run) -> None:
    jobs = [valkey_store.create_job(JobRecord(id=new_job_id(), kind="inference", model="m", task="embed")).id
            for _ in range(JOBS)]
    sub = valkey_store._r.pubsub()
    try:
        sub.subscribe(*[job_channel(j) for j in jobs])
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < JOBS:
            assert time.monotonic() < deadline, "subscriptions not confirmed"
            msg = sub.get_message(timeout=1)
            confirmed += bool(msg and msg["type"] == "subscribe")
        wins = run(jobs)  # returns when every finisher has returned
        # Redis runs commands one at a time: a sentinel published now arrives after every
        # event the finishers published.
        for j in jobs:
            valkey_store._r.publish(job_channel(j), "sentinel")
        events: dict[str, list[str]] = {j: [] for j in jobs}
        done = 0
        deadline = time.monotonic() + 10
        while done < JOBS:
            assert time.monotonic() < deadline, f"sentinels not received: {events}"
            msg = sub.get_message(timeout=1)
            if not msg or msg["type"] != "message":
                continue
            job_id = msg["channel"].rsplit(":", 1)[1]
            if msg["data"] == "sentinel":
                done += 1
            else:
                events[job_id].append(msg["data"])
    finally:
        sub.close()
    won: dict[str, list[str]] = {j: [] for j in jobs}
    for job_id, who in wins:
        won[job_id].append(who)
    assert all(len(w) == 1 for w in won.values()), {j: w for j, w in won.items() if len(w) != 1}
    for j in jobs:
        rec = valkey_store.get_job(j)
        who = won[j][0]
        assert rec.result == who and rec.status == _status_of(who), (rec, who)
        assert [parse_event(e)[0] for e in events[j]] == [rec.status], (j, events[j])  # exactly one terminal event
        carried = parse_event(events[j][0])[1]  # and it carries the record that won
        assert carried is not None and JobRecord.model_validate_json(carried) == rec


def test_concurrent_finishers_write_once_on_valkey_from_threads(valkey_store: Store) -> None:
    def run(jobs: list[str]) -> list[tuple[str, str]]:
        barrier = threading.Barrier(8)
        results: list[list[tuple[str, str]]] = []
        threads = [threading.Thread(target=lambda who=f"thread-{i}": results.append(
            _finish_all(valkey_store, jobs, who, barrier))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 8, "a finisher thread failed or hung"
        return [w for r in results for w in r]

    _race_and_check(valkey_store, run)


def test_concurrent_finishers_write_once_on_valkey_from_processes(valkey_store: Store) -> None:
    ctx = multiprocessing.get_context("spawn")
    url = valkey_store.settings.redis_url

    def run(jobs: list[str]) -> list[tuple[str, str]]:
        n = 4
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_finisher_process, args=(url, jobs, f"process-{i}", barrier, out))
                 for i in range(n)]
        for p in procs:
            p.start()
        try:
            results = [out.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(30)
                assert p.exitcode == 0, f"finisher process exited {p.exitcode}"
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [w for r in results for w in r]

    _race_and_check(valkey_store, run)


def test_list_jobs_filters_and_skips_expired(store: Store) -> None:
    ids = []
    for i in range(5):
        rec = store.create_job(JobRecord(id=new_job_id(), kind="inference", model=f"m{i % 2}", task="embed"))
        ids.append(rec.id)
    store.cancel(ids[0])
    store._r.delete(f"mb:job:{ids[1]}")
    assert [j.id for j in store.list_jobs(limit=10)] == [ids[4], ids[3], ids[2], ids[0]]
    assert {j.model for j in store.list_jobs(model="m0")} == {"m0"}
    assert [j.id for j in store.list_jobs(status="cancelled")] == [ids[0]]


def test_claim_load_is_single_flight(store: Store) -> None:
    first, created = store.claim_load("n1", "m", JobRecord(id=new_job_id(), kind="load", model="m", node="n1"))
    again, created2 = store.claim_load("n1", "m", JobRecord(id=new_job_id(), kind="load", model="m", node="n1"))
    assert created and not created2 and again.id == first.id
    store.finish(first.id, "succeeded")
    third, created3 = store.claim_load("n1", "m", JobRecord(id=new_job_id(), kind="load", model="m", node="n1"))
    assert created3 and third.id != first.id
    store.release_load("n1", "m", first.id)  # stale release leaves the new claim alone
    assert store.active_load("n1", "m").id == third.id


def test_choose_node_prefers_free_fit_then_fit_after_eviction_then_fewest_loads() -> None:
    m = Manifest(backend="echo", memory_mb=500)
    nodes = [node("a", budget=400), node("b", used=100, loads=1), node("c", used=300), node("d", used=100)]
    assert choose_node(nodes, m).id == "d"  # fits, no loads in flight, most free
    full = node("e", used=900)
    evictable = node("f", used=900).model_copy(update={"memory_evictable_mb": 600})
    assert choose_node([full, evictable], m).id == "f"
    assert choose_node([node("small", budget=100), node("big", budget=400)], m).id == "big"
    with pytest.raises(Unavailable):
        choose_node([node("x", backends=("llama-cpp",))], m)


def test_model_size_comes_from_memory_mb_else_the_files() -> None:
    assert model_size_mb(Manifest(backend="echo", memory_mb=7)) == 7
    files = [{"uri": "https://h/a", "size": 3 * 1024 * 1024 + 1}, {"uri": "https://h/b"}]
    assert model_size_mb(Manifest(backend="echo", files=files)) == 4


def test_load_cooldown_doubles_and_is_cleared_by_success(store: Store) -> None:
    assert store.cooldown("m") is None
    assert store.note_load_failure("m", "boom") == 10.0
    assert store.note_load_failure("m", "boom again") == 20.0
    left, error = store.cooldown("m")
    assert 19 < left <= 20 and error == "boom again"
    for _ in range(10):
        last = store.note_load_failure("m", "x")
    assert last == 300.0
    store.clear_cooldown("m")
    assert store.cooldown("m") is None


def test_placement_answers_503_while_a_failed_model_cools_down(store: Store) -> None:
    d = Dispatcher(store, FakeCelery())
    store.heartbeat(node("n1"))
    store.note_load_failure("m", "no such file")
    with pytest.raises(Unavailable) as info:
        d.ensure_load("m", Manifest(backend="echo"))
    assert info.value.code == "load_cooldown" and int(info.value.headers["Retry-After"]) >= 9
    assert "no such file" in info.value.message


def test_dispatch_places_one_load_and_queues_jobs_on_the_model_queue(store: Store) -> None:
    celery = FakeCelery()
    d = Dispatcher(store, celery)
    store.heartbeat(node("n1"))
    m = Manifest(backend="echo")
    j1 = d.submit(JobRequest(model="org/m", task="generate", input="hi"), m)
    j2 = d.submit(JobRequest(model="org/m", task="generate", input="hi"), m)
    assert j1.status == j2.status == "loading" and j1.load_job == j2.load_job
    loads = [s for s in celery.sent if s[0] == "modelbay.load"]
    assert loads == [("modelbay.load", [j1.load_job], "node.n1")]
    assert pushed(store, "model.org_2fm") == [j1.id, j2.id]
    assert set(store.pop_waiters(j1.load_job)) == {j1.id, j2.id}


def test_dispatch_ready_model_needs_no_load_and_pins_go_to_the_node_queue(store: Store) -> None:
    celery = FakeCelery()
    d = Dispatcher(store, celery)
    store.heartbeat(node("n1"))
    store.heartbeat(node("n2"))
    store.set_model_state(ModelNode(model="m", node="n1", state="ready"))
    job = d.submit(JobRequest(model="m", task="embed", input="x"), Manifest(backend="echo"))
    assert job.status == "queued" and celery.sent == [] and pushed(store, "model.m") == [job.id]
    pinned = d.submit(JobRequest(model="m", task="embed", input="x", node="n2"), Manifest(backend="echo"))
    assert pinned.status == "loading"
    assert ("modelbay.load", [pinned.load_job], "node.n2") in celery.sent
    assert pushed(store, "node.n2") == [pinned.id]
    with pytest.raises(NotFound):
        d.ensure_load("m", Manifest(backend="echo"), "ghost")
    with pytest.raises(Conflict):
        d.ensure_load("m", Manifest(backend="diffusers"), "n1")


def test_a_job_registered_after_its_load_failed_fails_too(store: Store, monkeypatch) -> None:
    celery = FakeCelery()
    d = Dispatcher(store, celery)
    store.heartbeat(node("n1"))
    real_add_waiter = store.add_waiter

    def load_fails_first(load_id: str, job_id: str) -> None:
        store.fail(load_id, ErrorCode.LOAD_FAILED, "boom")  # the worker fails the load right here
        assert store.pop_waiters(load_id) == []
        real_add_waiter(load_id, job_id)

    monkeypatch.setattr(store, "add_waiter", load_fails_first)
    job = d.submit(JobRequest(model="m", task="embed", input="x"), Manifest(backend="echo"))
    rec = store.get_job(job.id)
    assert rec.status == "failed" and "boom" in rec.error.message


def test_the_backend_registry_refuses_typos_and_tasks_it_cannot_do(monkeypatch) -> None:
    from tasks import backends
    from tasks.errors import InvalidRequest
    from tasks.backends import BACKEND_EXTRAS

    backends.check_backend("llama-cpp", {"n_ctx": 512, "repack": False})
    with pytest.raises(InvalidRequest) as typo:
        backends.check_backend("llama_cpp", {})
    assert (typo.value.code, typo.value.param) == ("unknown_backend", "backend")
    assert "did you mean 'llama-cpp'?" in typo.value.message
    with pytest.raises(InvalidRequest) as option:
        backends.check_backend("echo", {"dim": 4, "load_dealy_s": 1})
    assert (option.value.code, option.value.param) == ("unknown_option", "options.load_dealy_s")
    backends.check_task("echo", "chat", model="m")
    backends.check_task("retired-backend", "image", model="m")  # not judged: placement answers no_node
    with pytest.raises(InvalidRequest) as task:
        backends.check_task("sentence-transformers", "generate", model="m")
    assert (task.value.code, task.value.param) == ("unsupported_task", "task")
    assert BACKEND_EXTRAS["llama-cpp"] == ("llama_cpp", "llama") and "echo" not in BACKEND_EXTRAS
    backends.installed_backends.cache_clear()
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object() if name == "diffusers" else None)
    try:
        assert load_settings({"MODELBAY_BACKENDS": "auto"}).backend_list == ["echo", "diffusers"]
    finally:
        backends.installed_backends.cache_clear()
    assert load_settings({"MODELBAY_BACKENDS": "echo, llama-cpp"}).backend_list == ["echo", "llama-cpp"]


@pytest.mark.parametrize("which", ["fake", "valkey"])
def test_a_write_from_a_stale_read_is_decided_again(which, store, request) -> None:
    """The compare-and-set (tasks/cas.py): a writer that read the record before someone else
    changed it does not overwrite that change; it re-reads and decides on the current record
    (here: cancelled meanwhile, so the finish is not applied). Real Valkey and fakeredis."""
    s: Store = store if which == "fake" else request.getfixturevalue("valkey_store")
    job = s.create_job(JobRecord(id=new_job_id(), kind="inference", model="m", task="generate"))
    got = s.get_job_raw(job.id)
    assert got is not None
    running = s.transition(job.id, "running", allowed_from=("queued",), known=got[1])
    assert running.applied and running.raw is not None and job.id in s.inflight_ids()
    assert s.cancel(job.id).applied
    late = s.finish(job.id, "succeeded", result={"text": "late"}, known=running.raw)
    assert not late.applied and late.record is not None and late.record.status == "cancelled"
    assert s.get_job(job.id).status == "cancelled" and s.get_job(job.id).result is None
    assert job.id not in s.inflight_ids()  # the cancel's write took it out of the in-flight set
    gone = s.transition("0" * 32, "running", known=got[1])  # a record that is not there
    assert not gone.applied and gone.record is None
