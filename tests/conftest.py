"""Integration fixtures: real valkey-server and nats-server on free ports, a real Celery
worker subprocess (threads pool) that starts real gRPC backend processes, gunicorn, and the
Flask app from its factory. The session's processes are one :class:`modelbay.stack.LocalStack`
(logs under the artifacts folder); every process started here is reaped, even when a test fails."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fileserver import FileServer
from helpers import backend_pids, pid_alive, poll
from s3server import S3Server, weed_command
from s3server import ready as s3_ready
from modelbay.services import Service
from modelbay.stack import LocalStack, Worker
from tasks.settings import load_settings
from tasks.store import Store
from workers.supervisor.process import BackendProcess

NODE = f"t{os.getpid()}"


# ---- no silent skips in CI ------------------------------------------------------------------
# Tests skip where an optional package, a model package or the browser is missing. CI installs
# all of them (.ci/run sets MODELBAY_REQUIRE_ALL=1), so there a skip means a broken install:
# a skip while a test runs becomes a failure, and a skip at collection (a module-level
# importorskip) fails the run at its end. The skips CI cannot satisfy are listed here, by node
# id prefix, with the reason; there are none (no test needs a GPU or a network).
REQUIRE_ALL = "MODELBAY_REQUIRE_ALL"
SKIPS_CI_CANNOT_SATISFY: dict[str, str] = {}
_COLLECT_SKIPS = pytest.StashKey[list]()  # (node id, reason) of the modules skipped at collection


def _require_all() -> bool:
    return os.environ.get(REQUIRE_ALL) == "1"


def _allowed_skip(nodeid: str) -> bool:
    return any(nodeid.startswith(prefix) for prefix in SKIPS_CI_CANNOT_SATISFY)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _require_all() \
            and not _allowed_skip(item.nodeid):
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_ALL}=1 and this test skipped ({_skip_reason(report)}): CI installs every "
                           "dependency, so a skip is a broken install (or list it in SKIPS_CI_CANNOT_SATISFY "
                           "in tests/conftest.py, with the reason)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _require_all() and not _allowed_skip(report.nodeid):
        collector.config.stash.setdefault(_COLLECT_SKIPS, []).append((report.nodeid, _skip_reason(report)))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    terminalreporter.write_line(f"skipped: {len(skipped)}")
    forbidden = config.stash.get(_COLLECT_SKIPS, [])
    if forbidden:
        terminalreporter.write_line(f"{REQUIRE_ALL}=1: {len(forbidden)} module(s) skipped at collection, "
                                    "which fails the run:", red=True)
        for nodeid, why in forbidden:
            terminalreporter.write_line(f"  {nodeid}: {why}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.stash.get(_COLLECT_SKIPS, []) and exitstatus in (pytest.ExitCode.OK,
                                                                     pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A local HTTP file server (the tests' model source), closed after the test."""
    srv = FileServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("MODELBAY_TEST_ARTIFACTS", "test-artifacts")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def local_stack(artifacts: Path) -> Iterator[LocalStack]:
    """The session's processes, logging under the artifacts folder; what is still running at
    the end is stopped, the last started first."""
    with LocalStack(artifacts, Path(tempfile.mkdtemp(prefix="mb-stack-"))) as stack:
        yield stack


@pytest.fixture(scope="session")
def valkey(local_stack: LocalStack) -> Service:
    return local_stack.start_valkey(appendonly=False)


@pytest.fixture(scope="session")
def nats(local_stack: LocalStack) -> Service:
    return local_stack.start_nats()


@pytest.fixture(scope="session")
def stack_env(valkey: Service, nats: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    run = tmp_path_factory.mktemp("run")
    (run / "sources").mkdir()  # local model sources (file://) live here
    return {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url,
            "MODELBAY_FILE_ROOTS": str(run / "sources"),
            "MODELBAY_ALLOW_PRIVATE_SOURCES": "1",  # model files come from a file server on 127.0.0.1
            "MODELBAY_LOG_REQUESTS": "1",  # test_promises reads the worker's line per task
            "MODELBAY_RUN_DIR": str(run), "MODELBAY_MODELS_DIR": str(run / "models"),
            "MODELBAY_FILES_URL": str(run / "files"),  # /v1/files (tests/test_files.py: S3 too)
            "MODELBAY_NODE_TTL_S": "3", "MODELBAY_BACKEND_STOP_GRACE_S": "3",
            "MODELBAY_CANCEL_POLL_S": "0.05", "MODELBAY_LOAD_COOLDOWN_BASE_S": "1",
            "MODELBAY_PROGRESS_INTERVAL_S": "0.2"}


@pytest.fixture(scope="session")
def store(stack_env: dict[str, str]) -> Store:
    return Store.from_settings(load_settings(stack_env))


@pytest.fixture(scope="session")
def worker_metrics_port() -> int:
    """The port the session's worker serves its Prometheus metrics on."""
    from modelbay.services import free_port

    return free_port()


@pytest.fixture(scope="session")
def worker(local_stack: LocalStack, stack_env: dict[str, str], store: Store,
           worker_metrics_port: int) -> Iterator[Worker]:
    """One worker node for the session. On teardown it must leave no backend process and no
    socket behind."""
    w = local_stack.start_worker(NODE, env={**stack_env, "MODELBAY_WORKER_METRICS_PORT": str(worker_metrics_port)},
                                 ready=lambda: store.get_node(NODE))
    try:
        yield w
    finally:
        how = local_stack.stop(w)
        leftovers = backend_pids(f"/mb-{NODE[:16]}-")
        sockets = glob.glob(f"{tempfile.gettempdir()}/mb-{NODE[:16]}-*/*.sock")
        assert how == "terminated", f"worker did not stop on SIGTERM ({how})"
        assert not leftovers, f"backend processes left behind: {leftovers}"
        assert not sockets, f"sockets left behind: {sockets}"


@pytest.fixture(scope="session")
def app(stack_env: dict[str, str]):
    from web import create_app

    return create_app({"TESTING": True, "MODELBAY_ENV": stack_env})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def register(client):
    """Register a manifest under a fresh name; returns the name."""
    from helpers import unique

    def _register(options: dict | None = None, backend: str = "echo", prefix: str = "echo", **extra) -> str:
        name = unique(prefix)
        body = {"backend": backend, "options": options or {}, **extra}
        resp = client.put(f"/v1/models/{name}", json=body)
        assert resp.status_code == 201, resp.get_json()
        return name

    return _register


__all__ = ["poll"]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the ~107-byte unix socket path limit: stay short.
    path = Path(tempfile.mkdtemp(prefix="mb", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backends(socket_dir: Path) -> Iterator[Callable[..., BackendProcess]]:
    """Factory of BackendProcess objects (not started); all are stopped at teardown."""
    made: list[BackendProcess] = []

    def make(backend: str = "echo", model: str = "echo-test", **kwargs: Any) -> BackendProcess:
        kwargs.setdefault("stop_grace_s", 2.0)
        kwargs.setdefault("start_timeout_s", 20.0)
        bp = BackendProcess(backend, model, socket_dir, **kwargs)
        made.append(bp)
        return bp

    yield make
    for bp in made:
        bp.stop()
    for bp in made:
        if bp.pid is not None:
            assert not pid_alive(bp.pid), f"backend pid {bp.pid} left behind"
        assert not bp.socket_path.exists()


@pytest.fixture(scope="session")
def tiny_pipeline(stack_env: dict[str, str]) -> Path:
    """A tiny random diffusers pipeline, built locally under the session's file root."""
    import importlib.util

    for package in ("diffusers", "transformers", "PIL"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    from helpers import unique
    from tinydiffusion import build_tiny_pipeline

    return build_tiny_pipeline(Path(stack_env["MODELBAY_FILE_ROOTS"]) / unique("tinysd"))


@pytest.fixture(scope="session")
def web_url(local_stack: LocalStack, stack_env: dict[str, str]) -> Iterator[str]:
    """gunicorn (one gthread process) serving the session's stack over real HTTP."""
    web = local_stack.start_web(env=stack_env, log_name="web-session.log")
    try:
        yield web.url
    finally:
        local_stack.stop(web)


@pytest.fixture(scope="session")
def s3_server(local_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS, tests/s3server.py) with one bucket, for the session."""
    from modelbay.services import free_port

    port = free_port()
    started = local_stack.spawn("weed", weed_command(tmp_path_factory.mktemp("s3"), port))
    server = S3Server(started, f"http://127.0.0.1:{port}")
    try:
        s3_ready(server)
        yield server
    finally:
        local_stack.stop(started)


@pytest.fixture(scope="session", params=["file", "s3"])
def files_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The variables of a web or worker whose files live in a local directory ("file") or in
    the S3 server under a prefix of its own ("s3"): MODELBAY_FILES_URL, and for S3
    MODELBAY_S3_ENDPOINT_URL and the AWS_* credentials."""
    if request.param == "file":
        return {"MODELBAY_FILES_URL": f"file://{tmp_path_factory.mktemp('files')}"}
    return request.getfixturevalue("s3_server").env()
