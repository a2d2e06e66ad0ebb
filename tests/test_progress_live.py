"""Cross-replica progress on real parts: three gunicorn web processes, one worker, NATS and
Valkey. Every replica shows the same operations while a slow staging runs, through a worker
freeze and through a NATS outage."""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from helpers import every, http_ok, poll, start_worker, unique
from tasks.bus import Bus
from modelbay.services import free_port, spawn, start_nats, start_valkey, stop_process, web_command
from tasks.settings import load_settings
from tasks.store import Store
from fileserver import FileServer, payload, sha

INTERVAL_S = 0.5
OPS_TTL_S = 3.0
MiB = 1 << 20


@pytest.fixture(scope="module")
def live(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-")), appendonly=False)
    nats_port = free_port()
    box = {"nats": start_nats(nats_port)}
    run = tmp_path_factory.mktemp("live")
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": box["nats"].url, "MODELBAY_RUN_DIR": str(run),
           "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_NODE_TTL_S": "3",
           "MODELBAY_OPS_TTL_S": str(OPS_TTL_S), "MODELBAY_PROGRESS_INTERVAL_S": str(INTERVAL_S),
           "MODELBAY_BACKEND_STOP_GRACE_S": "3", "MODELBAY_ALLOW_PRIVATE_SOURCES": "1"}
    store = Store.from_settings(load_settings(env))
    files = FileServer()
    webs, worker = [], None
    try:
        worker = start_worker(env, f"l{os.getpid()}", artifacts, store)
        urls = []
        for i in range(3):
            port = free_port()
            webs.append(spawn(web_command("127.0.0.1", port, 1), env, artifacts / f"web-live-{i}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            poll(lambda u=url: http_ok(f"{u}/healthz"), 30, f"web at {url}")
        yield {"urls": urls, "worker": worker, "box": box, "nats_port": nats_port, "files": files,
               "store": store, "env": env}
    finally:
        if worker is not None:
            os.kill(worker.proc.pid, signal.SIGCONT)
            worker.stop()
        for proc in webs:
            stop_process(proc, 10)
        files.close()
        box["nats"].stop()
        valkey.stop()


def slow_model(live: dict, n_files: int, size: int, rate_bps: float) -> tuple[str, dict]:
    files, specs = live["files"], []
    name = unique("slow")
    for i in range(n_files):
        data = payload(size, seed=hash((name, i)) & 0xFFFF)
        path = f"/{name}/part{i}.bin"
        files.files[path] = data
        specs.append({"uri": files.url(path), "sha256": sha(data), "size": size})
    files.rate_bps = rate_bps
    manifest = {"backend": "echo", "files": specs}
    assert requests.put(f"{live['urls'][0]}/v1/models/{name}", json=manifest, timeout=5).status_code == 201
    return name, manifest


def row_for(url: str, job_id: str) -> dict | None:
    resp = requests.get(f"{url}/api/operations", timeout=5)
    assert resp.status_code == 200
    return next((r for r in resp.json()["operations"] if r["id"] == job_id), None)


def job_status(url: str, job_id: str) -> str:
    return requests.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()["status"]


class Counter:
    """Counts the NATS progress messages of each op, with a subscriber of the test's own."""

    def __init__(self, url: str) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.times: dict[str, list[float]] = defaultdict(list)
        self.bus = Bus(url, name="test-counter")
        self.bus.subscribe("modelbay.>", self._on)
        self.bus.start()
        poll(self.bus.connected.is_set, 10, "the test's NATS subscriber")

    def _on(self, subject: str, data: bytes) -> None:
        event = json.loads(data)
        self.counts[event["op"]] += 1
        self.times[event["op"]].append(time.monotonic())


def test_every_replica_shows_the_same_row_without_flicker_and_within_the_message_budget(live):
    urls, n_files, rate_bps = live["urls"], 3, 1.2 * MiB
    counter = Counter(live["box"]["nats"].url)
    name, _ = slow_model(live, n_files, 1 * MiB, rate_bps=rate_bps)
    job = requests.post(f"{urls[0]}/v1/models/{name}/load", timeout=5).json()
    seen_first, last_bytes, polls, compared = None, defaultdict(int), 0, 0
    for polls in every(0.1, 60):  # every 100 ms, all three replicas, starting with each in turn
        order = urls[polls % 3:] + urls[:polls % 3]
        started = time.monotonic()
        rows = {url: row_for(url, job["id"]) for url in order}
        span_s = time.monotonic() - started
        status = job_status(urls[0], job["id"])
        if status in ("succeeded", "failed"):
            break
        for url, row in rows.items():
            if row is None:
                assert seen_first is None, f"the row vanished on replica {url} (poll {polls}) before the load ended"
                continue
            seen_first = seen_first or time.monotonic()
            done = row["bytes_done"] or 0
            assert done >= last_bytes[url], f"bytes_done went backwards on {url}: {done} < {last_bytes[url]}"
            last_bytes[url] = done
            assert row["model"] == name and row["job"] == job["id"] and row["files_total"] in (None, n_files)
        if all(rows.values()):
            # The replicas agree: the same operation, and bytes within one tick of each other
            # (a debounce interval's worth of bytes, plus what arrived while the three were read).
            views = list(rows.values())
            assert len({(r["id"], r["model"], r["job"], r["node"]) for r in views}) == 1, views
            spread = max(r["bytes_done"] or 0 for r in views) - min(r["bytes_done"] or 0 for r in views)
            assert spread <= rate_bps * (INTERVAL_S + span_s), (polls, span_s, [r["bytes_done"] for r in views])
            compared += 1
    assert status == "succeeded"
    assert seen_first is not None and polls > 20 and compared > 20
    assert set(last_bytes) == set(urls) and all(last_bytes[u] > 0 for u in urls), dict(last_bytes)
    ended = time.monotonic()
    poll(lambda: all(row_for(u, job["id"]) is None for u in urls), 2.0, "the row to leave every replica")
    assert time.monotonic() - ended <= 2.5
    times = counter.times[job["id"]]
    duration_s = times[-1] - times[0]
    budget = math.ceil(duration_s / INTERVAL_S) + 2 * n_files + 3
    assert 0 < counter.counts[job["id"]] <= budget, (counter.counts[job["id"]], budget, duration_s)
    counter.bus.close()


def test_a_frozen_worker_leaves_no_phantom_row(live):
    urls, worker = live["urls"], live["worker"]
    name, _ = slow_model(live, 1, 4 * MiB, rate_bps=0.5 * MiB)
    job = requests.post(f"{urls[0]}/v1/models/{name}/load", timeout=5).json()
    poll(lambda: (r := row_for(urls[1], job["id"])) and (r["bytes_done"] or 0) > 0, 20, "staging to start")
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        # Node TTL (3 s) drops the Redis baseline; the ops TTL (3 s) expires the mirrors.
        poll(lambda: all(row_for(u, job["id"]) is None for u in urls), 15, "the phantom to expire everywhere")
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    poll(lambda: job_status(urls[0], job["id"]) == "succeeded", 60, "the thawed load to finish")
    requests.post(f"{urls[0]}/v1/models/{name}/unload", timeout=5)


def test_a_nats_outage_keeps_the_rows_and_live_ticks_come_back(live):
    urls, box = live["urls"], live["box"]
    name, _ = slow_model(live, 1, 24 * MiB, rate_bps=1 * MiB)
    echo = unique("echo")
    requests.put(f"{urls[0]}/v1/models/{echo}", json={"backend": "echo"}, timeout=5).raise_for_status()
    job = requests.post(f"{urls[0]}/v1/models/{name}/load", timeout=5).json()
    poll(lambda: all((r := row_for(u, job["id"])) and r["live"] for u in urls), 20, "live rows everywhere")
    box["nats"].stop()
    polls = 0
    # 10 s without NATS (longer than the mirrors' TTL) while the staging goes on.
    inference = requests.post(f"{urls[1]}/v1/jobs", json={"model": echo, "task": "generate", "input": "no nats"},
                              timeout=5).json()
    for _ in every(0.1, max(10.0, OPS_TTL_S + 1.5)):
        for url in urls:
            row = row_for(url, job["id"])  # the API answers throughout
            assert row is not None, "the row left a replica during the NATS outage"
            polls += 1
    assert polls > 10
    # Work that publishes progress ran without NATS and did not fail because of it.
    assert job_status(urls[2], inference["id"]) == "succeeded"
    assert job_status(urls[0], job["id"]) == "loading"
    assert all(not row_for(u, job["id"])["live"] for u in urls)  # coarse rows from Redis
    box["nats"] = start_nats(live["nats_port"])
    marks = {u: row_for(u, job["id"])["bytes_done"] or 0 for u in urls}
    poll(lambda: all((r := row_for(u, job["id"])) and r["live"] and r["bytes_done"] > marks[u] for u in urls),
         20, "live ticks to come back on every replica")
    poll(lambda: job_status(urls[0], job["id"]) == "succeeded", 30, "the load to finish")
    requests.post(f"{urls[0]}/v1/models/{name}/unload", timeout=5)


def test_the_stream_sends_a_snapshot_then_changes_with_unbuffered_headers(live):
    url = live["urls"][2]
    with requests.get(f"{url}/api/operations/stream", stream=True, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache" and resp.headers["X-Accel-Buffering"] == "no"
        lines = resp.iter_lines(decode_unicode=True)
        first = [next(lines), next(lines)]
        assert first[0] == "event: snapshot" and "operations" in json.loads(first[1].removeprefix("data: "))
        name, _ = slow_model(live, 1, 1 * MiB, rate_bps=2 * MiB)
        job = requests.post(f"{live['urls'][0]}/v1/models/{name}/load", timeout=5).json()
        saw_row = saw_gone = False
        deadline = time.monotonic() + 30
        for line in lines:
            if time.monotonic() > deadline:
                break
            if not line.startswith("data: "):
                continue
            ids = {r["id"] for r in json.loads(line.removeprefix("data: "))["operations"]}
            saw_row = saw_row or job["id"] in ids
            if saw_row and job["id"] not in ids:
                saw_gone = True
                break
        assert saw_row and saw_gone, "the stream showed the load's row appear and leave"
    requests.post(f"{live['urls'][0]}/v1/models/{name}/unload", timeout=5)


def test_generation_progress_reaches_the_job_on_every_replica(live):
    urls = live["urls"]
    name = unique("gen")
    body = {"backend": "echo", "options": {"token_delay_s": 0.25}}
    assert requests.put(f"{urls[0]}/v1/models/{name}", json=body, timeout=5).status_code == 201
    words = " ".join(f"w{i}" for i in range(16))
    job = requests.post(f"{urls[0]}/v1/jobs", json={"model": name, "task": "generate", "input": words,
                                                    "params": {"max_tokens": 16}}, timeout=5).json()
    seen: dict[str, float] = {}

    def check() -> bool:
        for url in urls:
            rec = requests.get(f"{url}/v1/jobs/{job['id']}", timeout=5).json()
            p = rec["progress"]
            if rec["status"] == "running" and p and p["phase"] == "inference" and 0 < p["progress"] < 100:
                assert p["message"].startswith("generated ")
                seen[url] = p["progress"]
        return len(seen) == 3

    poll(check, 20, "token progress on every replica")
    done = poll(lambda: (r := requests.get(f"{urls[0]}/v1/jobs/{job['id']}?wait=5", timeout=10).json())
                ["status"] == "succeeded" and r, 20, "the generation")
    assert done["result"]["text"] == words
    requests.post(f"{urls[0]}/v1/models/{name}/unload", timeout=5)
