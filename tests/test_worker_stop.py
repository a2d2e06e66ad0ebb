"""A worker given SIGTERM while its broker (Valkey) or NATS is gone still exits within its
stop grace: real valkey-server, nats-server and Celery worker processes, and a real echo
backend whose process must not outlive the worker.

Before the fix the worker's last Redis writes (marking the node draining, removing the node
record) rode out the outage for ``MODELBAY_REDIS_OUTAGE_S`` (60 s) each."""
from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import backend_pids, poll, start_worker, unique
from modelbay.services import start_nats, start_valkey
from modelbay.stack import Worker
from tasks.settings import load_settings
from tasks.store import Store

GRACE_S = 6.0
SLACK_S = 10.0  # a loaded test machine: the process may take this much longer to be reaped


@pytest.fixture
def parts(artifacts: Path, tmp_path: Path) -> Iterator[dict]:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-stop-valkey-")), appendonly=False)
    nats = start_nats()
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(tmp_path),
           "MODELBAY_MODELS_DIR": str(tmp_path / "models"), "MODELBAY_WORKER_STOP_GRACE_S": str(GRACE_S),
           "MODELBAY_BACKEND_STOP_GRACE_S": "2", "MODELBAY_NODE_TTL_S": "3"}
    store = Store.from_settings(load_settings(env))
    node = unique("stop")[:24]
    box: dict = {"valkey": valkey, "nats": nats, "env": env, "store": store, "node": node}
    box["worker"] = start_worker(env, node, artifacts, store)
    try:
        yield box
    finally:
        box["worker"].stop(5)
        for service in (valkey, nats):
            service.stop()


def load_echo(box: dict) -> str:
    """Load an echo model on the worker (through the web app, in process); its name."""
    from web import create_app

    client = create_app({"TESTING": True, "MODELBAY_ENV": box["env"]}).test_client()
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


@pytest.mark.parametrize("gone", ["valkey", "nats"])
def test_an_idle_worker_exits_when_its_broker_or_nats_is_gone(parts, gone):
    parts[gone].stop()
    parts["worker"].proc.poll()
    assert parts["worker"].proc.returncode is None, "the worker died with its broker"
    assert sigterm_and_wait(parts["worker"]) == 0
    assert f"node {parts['node']} stopped" in parts["worker"].log()


def test_a_worker_holding_a_model_stops_its_backend_while_valkey_is_gone(parts):
    name = load_echo(parts)
    marker = f"/mb-{parts['node'][:16]}-"
    assert backend_pids(marker), "the echo backend is not running"
    parts["valkey"].stop()
    assert sigterm_and_wait(parts["worker"]) == 0
    poll(lambda: not backend_pids(marker), 10, f"the backend of {name} to stop with the worker")


def test_the_worker_still_deregisters_when_everything_is_up(parts):
    """The good path: the bounded stop still removes the node record."""
    assert parts["store"].get_node(parts["node"]) is not None
    assert sigterm_and_wait(parts["worker"]) == 0
    assert parts["store"].get_node(parts["node"]) is None
