"""A worker given SIGTERM while its broker (Valkey) or NATS is gone still exits within its
stop grace: real valkey-server, nats-server and Celery worker processes, and a real echo
backend whose process must not outlive the worker.

Before the fix the worker's last Redis writes (marking the node draining, removing the node
record) rode out the outage for ``MODELBAY_REDIS_OUTAGE_S`` (60 s) each; with a Valkey
that accepts connections and never answers, Celery's own loop never ended at all."""
from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver import FileServer, payload, sha
from helpers import backend_pids, poll, start_worker, unique
from modelbay.services import start_nats, start_valkey
from modelbay.stack import Worker
from tasks.settings import load_settings
from tasks.store import Store

MiB = 1 << 20
GRACE_S = 6.0
SLACK_S = 10.0  # a loaded test machine: the process may take this much longer to be reaped


@pytest.fixture
def parts(artifacts: Path, tmp_path: Path) -> Iterator[dict]:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-stop-valkey-")), appendonly=False)
    nats = start_nats()
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(tmp_path),
           "MODELBAY_MODELS_DIR": str(tmp_path / "models"), "MODELBAY_WORKER_STOP_GRACE_S": str(GRACE_S),
           "MODELBAY_BACKEND_STOP_GRACE_S": "2", "MODELBAY_NODE_TTL_S": "3",
           "MODELBAY_ALLOW_PRIVATE_SOURCES": "1"}
    store = Store.from_settings(load_settings(env))
    node = unique("stop")[:24]
    box: dict = {"valkey": valkey, "nats": nats, "env": env, "store": store, "node": node, "frozen": []}
    box["worker"] = start_worker(env, node, artifacts, store)
    try:
        yield box
    finally:
        for service in box["frozen"]:
            os.kill(service.proc.pid, signal.SIGCONT)
        box["worker"].stop(5)
        for service in (valkey, nats):
            service.stop()


def web_client(box: dict):
    """The web app, in process, on the test's Valkey and NATS."""
    from web import create_app

    return create_app({"TESTING": True, "MODELBAY_ENV": box["env"]}).test_client()


def load_echo(box: dict) -> str:
    """Load an echo model on the worker; its name."""
    client = web_client(box)
    name = unique("echo")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo"}).status_code == 201
    job = client.post(f"/v1/models/{name}/load").get_json()
    poll(lambda: client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "succeeded", 60, "the echo load")
    return name


def sigterm_and_wait(worker: Worker) -> int:
    os.kill(worker.proc.pid, signal.SIGTERM)
    poll(lambda: worker.proc.poll() is not None, GRACE_S + SLACK_S,
         f"the worker to exit within its stop grace (log: {worker.log_path})")
    return worker.proc.returncode


def make_gone(parts: dict, service: str, how: str) -> None:
    """``stopped``: the server exits (connections refused). ``frozen``: SIGSTOP (connections
    are accepted by the kernel and never answered, like a host gone from the network)."""
    if how == "stopped":
        parts[service].stop()
    else:
        os.kill(parts[service].proc.pid, signal.SIGSTOP)
        parts["frozen"].append(parts[service])


@pytest.mark.parametrize("how", ["stopped", "frozen"])
@pytest.mark.parametrize("service", ["valkey", "nats"])
def test_an_idle_worker_exits_when_its_broker_or_nats_is_gone(parts, service, how):
    make_gone(parts, service, how)
    assert parts["worker"].proc.poll() is None, "the worker died with its broker"
    status = sigterm_and_wait(parts["worker"])
    log = parts["worker"].log()
    if service == "valkey" and how == "frozen":
        # Celery's loop is stuck in a socket read on the broker: the stop watchdog ends it.
        assert status == 1 and "stop watchdog: Celery did not begin its stop" in log, log[-2000:]
    else:
        assert status == 0 and f"node {parts['node']} stopped" in log, log[-2000:]


@pytest.mark.parametrize("how", ["stopped", "frozen"])
def test_a_worker_holding_a_model_stops_its_backend_while_valkey_is_gone(parts, how):
    name = load_echo(parts)
    marker = f"/mb-{parts['node'][:16]}-"
    assert backend_pids(marker), "the echo backend is not running"
    make_gone(parts, "valkey", how)
    assert sigterm_and_wait(parts["worker"]) in (0, 1)
    poll(lambda: not backend_pids(marker), 10, f"the backend of {name} to stop with the worker")


def test_the_worker_still_deregisters_when_everything_is_up(parts):
    """The good path: the bounded stop still removes the node record."""
    assert parts["store"].get_node(parts["node"]) is not None
    assert sigterm_and_wait(parts["worker"]) == 0
    assert parts["store"].get_node(parts["node"]) is None


def test_a_load_still_staging_at_sigterm_is_waited_for_not_cut_short(parts):
    """Loads are not handed back by the drain: Celery waits for them, and the stop watchdog
    waits with it (it acts only once no task runs)."""
    client, files = web_client(parts), FileServer()
    try:
        data = payload(3 * MiB, seed=3)
        files.files["/w.bin"] = data
        files.rate_bps = 0.4 * MiB  # about 7 s of staging: longer than the drain and the watchdog's margin
        name = unique("slow")
        manifest = {"backend": "echo", "files": [{"uri": files.url("/w.bin"), "sha256": sha(data), "size": len(data)}]}
        assert client.put(f"/v1/models/{name}", json=manifest).status_code == 201
        job = client.post(f"/v1/models/{name}/load").get_json()
        poll(lambda: (client.get(f"/v1/jobs/{job['id']}").get_json().get("progress") or {}).get("bytes_done"), 30,
             "the staging to start")
        os.kill(parts["worker"].proc.pid, signal.SIGTERM)
        poll(lambda: parts["worker"].proc.poll() is not None, 60, "the worker to exit after its load")
        assert parts["worker"].proc.returncode == 0, parts["worker"].log()[-2000:]
        assert "stop watchdog" not in parts["worker"].log()
        assert client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "succeeded"
    finally:
        files.close()
