"""Valkey under Sentinel, failed over for real: a primary, one replica and three Sentinels
(``valkey-server --sentinel``, short timeouts), a real web (gunicorn) and a real worker, all
on ``MODELBAY_REDIS_URL=sentinel://...``. The primary is SIGKILLed while 8 clients submit
200 echo jobs and a load runs; Sentinel promotes the replica. Proven: every job answered 202
succeeds with its own result, written once; submits during the failover get 503
``store_unavailable`` with ``Retry-After`` (never a 500 or a hang); the worker goes on
consuming from the new master with no restart; the load in flight completes.
Timings (the refusal window, the replica wait's cost) are printed, never asserted."""
from __future__ import annotations

import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from helpers import poll, unique
from modelbay.services import Service, start_sentinel, start_valkey, start_valkey_replica
from modelbay.stack import LocalStack
from tasks.settings import load_settings
from tasks.cas import parse_event
from tasks.store import Store

MASTER = "mbfail"
CLIENTS, PER_CLIENT = 8, 25
KILL_AFTER = 60  # jobs accepted before the primary is killed


def _port(service: Service) -> int:
    return int(service.url.rsplit(":", 1)[1].split("/")[0])


def _in_sync(replica: Service, sentinels: list[Service]) -> bool:
    """The replica is linked and every Sentinel knows it and the two other Sentinels."""
    if redis.Redis(port=_port(replica)).info("replication").get("master_link_status") != "up":
        return False
    for s in sentinels:
        r = redis.Redis(port=_port(s))
        if not r.sentinel_slaves(MASTER) or len(r.sentinel_sentinels(MASTER)) < 2:
            return False
    return True


@pytest.fixture(scope="module")
def ha(nats: Service, artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs, data = artifacts / "sentinel", Path(tempfile.mkdtemp(prefix="mb-sentinel-"))
    logs.mkdir(parents=True, exist_ok=True)
    servers: list[Service] = []
    try:
        primary = start_valkey(data / "primary", appendonly=False, log_path=logs / "primary.log")
        servers.append(primary)
        replica = start_valkey_replica(data / "replica", _port(primary), log_path=logs / "replica.log")
        servers.append(replica)
        sentinels = [start_sentinel(data / "sentinels", MASTER, _port(primary), down_after_ms=1000,
                                    failover_timeout_ms=3000, log_path=logs / f"sentinel{i}.log") for i in range(3)]
        servers += sentinels
        poll(lambda: _in_sync(replica, sentinels), 60, "replica linked and known to all Sentinels", 0.2)
        run = tmp_path_factory.mktemp("sentinel-run")
        env = {"MODELBAY_REDIS_URL": ";".join(s.url for s in sentinels), "MODELBAY_REDIS_SENTINEL_MASTER": MASTER,
               "MODELBAY_REDIS_WAIT_REPLICAS": "1", "MODELBAY_REDIS_WAIT_TIMEOUT_MS": "250",
               "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(run), "MODELBAY_MODELS_DIR": str(run / "models"),
               "MODELBAY_WORKER_METRICS_PORT": "0", "MODELBAY_LOG_REQUESTS": "1"}
        store = Store.from_settings(load_settings(env), outage_s=30)
        with LocalStack(logs, data, env) as stack:
            node = unique("sn")
            worker = stack.start_worker(node, concurrency=8, ready=lambda: store.get_node(node))
            web = stack.start_web(threads=16)
            yield {"primary": primary, "replica": replica, "sentinels": sentinels, "store": store, "web": web.url,
                   "worker": worker, "stack": stack, "node": node}
    finally:
        for s in reversed(servers):
            s.stop()


def _register(url: str, **options: object) -> str:
    name = unique("ha")
    resp = requests.put(f"{url}/v1/models/{name}", json={"backend": "echo", "options": options}, timeout=30)
    assert resp.status_code == 201, resp.text
    return name


def _wait_job(url: str, job_id: str, timeout_s: float) -> dict:
    def done() -> dict | None:
        body = requests.get(f"{url}/v1/jobs/{job_id}?wait=5", timeout=30).json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    return poll(done, timeout_s, f"job {job_id} to end", 0.2)


def _p50_submit_ms(url: str, model: str, n: int = 40) -> float:
    times = []
    with requests.Session() as session:
        for i in range(n):
            start = time.perf_counter()
            resp = session.post(f"{url}/v1/jobs", json={"model": model, "task": "generate", "input": f"w {i}"},
                                timeout=30)
            times.append((time.perf_counter() - start) * 1000)
            assert resp.status_code == 202, resp.text
    return statistics.median(times)


def test_replica_wait_cost_is_measured(ha: dict) -> None:
    """p50 submit latency with WAIT 1 (this web) and without (a second web): printed, for
    docs/reliability.md. Runs first: after the failover there is no replica left to wait for."""
    model = _register(ha["web"])
    ready = requests.post(f"{ha['web']}/v1/models/{model}/load", timeout=30)
    assert ready.status_code in (200, 202), ready.text
    if ready.status_code == 202:
        assert _wait_job(ha["web"], ready.json()["id"], 60)["status"] == "succeeded"
    nowait = ha["stack"].start_web(threads=16, env={"MODELBAY_REDIS_WAIT_REPLICAS": "0"}, log_name="web-nowait.log")
    try:
        _p50_submit_ms(nowait.url, model, 10)  # warm both
        _p50_submit_ms(ha["web"], model, 10)
        off, on = _p50_submit_ms(nowait.url, model), _p50_submit_ms(ha["web"], model)
    finally:
        ha["stack"].stop(nowait)
    print(f"\nsubmit p50: {off:.1f} ms without the replica wait, {on:.1f} ms with WAIT 1 (+{on - off:.1f} ms)")


@dataclass
class Tally:
    accepted: dict[str, str] = field(default_factory=dict)           # job id -> its input
    accepted_at: dict[str, float] = field(default_factory=dict)      # job id -> when answered (monotonic)
    refused: list[tuple[float, int, str, str]] = field(default_factory=list)  # when, status, code, Retry-After
    bad: list[str] = field(default_factory=list)                     # anything else: a 500, a hang
    slow: list[tuple[float, float]] = field(default_factory=list)    # (when, seconds) of answers over 0.5 s
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client(url: str, model: str, n: int, tally: Tally) -> None:
    with requests.Session() as session:
        for i in range(PER_CLIENT):
            text = f"client {n} job {i}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                at = time.monotonic()
                try:
                    resp = session.post(f"{url}/v1/jobs", json={"model": model, "task": "generate", "input": text},
                                        timeout=30)
                except requests.RequestException as exc:
                    with tally.lock:
                        tally.bad.append(f"{text}: {exc!r}")
                    break
                with tally.lock:
                    if time.monotonic() - at > 0.5:
                        tally.slow.append((at, time.monotonic() - at))
                    if resp.status_code == 202:
                        tally.accepted[resp.json()["id"]] = text
                        tally.accepted_at[resp.json()["id"]] = time.monotonic()
                        break
                    if resp.status_code != 503:
                        tally.bad.append(f"{text}: {resp.status_code} {resp.text[:200]}")
                        break
                    tally.refused.append((at, 503, resp.json()["error"]["code"], resp.headers.get("Retry-After", "")))
                time.sleep(0.1)  # a client's backoff before it retries, not a synchronisation


class SucceededEvents:
    """Counts each job's ``succeeded`` transitions on the job channels, across the failover
    (the subscription is made again on the new master; events in between are not seen, so
    this can show a result written twice, not prove every one was seen)."""

    def __init__(self, store: Store) -> None:
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        threading.Thread(target=self._run, args=(store,), daemon=True).start()

    def _run(self, store: Store) -> None:
        while not self.stop.is_set():
            try:
                pubsub = store.job_events()
                while not self.stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and parse_event(str(message.get("data")))[0] == "succeeded":
                        self.counts[str(message["channel"]).rsplit(":", 1)[-1]] += 1
            except redis.RedisError:
                time.sleep(0.1)  # reconnecting through the failover


def _master_port(store: Store) -> int:
    """The port of the master the Sentinels name; 0 while they name none (mid-failover)."""
    try:
        return int(store._r.connection_pool.get_master_address()[1])
    except redis.ConnectionError:  # MasterNotFoundError: the old one is down, none promoted yet
        return 0


def _failover(ha: dict, tally: Tally, load_url: str, model_b: str) -> tuple[str, float, float]:
    """Start a slow load, SIGKILL the primary once KILL_AFTER jobs are in, wait for the
    promotion; the load job's id, the kill time and how long the promotion took (s)."""
    poll(lambda: len(tally.accepted) >= KILL_AFTER, 120, f"{KILL_AFTER} jobs accepted", 0.05)
    resp = requests.post(f"{load_url}/v1/models/{model_b}/load", timeout=30)
    assert resp.status_code == 202, resp.text
    load_id = resp.json()["id"]
    poll(lambda: ha["store"].get_job(load_id).status == "loading", 60, "the load to run", 0.05)
    old = _port(ha["primary"])
    killed_at = time.monotonic()
    ha["primary"].proc.send_signal(signal.SIGKILL)
    new = poll(lambda: _master_port(ha["store"]) not in (0, old) and _master_port(ha["store"]), 60, "a promotion",
               0.1)
    assert new == _port(ha["replica"])
    return load_id, killed_at, time.monotonic() - killed_at


def test_jobs_survive_a_sentinel_failover(ha: dict) -> None:
    url, store = ha["web"], ha["store"]
    model, model_b = _register(url, token_delay_s=0.01), _register(url, load_delay_s=4)
    first = requests.post(f"{url}/v1/models/{model}/load", timeout=30)
    assert first.status_code in (200, 202) and (first.status_code == 200 or
                                                _wait_job(url, first.json()["id"], 60)["status"] == "succeeded")
    events, tally = SucceededEvents(store), Tally()
    clients = [threading.Thread(target=_client, args=(url, model, n, tally)) for n in range(CLIENTS)]
    for c in clients:
        c.start()
    load_id, killed_at, promoted_s = _failover(ha, tally, url, model_b)
    for c in clients:
        c.join(180)
    assert not any(c.is_alive() for c in clients), "a client hung"
    assert not tally.bad, tally.bad[:5]  # no 500, no timeout: only 202 or 503
    assert len(tally.accepted) == CLIENTS * PER_CLIENT
    assert {(status, code) for _, status, code, _ in tally.refused} <= {(503, "store_unavailable")}
    assert all(retry_after.isdigit() for *_, retry_after in tally.refused)
    finals = _all_ended(store, tally, killed_at)
    assert Counter(j["status"] for j in finals.values()) == {"succeeded": len(finals)}
    assert all(finals[i]["result"]["text"] == text for i, text in tally.accepted.items())
    events.stop.set()
    assert events.counts and set(events.counts.values()) <= {1}, f"a result written twice (or none seen): {events.counts}"
    after = [i for i, at in tally.accepted_at.items() if at > killed_at + promoted_s]
    assert after and all(finals[i]["node"] == ha["node"] for i in after)  # the same worker, on the new master
    assert ha["worker"].proc.poll() is None  # never restarted
    assert _wait_job(url, load_id, 60)["status"] == "succeeded"  # the load in flight completed
    _report(tally, killed_at, promoted_s, len(after))


def _all_ended(store: Store, tally: Tally, killed_at: float) -> dict[str, dict]:
    """Every accepted job's record once all have ended; a clear failure naming those that did not."""
    def ended() -> bool:
        return all((r := store.get_job(i)) is not None and r.terminal for i in tally.accepted)

    try:
        poll(ended, 120, "every accepted job to end", 0.5)
    except AssertionError:
        stuck = {i: store.get_job(i) for i in tally.accepted}
        stuck = {i: r for i, r in stuck.items() if r is None or not r.terminal}
        lines = [f"{i} accepted {tally.accepted_at[i] - killed_at:+.2f}s: "
                 f"{r.model_dump_json(include={'status', 'node', 'attempts', 'routed'}) if r else 'MISSING'}"
                 for i, r in stuck.items()]
        raise AssertionError(f"{len(stuck)} accepted jobs did not end:\n" + "\n".join(lines[:20]) +
                             f"\nwhere their messages are: {_messages_of(store, list(stuck))}") from None
    return {i: r.model_dump(mode="json") for i in tally.accepted if (r := store.get_job(i)) is not None}


def _messages_of(store: Store, job_ids: list[str]) -> dict[str, list[str]]:
    """Where each job's task message is now: a queue's list or the unacked hash."""
    r = store._r
    found: dict[str, list[str]] = {i: [] for i in job_ids}
    places = {key: r.lrange(key, 0, -1) for key in r.scan_iter("model.*") if r.type(key) == "list"}
    places["unacked"] = list(r.hgetall("unacked").values())
    for place, messages in places.items():
        for message in messages:
            for i in job_ids:
                if i in message:
                    found[i].append(place)
    return found


def _report(tally: Tally, killed_at: float, promoted_s: float, after: int) -> None:
    refused = sorted(at - killed_at for at, *_ in tally.refused)
    window = f"{refused[0]:+.2f} s to {refused[-1]:+.2f} s after the kill" if refused else "never"
    statuses = Counter(f"{status} {code} Retry-After={ra}" for _, status, code, ra in tally.refused)
    slow = sorted((at - killed_at, took) for at, took in tally.slow)
    slow_line = (f"{len(slow)} submits took over 0.5 s, sent {slow[0][0]:+.2f} s to {slow[-1][0]:+.2f} s after the "
                 f"kill, the slowest {max(t for _, t in slow):.2f} s" if slow else "no submit took over 0.5 s")
    print(f"\nfailover: primary SIGKILLed, replica promoted {promoted_s:.2f} s later; submits refused {window} "
          f"({len(refused)} answers: {dict(statuses)}); {slow_line}; {after} jobs accepted after the promotion "
          f"ran on the same worker")


def test_with_no_master_left_submits_are_503_not_500_or_a_hang(ha: dict) -> None:
    """Runs last: the promoted replica is SIGKILLed too, leaving the Sentinels no master to
    name (MasterNotFoundError, then connection refused). A submit and a read are answered 503
    store_unavailable with Retry-After, in bounded time; the web stays up."""
    ha["replica"].proc.send_signal(signal.SIGKILL)
    ha["replica"].proc.wait(10)
    for attempt in range(3):
        start = time.monotonic()
        resp = requests.post(f"{ha['web']}/v1/jobs", json={"model": "any", "task": "generate", "input": "x"},
                             timeout=60)
        took = time.monotonic() - start
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "store_unavailable" and resp.headers["Retry-After"].isdigit()
        read = requests.get(f"{ha['web']}/v1/jobs/0123456789abcdef0123456789abcdef", timeout=60)
        assert read.status_code == 503 and read.json()["error"]["code"] == "store_unavailable"
        print(f"\nno master: submit {attempt + 1} answered 503 store_unavailable in {took:.2f} s")
    assert requests.get(f"{ha['web']}/healthz", timeout=10).status_code == 200
