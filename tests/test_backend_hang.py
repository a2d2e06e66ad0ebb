"""Backend hang detection, with real hangs: a backend process stopped with SIGSTOP answers
nothing (not even its health check) but does not exit, and SIGKILL still ends it.

The supervisor's health monitor (``workers.supervisor.health``) must notice the silence, kill the
process and report it like a crash, saying that it hung; a healthy backend, a short stall
and a deliberate stop must not be reported. Waiting is polling with deadlines, never a
fixed sleep; every process started here is reaped even when a test fails (a stopped pid is
continued in a ``finally``).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import Worker, backend_pids, backend_status, pid_alive, poll, start_worker, unique, wait_job

from modelbay.services import Service, start_valkey
from tasks.settings import Settings, load_settings
from tasks.store import Store
from workers.supervisor.calls import BackendCallError, load_deadline_s
from workers.supervisor.health import DEFAULT_FAILURES, DEFAULT_INTERVAL_S, DEFAULT_TIMEOUT_S, HealthMonitor
from workers.supervisor.process import SERVICE_NAME, BackendProcess

WORDS = " ".join(f"w{i}" for i in range(40))
FAST = {"health_interval_s": 0.2, "health_timeout_s": 0.2, "health_failures": 3}


def resume(pid: int | None) -> None:
    """Undo a SIGSTOP (the pid may be gone already)."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def loaded(make: Callable[..., BackendProcess], options: dict[str, Any] | None = None,
           **kwargs: Any) -> BackendProcess:
    bp = make(**kwargs)
    bp.start()
    bp.load([], "", options or {}, "", timeout_s=load_deadline_s(0, base_s=10.0))
    return bp


def drain(call: Any) -> list[Any]:
    return list(call)


# -- the supervisor alone ------------------------------------------------------------------

def test_defaults_come_from_the_settings() -> None:
    s = Settings()
    assert (DEFAULT_INTERVAL_S, DEFAULT_TIMEOUT_S, DEFAULT_FAILURES) == (
        s.backend_health_interval_s, s.backend_health_timeout_s, s.backend_health_failures)


@pytest.mark.parametrize("kwargs", [{"health_interval_s": -1.0}, {"health_timeout_s": 0.0},
                                    {"health_failures": 0}])
def test_invalid_health_settings_are_refused(socket_dir: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BackendProcess("echo", "m", socket_dir, **kwargs)


def test_a_hung_backend_is_killed_and_its_calls_fail_saying_so(backends: Callable[..., BackendProcess]) -> None:
    exits: list[int] = []
    bp = loaded(backends, {"token_delay_s": 0.3}, on_exit=exits.append, **FAST)
    pid = bp.pid
    assert pid is not None and bp.health is not None
    call = bp.generate(WORDS, [], {}, timeout_s=60)
    first = next(call)
    assert first.text == "w0 " and not first.done
    with ThreadPoolExecutor(1) as pool:
        rest = pool.submit(drain, call)  # blocked on the next token when the backend hangs
        try:
            os.kill(pid, signal.SIGSTOP)
            poll(lambda: not pid_alive(pid) and exits, 10, "the hung backend to be killed and reported")
            err = rest.exception(timeout=10)
        finally:
            resume(pid)
    assert isinstance(err, BackendCallError), err
    message = str(err)
    assert "hung" in message and "health check failed 3 times in a row" in message, message
    assert exits == [-signal.SIGKILL]
    assert bp.hung_reason is not None and "timeout 0.2s" in bp.hung_reason
    assert bp.exit_reason is not None and "hung" in bp.exit_reason
    assert not bp.alive() and bp.returncode == -signal.SIGKILL
    poll(lambda: not bp.health.running, 5, "the health monitor to end")
    assert bp.health.failures_in_a_row == 3 and bp.health.verdict == bp.hung_reason
    with pytest.raises(BackendCallError, match="hung"):  # later calls say the same
        bp.status()
    assert bp.stop() == "exited"


def test_a_healthy_backend_stays_up_and_a_stop_is_not_a_hang(backends: Callable[..., BackendProcess]) -> None:
    exits: list[int] = []
    bp = loaded(backends, {"token_delay_s": 0.05}, on_exit=exits.append, **FAST)
    monitor = bp.health
    assert monitor is not None and monitor.running
    # Busy (a generation streaming) and idle, it keeps passing its checks.
    with ThreadPoolExecutor(1) as pool:
        gen = pool.submit(drain, bp.generate(WORDS, [], {}, timeout_s=30))
        poll(lambda: monitor.checks_ok >= 3, 10, "three health checks passed while generating")
        assert len(gen.result(timeout=30)) == 41
    seen = monitor.checks_ok
    poll(lambda: monitor.checks_ok >= seen + 2, 10, "two more health checks passed while idle")
    assert monitor.failures_in_a_row == 0 and monitor.verdict is None and bp.alive()
    assert bp.stop() == "terminated"
    poll(lambda: not monitor.running, 5, "the health monitor to end with the stop")
    assert exits == [] and bp.hung_reason is None
    assert bp.exit_reason is not None and "stopped" in bp.exit_reason


def test_a_backend_busier_than_its_call_threads_is_not_mistaken_for_hung(
        backends: Callable[..., BackendProcess]) -> None:
    """24 streams at once hold all 16 call threads (and queue 8 more); health checks have a
    socket and threads of their own, so they still pass and nothing is killed."""
    exits: list[int] = []
    bp = loaded(backends, {"token_delay_s": 0.1}, on_exit=exits.append, **FAST)
    monitor = bp.health
    assert monitor is not None
    words = " ".join(["w"] * 20)
    with ThreadPoolExecutor(24) as pool:
        seen = monitor.checks_ok
        calls = [pool.submit(drain, bp.generate(words, [], {}, timeout_s=60)) for _ in range(24)]
        # The streams take two waves of 2 s; checks (every 0.2 s, 0.2 s timeout) go on meanwhile.
        poll(lambda: monitor.checks_ok >= seen + 6, 10, "health checks passing under load")
        assert not any(c.done() for c in calls)  # the checks passed while every call ran
        assert all(len(c.result(timeout=60)) == 21 for c in calls)
    assert exits == [] and bp.alive() and monitor.failures_in_a_row == 0


def test_a_stall_shorter_than_the_threshold_is_forgiven(backends: Callable[..., BackendProcess]) -> None:
    exits: list[int] = []
    bp = loaded(backends, on_exit=exits.append, health_interval_s=0.1, health_timeout_s=0.1, health_failures=1000)
    pid, monitor = bp.pid, bp.health
    assert pid is not None and monitor is not None
    try:
        os.kill(pid, signal.SIGSTOP)
        poll(lambda: monitor.failures_in_a_row >= 2, 10, "failed health checks while stopped")
    finally:
        resume(pid)
    ok = monitor.checks_ok
    poll(lambda: monitor.checks_ok > ok and monitor.failures_in_a_row == 0, 10, "a passing check to reset the count")
    assert bp.alive() and exits == [] and bp.hung_reason is None
    assert bp.status()["state"] == "ready"


def test_a_deliberate_stop_of_a_hung_backend_is_not_reported_as_a_hang(
        backends: Callable[..., BackendProcess]) -> None:
    exits: list[int] = []
    bp = loaded(backends, on_exit=exits.append, stop_grace_s=3.0, **FAST)
    pid, monitor = bp.pid, bp.health
    assert pid is not None and monitor is not None
    try:
        os.kill(pid, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            stopping = pool.submit(bp.stop)  # SIGTERM stays pending on a stopped process: it escalates
            poll(lambda: not monitor.running, 5, "the stop to end the health monitor")
            # A verdict arriving now (a check that was in flight) must not kill or report.
            assert monitor.on_unhealthy("late verdict") is False
            assert pid_alive(pid) and not stopping.done()
            assert stopping.result(timeout=15) == "killed"
    finally:
        resume(pid)
    assert not pid_alive(pid)
    assert exits == [] and bp.hung_reason is None


def test_the_monitor_declares_a_silent_target_hung_once(socket_dir: Path) -> None:
    verdicts: list[str] = []
    called = threading.Event()

    def on_unhealthy(reason: str) -> bool:
        verdicts.append(reason)
        called.set()
        return False

    monitor = HealthMonitor(f"unix:{socket_dir / 'nobody.sock'}", service=SERVICE_NAME, pid=0, model="m",
                            on_unhealthy=on_unhealthy, interval_s=0.05, timeout_s=0.2, failures=2)
    monitor.start()
    try:
        assert called.wait(10)
        assert monitor.join(5)
    finally:
        monitor.stop()
    assert len(verdicts) == 1 and "failed 2 times in a row" in verdicts[0]
    assert monitor.checks_ok == 0 and monitor.failures_in_a_row == 2


# -- the whole stack ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hang_stack(nats: Service, artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Its own Valkey and one worker whose backends are health-checked every 0.3 s."""
    data = Path(tempfile.mkdtemp(prefix="mb-valkey-"))
    valkey = start_valkey(data, appendonly=False)
    run = tmp_path_factory.mktemp("hang")
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(run),
           "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_NODE_TTL_S": "3",
           "MODELBAY_BACKEND_STOP_GRACE_S": "3", "MODELBAY_CANCEL_POLL_S": "0.05",
           "MODELBAY_LOAD_COOLDOWN_BASE_S": "1", "MODELBAY_BACKEND_HEALTH_INTERVAL_S": "0.3",
           "MODELBAY_BACKEND_HEALTH_TIMEOUT_S": "0.3", "MODELBAY_BACKEND_HEALTH_FAILURES": "3"}
    store = Store.from_settings(load_settings(env))
    node = f"h{os.getpid()}"
    worker: Worker | None = None
    try:
        worker = start_worker(env, node, artifacts, store, concurrency=2)
        from web import create_app

        app = create_app({"TESTING": True, "MODELBAY_ENV": env})
        yield {"client": app.test_client(), "worker": worker, "store": store}
    finally:
        how = worker.stop() if worker is not None else "not_started"
        leftovers = backend_pids(f"/mb-{node[:16]}-")
        for pid in leftovers:  # reap them anyway, then fail
            resume(pid)
            os.kill(pid, signal.SIGKILL)
        valkey.stop()
        shutil.rmtree(data, ignore_errors=True)
        assert how in ("terminated", "not_started"), f"worker did not stop on SIGTERM ({how})"
        assert not leftovers, f"backend processes left behind: {leftovers}"


def node_state(client: Any, name: str) -> dict | None:
    nodes = client.get(f"/v1/models/{name}").get_json()["nodes"]
    return nodes[0] if nodes else None


def test_a_hung_backend_fails_its_job_marks_the_model_failed_and_the_next_job_reloads(hang_stack: dict) -> None:
    client, worker = hang_stack["client"], hang_stack["worker"]
    name = unique("hang")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo", "options": {"token_delay_s": 0.5}}
                      ).status_code == 201
    resp = client.post(f"/v1/models/{name}/load", headers={"X-Modelbay-Node": worker.node_id})
    assert resp.status_code == 202, resp.get_json()
    assert wait_job(client, resp.get_json()["id"])["status"] == "succeeded"
    state = poll(lambda: (s := node_state(client, name)) and s["state"] == "ready" and s, 20, "model ready")
    pid = state["pid"]
    job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": WORDS}).get_json()
    try:
        wait_job(client, job["id"], statuses={"running"})
        poll(lambda: backend_status(state, name).tokens_generated >= 1, 10, "a first token")
        os.kill(pid, signal.SIGSTOP)
        failed = wait_job(client, job["id"], timeout_s=20)
        assert failed["status"] == "failed" and failed["error"]["type"] == "backend_crashed", failed
        poll(lambda: (s := node_state(client, name)) and s["state"] == "failed", 10, "the model marked failed")
        poll(lambda: not pid_alive(pid), 10, "the hung backend gone")
        log = poll(lambda: (text := worker.log()) and f"backend pid {pid} (model {name!r}) is hung" in text
                   and text, 10, "the hang in the worker log")
        assert "health check failed 3 times in a row (timeout 0.3s" in log
        assert f"backend pid {pid} (model {name!r}) was killed by the supervisor because it hung" in log
        assert worker.proc.poll() is None
        # The next job loads the model again (a new process) and succeeds.
        nxt = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "again"}).get_json()
        done = wait_job(client, nxt["id"], timeout_s=30)
        assert done["status"] == "succeeded" and done["result"]["text"] == "again", done
        again = poll(lambda: (s := node_state(client, name)) and s["state"] == "ready" and s, 10, "reloaded")
        assert again["pid"] != pid and pid_alive(again["pid"])
    finally:
        resume(pid)
        if pid in backend_pids(name):  # still the stopped backend: never leave it behind
            os.kill(pid, signal.SIGKILL)
        for unload in client.post(f"/v1/models/{name}/unload").get_json().get("data", []):
            wait_job(client, unload["id"])
