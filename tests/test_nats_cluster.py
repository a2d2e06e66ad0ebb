"""Live progress over a three-node NATS cluster, on real parts: three routed nats-server
processes, Valkey, one worker and two gunicorn web replicas, all given every NATS server in
``MODELBAY_NATS_URL``. While a slow staging runs, the NATS server a web replica is connected
to is killed, then the one the worker is connected to: the rows stay on both replicas and
their live ticks come back (nats-py reconnects to another server, its subscriptions are
sent again, and the worker re-publishes its operations' state on reconnect)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fileserver import FileServer, payload, sha
from helpers import every, http_ok, modelbay_up, pid_alive, poll, start_worker, unique
from modelbay.services import (Service, descendants, free_port, nats_urls, spawn, start_nats_cluster, start_valkey,
                               stop_process, web_command)
from tasks.bus import servers
from tasks.settings import load_settings
from workers.progress.live import LivePublisher
from tasks.store import Store

MiB = 1 << 20
OPS_TTL_S = 3.0  # short: a mirror that stopped getting events would expire during the test
TICKS_BACK_S = 5.0  # the bound for live ticks to resume after a server is killed


def test_the_nats_url_may_name_several_servers():
    assert servers("nats://a:4222") == ["nats://a:4222"]
    assert servers("nats://a:4222, nats://u:p@b:4223 ,nats://c:4224,") == [
        "nats://a:4222", "nats://u:p@b:4223", "nats://c:4224"]


class _Bus:
    """Records what is published; calls the reconnect callbacks when told."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.callbacks: list = []

    def publish(self, subject: str, data: bytes) -> None:
        self.sent.append(json.loads(data))

    def on_reconnect(self, callback) -> None:
        self.callbacks.append(callback)


def test_a_reconnect_republishes_the_whole_state_of_every_live_operation():
    bus = _Bus()
    publisher = LivePublisher(load_settings({"MODELBAY_PROGRESS_INTERVAL_S": "0"}), bus)  # type: ignore[arg-type]
    op = publisher.operation("job-1", "staging", "m", job="job-1")
    op.update("start", {"file": "w.bin", "file_index": 1, "files_total": 2, "bytes_total": 100})
    op.update("progress", {"bytes_done": 40})
    ended = publisher.operation("job-2", "staging", "m2", job="job-2")
    ended.update("start", {"bytes_total": 10})
    ended.done()
    before = len(bus.sent)
    for callback in bus.callbacks:
        callback()
    again = bus.sent[before:]
    assert [e["op"] for e in again] == ["job-1"]  # only the operations still running
    event = again[0]
    assert event["status"] == "keepalive"
    assert event["seq"] > max(e["seq"] for e in bus.sent[:before] if e["op"] == "job-1")  # mirrors take it
    assert (event["bytes_done"], event["bytes_total"], event["file"], event["files_total"]) == (40, 100, "w.bin", 2)


@pytest.fixture(scope="module")
def cluster(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    log_dir = artifacts / "nats-cluster"
    log_dir.mkdir(parents=True, exist_ok=True)
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-")), appendonly=False)
    nats = start_nats_cluster(3, log_dir, monitor=True)
    run = tmp_path_factory.mktemp("cluster")
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats_urls(nats), "MODELBAY_RUN_DIR": str(run),
           "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_NODE_TTL_S": "3",
           "MODELBAY_OPS_TTL_S": str(OPS_TTL_S), "MODELBAY_PROGRESS_INTERVAL_S": "0.3",
           "MODELBAY_BACKEND_STOP_GRACE_S": "3", "MODELBAY_ALLOW_PRIVATE_SOURCES": "1"}
    store = Store.from_settings(load_settings(env))
    files, webs, worker = FileServer(), [], None
    try:
        poll(lambda: all(routes(s) == 2 for s in nats), 20, "the three NATS routes to form")
        worker = start_worker(env, unique("nc")[:20], log_dir, store)
        for i in range(2):
            port = free_port()
            webs.append((spawn(web_command("127.0.0.1", port, 1), env, log_dir / f"web-{i}.log"),
                         f"http://127.0.0.1:{port}"))
        for _, url in webs:
            poll(lambda u=url: http_ok(f"{u}/healthz"), 30, f"web at {url}")
        yield {"nats": nats, "webs": webs, "worker": worker, "files": files, "store": store}
    finally:
        if worker is not None:
            worker.stop()
        for proc, _ in webs:
            stop_process(proc, 10)
        files.close()
        for one in nats:
            one.stop()
        valkey.stop()


def routes(server: Service) -> int:
    """How many other servers ``server`` has routes to (nats-server 2.10+ pools several
    route connections per peer)."""
    found = requests.get(f"{server.monitor_url}/routez", timeout=2).json().get("routes") or []
    return len({r.get("remote_id") for r in found})


def connected_to(nats: list[Service], names: set[str]) -> Service | None:
    """The live NATS server holding one of the connections ``names`` (the buses' names:
    ``modelbay-web-<pid>``, ``modelbay-worker-<node>``)."""
    for server in nats:
        if server.proc.poll() is not None:
            continue
        conns = requests.get(f"{server.monitor_url}/connz", timeout=2).json().get("connections") or []
        if names & {c.get("name") or "" for c in conns}:
            return server
    return None


def web_names(proc) -> set[str]:
    return {f"modelbay-web-{pid}" for pid in (proc.pid, *descendants(proc.pid))}


def row_for(url: str, job_id: str) -> dict | None:
    resp = requests.get(f"{url}/api/operations", timeout=5)
    assert resp.status_code == 200, resp.text
    return next((r for r in resp.json()["operations"] if r["id"] == job_id), None)


def slow_load(cluster: dict, size: int, rate_bps: float) -> dict:
    files, url = cluster["files"], cluster["webs"][0][1]
    name = unique("cl")
    data = payload(size, seed=7)
    files.files[f"/{name}/w.bin"] = data
    files.rate_bps = rate_bps
    manifest = {"backend": "echo", "files": [{"uri": files.url(f"/{name}/w.bin"), "sha256": sha(data), "size": size}]}
    assert requests.put(f"{url}/v1/models/{name}", json=manifest, timeout=5).status_code == 201
    job = requests.post(f"{url}/v1/models/{name}/load", timeout=5)
    assert job.status_code == 202, job.text
    return job.json()


def kill_and_watch(cluster: dict, victim: Service, job_id: str) -> None:
    """SIGKILL ``victim``; the row must stay on every replica throughout, and each replica's
    live bytes must grow again within ``TICKS_BACK_S``."""
    urls = [url for _, url in cluster["webs"]]
    marks = {u: (row_for(u, job_id) or {}).get("bytes_done") or 0 for u in urls}
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)

    def ticking() -> bool:
        rows = {u: row_for(u, job_id) for u in urls}
        assert all(rows.values()), f"the row left a replica after {victim.name} was killed: {rows}"
        return all(r["live"] and (r["bytes_done"] or 0) > marks[u] for u, r in rows.items() if r)

    poll(ticking, TICKS_BACK_S, f"live ticks on every replica after killing {victim.name}", interval_s=0.1)
    # ... and they go on: no row drops or freezes for longer than the mirrors' TTL.
    for _ in every(0.2, OPS_TTL_S + 1.0):
        assert all(row_for(u, job_id) for u in urls)


def test_killing_the_nats_servers_in_use_keeps_rows_and_ticks_on_every_replica(cluster):
    nats, (web_a, url_a), worker = cluster["nats"], cluster["webs"][0], cluster["worker"]
    job = slow_load(cluster, 40 * MiB, rate_bps=1.5 * MiB)
    urls = [url for _, url in cluster["webs"]]
    poll(lambda: all((r := row_for(u, job["id"])) and r["live"] and r["bytes_done"] for u in urls), 30,
         "live rows on both replicas")
    first = poll(lambda: connected_to(nats, web_names(web_a)), 10, "the NATS server of web replica A")
    kill_and_watch(cluster, first, job["id"])

    second = poll(lambda: connected_to(nats, {f"modelbay-worker-{worker.node_id}"}), 10,
                  "the NATS server of the worker")
    kill_and_watch(cluster, second, job["id"])
    assert sum(1 for s in nats if s.proc.poll() is None) == 1  # everything now runs on the last one

    poll(lambda: requests.get(f"{url_a}/v1/jobs/{job['id']}", timeout=5).json()["status"] == "succeeded", 60,
         "the load to finish")
    poll(lambda: all(row_for(u, job["id"]) is None for u in urls), 10, "the row to leave every replica")



def free_ports_in_a_row(n: int) -> int:
    """A port ``p`` with ``p`` .. ``p + n - 1`` all free now (one free port's successor can
    be taken: a full run once failed on it)."""
    while True:
        first = free_port()
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return first
        except (OSError, OverflowError):  # taken, or past 65535
            continue

def test_modelbay_up_runs_a_nats_cluster_and_stops_it(tmp_path):
    """``modelbay up --nats-cluster 3``: three routed nats-servers, every process given all
    three; a job runs; Ctrl-C stops them all."""
    port, nats_port = free_port(), free_ports_in_a_row(3)  # modelbay up takes the next two too
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBAY_")}
    env["MODELBAY_WORKER_METRICS_PORT"] = "0"
    (tmp_path / "catalog.json").write_text(json.dumps({"echo": {"backend": "echo"}}))
    base, started = f"http://127.0.0.1:{port}", set()
    args = ["--port", str(port), "--nats-cluster", "3", "--nats-port", str(nats_port),
            "--catalog", str(tmp_path / "catalog.json"), "--data-dir", str(tmp_path / "data")]
    with modelbay_up(args, env, tmp_path) as up:
        started = descendants(up.pid)
        nats_procs = [p for p in started if b"nats-server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(nats_procs) == 3
        worker_env = next(Path(f"/proc/{p}/environ").read_bytes() for p in started
                          if b"celery" in Path(f"/proc/{p}/cmdline").read_bytes())
        urls = next(v for v in worker_env.split(b"\0") if v.startswith(b"MODELBAY_NATS_URL=")).decode()
        assert [u.rsplit(":", 1)[1] for u in urls.split("=", 1)[1].split(",")] == [
            str(nats_port + i) for i in range(3)]
        job = requests.post(f"{base}/v1/jobs", json={"model": "echo", "task": "generate", "input": "cluster"},
                            timeout=10)
        assert job.status_code == 202, job.text
        done = requests.get(f"{base}{job.headers['Location']}?wait=30", timeout=40).json()
        assert done["status"] == "succeeded" and done["result"]["text"] == "cluster"
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
    assert "killed" not in (tmp_path / "up.log").read_text()
    poll(lambda: not [p for p in started if pid_alive(p)], 10, "every process started by up to exit")


def test_the_compose_nats_cluster_file_routes_three_nodes_and_names_them_all():
    """compose.nats-cluster.yaml (static: no Docker here), merged over compose.yaml as
    ``docker compose -f compose.yaml -f compose.nats-cluster.yaml`` would."""
    import yaml

    from tasks.settings import env_name

    root = Path(__file__).resolve().parents[1]
    base = yaml.safe_load((root / "compose.yaml").read_text())
    overlay = yaml.safe_load((root / "compose.nats-cluster.yaml").read_text())
    assert "compose.nats-cluster.yaml" in (root / "compose.yaml").read_text()  # documented where people look
    nodes = ["nats", "nats-1", "nats-2"]
    assert set(nodes) <= set(overlay["services"])
    for name in nodes:
        command = overlay["services"][name]["command"]
        assert command[command.index("-cluster_name") + 1] == "mb"
        assert command[command.index("-cluster") + 1].endswith(":6222")
        routes = command[command.index("-routes") + 1].split(",")
        assert sorted(r.split("//")[1].split(":")[0] for r in routes) == sorted(set(nodes) - {name})
        assert command[command.index("-p") + 1] == "4222"
        assert overlay["services"][name]["image"] == base["services"]["nats"]["image"]
    for name in ("web", "worker"):
        url = overlay["services"][name]["environment"][env_name("nats_url")]
        assert sorted(u.split("//")[1].split(":")[0] for u in servers(url)) == sorted(nodes)
        assert name in base["services"] and set(overlay["services"][name]) == {"environment"}
