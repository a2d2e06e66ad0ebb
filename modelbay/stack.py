"""The one local-stack launcher: valkey-server, nats-server, Celery worker nodes and gunicorn as
processes on this machine, on free ports, each logging to a file of its own, waited for until
they answer, and stopped in reverse order. ``modelbay up``, the tests' fixtures
(``tests/conftest.py``, ``tests/helpers.py``) and ``bench/stack.py`` all start the stack here.

:class:`LocalStack` owns what it starts (stop one part, restart one, or close them all). The
functions :func:`launch_worker`, :func:`launch_web` and :func:`ready_or_stop` start one process
that the caller owns, for tests that run workers on a Valkey of their own.
"""
from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from modelbay import services
from modelbay.services import Service, Started
from tasks.names import node_queue
from tasks.settings import env_name

Check = Callable[[], object]
"""A readiness check: ready when it returns something truthy."""
P = TypeVar("P", bound=Started)


@dataclass
class Worker(Started):
    """A worker node's process (Celery hostname ``modelbay@<node_id>``)."""

    node_id: str = ""


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200 (False while nothing listens yet, or on any error)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - a local http URL
            return resp.status == 200
    except (OSError, http.client.HTTPException):  # URLError and HTTPError are OSErrors
        return False


def launch_worker(env: Mapping[str, str], node_id: str, log_dir: Path, concurrency: int = 8) -> Worker:
    """Start a worker for node ``node_id`` with ``env`` over ``os.environ``, logging to
    ``log_dir/worker-<node_id>.log``. Its metrics port is 0 (none: many workers share a host)
    unless ``env`` names one. Returns at once: see :func:`ready_or_stop`."""
    log_path = log_dir / f"worker-{node_id}.log"
    full = {env_name("worker_metrics_port"): "0", **env, env_name("node_id"): node_id}
    proc = services.spawn(services.worker_command(node_queue(node_id), node_id, concurrency), full, log_path)
    return Worker(f"worker {node_id}", proc, log_path, node_id)


def launch_web(env: Mapping[str, str], log_path: Path, host: str = "127.0.0.1", port: int | None = None,
               workers: int = 1, threads: int = 16) -> Service:
    """Start gunicorn serving the API with ``env`` over ``os.environ`` on ``host:port`` (a
    free port by default). Returns at once: see :func:`ready_or_stop`."""
    port = port or services.free_port()
    proc = services.spawn(services.web_command(host, port, workers, threads), env, log_path)
    return Service("web", proc, log_path, f"http://{host}:{port}")


def ready_or_stop(part: Started, check: Check, timeout_s: float, what: str, watch: Sequence[Started] = ()) -> None:
    """Wait until ``check()`` is truthy while ``part`` and ``watch`` still run. When a process
    ends first (:class:`~modelbay.services.ProcessExited`, naming it and quoting its log) or
    time runs out (``TimeoutError``), stop ``part`` and raise."""
    try:
        services.wait_until(lambda: services.raise_if_exited([part, *watch]) or bool(check()), timeout_s, what)
    except BaseException:
        part.stop(5)
        raise


class LocalStack:
    """The processes of one local stack, stopped in reverse order by :meth:`close` (or on
    leaving ``with``): web before workers, workers before the NATS and Valkey they still use.

    ``env`` holds the ``MODELBAY_*`` variables every process gets over ``os.environ``;
    :meth:`start_valkey` and :meth:`start_nats` add their URLs to it. Logs go to ``log_dir``
    (``valkey.log``, ``nats.log``, ``worker-<node>.log``, ``web.log``), Valkey's data to
    ``data_dir/valkey`` (``data_dir`` defaults to ``log_dir``).
    """

    def __init__(self, log_dir: Path, data_dir: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.data_dir = data_dir or log_dir
        self.env: dict[str, str] = dict(env or {})
        self.parts: list[Started] = []
        self.valkey: Service | None = None
        self.nats: Service | None = None
        self._again: dict[int, Callable[[], Started]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start_valkey(self, port: int | None = None, appendonly: bool = True, password: str | None = None) -> Service:
        """valkey-server (``requirepass`` with ``password``); its URL becomes the stack's
        ``MODELBAY_REDIS_URL``."""
        port = port or services.free_port()
        self.valkey = services.start_valkey(self.data_dir / "valkey", port, appendonly, self.log_dir / "valkey.log",
                                            password)
        self.env[env_name("redis_url")] = self.valkey.url
        return self._track(self.valkey, lambda: self.start_valkey(port, appendonly, password))

    def start_nats(self, port: int | None = None) -> Service:
        """nats-server; its URL becomes the stack's ``MODELBAY_NATS_URL``."""
        port = port or services.free_port()
        self.nats = services.start_nats(port, self.log_dir / "nats.log")
        self.env[env_name("nats_url")] = self.nats.url
        return self._track(self.nats, lambda: self.start_nats(port))

    def start_nats_cluster(self, size: int = 3, port: int | None = None) -> list[Service]:
        """``size`` nats-server processes routed as one cluster (client ports ``port``,
        ``port + 1``, ... when given, else free ones; logs ``nats-<i>.log``); the stack's
        ``MODELBAY_NATS_URL`` names them all, so every process fails over between them."""
        ports = [port + i for i in range(size)] if port else []
        servers = services.start_nats_cluster(size, self.log_dir, ports)
        self.nats = servers[0]
        self.env[env_name("nats_url")] = services.nats_urls(servers)
        for one in servers:
            self.parts.append(one)  # not restartable one by one: the cluster is started whole
        return servers

    def start_worker(self, node_id: str, concurrency: int = 8, env: Mapping[str, str] | None = None,
                     ready: Check | None = None, timeout_s: float = 60.0) -> Worker:
        """A worker node with the stack's env (``env`` over it). With ``ready`` (say, the node's
        record in the store) wait until it is truthy, while every process of the stack runs."""
        worker = self._track(launch_worker({**self.env, **(env or {})}, node_id, self.log_dir, concurrency),
                             lambda: self.start_worker(node_id, concurrency, env, ready, timeout_s))
        if ready is not None:
            self._ready(worker, ready, timeout_s, f"node {node_id}")
        return worker

    def start_web(self, port: int | None = None, host: str = "127.0.0.1", workers: int = 1, threads: int = 16,
                  env: Mapping[str, str] | None = None, log_name: str = "web.log",
                  ready_path: str | None = "/healthz", timeout_s: float = 30.0) -> Service:
        """gunicorn with the stack's env (``env`` over it) on ``host:port`` (a free port by
        default); with ``ready_path``, wait until that path answers 200."""
        port = port or services.free_port()
        web = self._track(launch_web({**self.env, **(env or {})}, self.log_dir / log_name, host, port, workers,
                                     threads),
                          lambda: self.start_web(port, host, workers, threads, env, log_name, ready_path, timeout_s))
        if ready_path is not None:
            self._ready(web, lambda: http_ok(f"{web.url}{ready_path}"), timeout_s, f"web ({ready_path})")
        return web

    def spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Started:
        """Any other process (a benchmark's baseline), with the stack's env (``env`` over it),
        logging to ``<name>.log``; stopped with the stack."""
        log_path = self.log_dir / f"{name}.log"
        proc = services.spawn(cmd, {**self.env, **(env or {})}, log_path)
        return self._track(Started(name, proc, log_path), lambda: self.spawn(name, cmd, env))

    def check(self) -> bool:
        """Raise :class:`~modelbay.services.ProcessExited` for the first process that has
        ended (named, with the end of its log); False while all run."""
        return services.raise_if_exited(self.parts)

    def wait_http(self, url: str, timeout_s: float, what: str) -> None:
        """Wait until ``url`` answers 200, while every process of the stack still runs."""
        services.wait_until(lambda: self.check() or http_ok(url), timeout_s, what)

    def watch(self, interval_s: float = 0.5) -> None:
        """Return never: raise :class:`~modelbay.services.ProcessExited` when a process ends."""
        while not self.check():
            time.sleep(interval_s)

    def stop(self, part: Started, grace_s: float = 20.0) -> str:
        """Stop one process (SIGTERM, then SIGKILL after ``grace_s``); how it ended."""
        self.parts = [p for p in self.parts if p is not part]
        self._again.pop(id(part), None)
        return part.stop(grace_s)

    def restart(self, part: P, grace_s: float = 20.0) -> P:
        """Stop ``part`` and start it again as it was started (same port, data, env, log and
        readiness wait), in its place in the stop order."""
        again = self._again[id(part)]
        index = next(i for i, p in enumerate(self.parts) if p is part)
        self.stop(part, grace_s)
        new = cast(P, again())  # it starts what ``part`` is
        self.parts = [p for p in self.parts if p is not new]
        self.parts.insert(index, new)
        return new

    def close(self, grace_s: float = 20.0, report: Callable[[str, str], None] | None = None) -> None:
        """Stop every process, the last started first; ``report(name, how)`` after each."""
        while self.parts:
            part = self.parts.pop()
            self._again.pop(id(part), None)
            how = part.stop(grace_s)
            if report is not None:
                report(part.name, how)

    def _ready(self, part: Started, check: Check, timeout_s: float, what: str) -> None:
        """:func:`ready_or_stop` watching every process; a part that failed leaves the stack."""
        try:
            ready_or_stop(part, check, timeout_s, what, self.parts)
        except BaseException:
            self.stop(part)
            raise

    def _track(self, part: P, again: Callable[[], P]) -> P:
        self.parts.append(part)
        self._again[id(part)] = again
        return part
