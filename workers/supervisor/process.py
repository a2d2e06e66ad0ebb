"""Start, call, watch and stop one backend process (``python -m workers.backends.<name>``).

Runs inside the worker process with threads only: the backend is a fresh interpreter
started with ``subprocess`` (fork+exec), so no CUDA state ever meets a fork.

Lifecycle: :meth:`BackendProcess.start` spawns the process in its own session on a unix
socket and waits for the gRPC health check; :meth:`~BackendProcess.load` calls LoadModel
with a deadline from :func:`load_deadline_s`; a watcher thread reaps the process and, if
it exits without :meth:`~BackendProcess.stop`, calls ``on_exit(returncode)`` and makes
in-flight and later calls fail with :class:`BackendCallError`. :meth:`~BackendProcess.stop`
sends SIGTERM to the process group, waits ``stop_grace_s`` seconds, then SIGKILLs.

Hangs: once started, a :class:`~workers.supervisor.health.HealthMonitor` checks the process's gRPC
health every ``health_interval_s`` seconds; after ``health_failures`` consecutive failed
checks it SIGKILLs the process group, and the exit is reported like a crash, with
:attr:`~BackendProcess.exit_reason` saying that the backend hung.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import grpc
import grpc.experimental
from grpc_health.v1 import health_pb2, health_pb2_grpc

from workers.supervisor.exits import describe_exit
from workers.supervisor.calls import BackendCallError, BackendStartError
from workers.supervisor.client import BackendClient
from workers.backends.servicer import MAX_MESSAGE_BYTES, SERVICE_NAME, health_socket
from workers.backends.proto.modelbay.backend.v1 import backend_pb2 as pb
from workers.backends.proto.modelbay.backend.v1 import backend_pb2_grpc as pb_grpc
from workers.supervisor.health import DEFAULT_FAILURES, DEFAULT_INTERVAL_S, DEFAULT_TIMEOUT_S, HealthMonitor, validate

log = logging.getLogger("modelbay.supervisor")

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes on Linux, NUL included
_BACKEND_NAME = re.compile(r"[a-z0-9_-]+")
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A local socket: retry connecting quickly instead of gRPC's default 1 s..120 s backoff.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A Generate stream is read in the job's own thread, not handed over by a channel thread
    # (which gRPC starts again each time the channel goes idle): less CPU per call on both
    # sides (bench/bench_grpc_stream.py).
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]


class BackendProcess(BackendClient):
    """One backend process serving one model instance; see the module docstring.

    ``model`` and ``instance`` are the identity sent with every request (treat them as
    read-only). ``on_exit`` is called from the watcher thread with the return code when
    the process exits without :meth:`stop` having been called (also after the health
    monitor killed it as hung). ``health_interval_s`` (seconds between checks, 0: no
    monitoring), ``health_timeout_s`` (seconds per check) and ``health_failures`` (checks
    failed in a row) configure hang detection; see :mod:`workers.supervisor.health`."""

    def __init__(
        self, backend: str, model: str, socket_dir: Path, *, env: dict[str, str] | None = None,
        start_timeout_s: float = 30.0, stop_grace_s: float = 5.0, log_path: Path | None = None,
        on_exit: Callable[[int], None] | None = None, health_interval_s: float = DEFAULT_INTERVAL_S,
        health_timeout_s: float = DEFAULT_TIMEOUT_S, health_failures: int = DEFAULT_FAILURES,
    ) -> None:
        if not _BACKEND_NAME.fullmatch(backend):
            raise BackendStartError(f"invalid backend name {backend!r}: must match [a-z0-9_-]+")
        self.backend = backend
        self.model = model
        self.instance = uuid.uuid4().hex
        self.socket_path = Path(os.path.abspath(socket_dir)) / f"{self.instance[:12]}.sock"
        if len(os.fsencode(health_socket(self.socket_path))) > MAX_SOCKET_PATH_BYTES:
            raise BackendStartError(
                f"socket path {str(self.socket_path)!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes "
                "(the unix socket limit); use a shorter socket_dir"
            )
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.log_path = log_path
        self.on_exit = on_exit
        validate(health_interval_s, health_timeout_s, health_failures)
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.health_failures = health_failures
        self._health: HealthMonitor | None = None
        self._hung_reason: str | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.BackendStub | None = None
        self._exited = threading.Event()
        self._exit_handled = threading.Event()  # set once the watcher is done (on_exit returned)
        self._stop_requested = threading.Event()
        self._state_lock = threading.Lock()  # orders _started against the watcher's exit check
        self._started = False
        self._exit_seen = False
        self._stop_result: str | None = None
        self._tail: collections.deque[bytes] = collections.deque(maxlen=40)
        self._forwarder: threading.Thread | None = None

    # -- properties ------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The process id, or None before :meth:`start`."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process was reaped (negative: killed by that signal)."""
        return self._proc.returncode if self._exited.is_set() and self._proc is not None else None

    @property
    def health(self) -> HealthMonitor | None:
        """The hang detector, from a successful :meth:`start` on (None when disabled)."""
        return self._health

    @property
    def hung_reason(self) -> str | None:
        """Why the health monitor killed the process as hung; None if it did not."""
        return self._hung_reason

    def crash_reason(self, wait_s: float = 2.0) -> str | None:
        """How the process died on its own (:attr:`exit_reason`), waiting up to ``wait_s``
        seconds for it to be reaped; None while it runs, or when the supervisor stopped it."""
        if self._proc is None or not self._exited.wait(wait_s) or self._stop_requested.is_set():
            return None
        return self.exit_reason

    @property
    def exit_reason(self) -> str | None:
        """How the process ended, for messages ("backend process <exit_reason>"): killed
        as hung, stopped, or exited with its code; None while it has not been reaped."""
        rc = self.returncode
        if rc is None:
            return None
        if self._hung_reason is not None:
            return f"was killed by the supervisor because it hung: {self._hung_reason}"
        if self._stop_requested.is_set():
            return f"was stopped by the supervisor ({describe_exit(rc)})"
        return describe_exit(rc)

    def alive(self) -> bool:
        """True from a successful :meth:`start` until the process exits."""
        return self._started and not self._exited.is_set()

    # -- start -----------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the process and wait (up to ``start_timeout_s`` seconds) until healthy."""
        module, cmd, env = self._command()
        with self._lock:
            if self._proc is not None or self._stop_requested.is_set():
                raise BackendStartError("this BackendProcess was already started or stopped")
            self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            sink: IO[bytes] | None = None
            try:
                if self.log_path is not None:
                    sink = open(self.log_path, "ab")  # noqa: SIM115 - the forwarder closes it
                self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                if sink is not None:
                    sink.close()
                raise BackendStartError(f"could not start {module}: {exc}") from exc
            self._forwarder = threading.Thread(target=self._forward, args=(self._proc.stdout, sink),
                                               name=f"backend-log-{self._proc.pid}", daemon=True)
            self._forwarder.start()
            threading.Thread(target=self._watch, name=f"backend-watch-{self._proc.pid}", daemon=True).start()
            channel = self._channel = grpc.insecure_channel(f"unix:{self.socket_path}", options=_CHANNEL_OPTIONS)
            self._stub = pb_grpc.BackendStub(channel)
            # Stubs are made under the lock: grpcio crashes the process (SIGSEGV) when a stub
            # is created on a channel that stop() closed meanwhile from another thread.
            health_stub = health_pb2_grpc.HealthStub(channel)
        log.info("started %s pid %d for model %r instance %s", module, self._proc.pid, self.model, self.instance)
        t0 = time.monotonic()
        try:
            self._wait_healthy(health_stub)
        except BackendStartError:
            if not self._stop_requested.is_set():  # else stop() is ending it
                self._kill_now()
            raise
        with self._state_lock:
            died = self._exit_seen
            self._started = not died
            if self._started and self.health_interval_s > 0 and not self._stop_requested.is_set():
                self._health = HealthMonitor(
                    f"unix:{health_socket(self.socket_path)}", service=SERVICE_NAME, pid=self._proc.pid, model=self.model,
                    on_unhealthy=self._kill_hung, interval_s=self.health_interval_s,
                    timeout_s=self.health_timeout_s, failures=self.health_failures,
                    channel_options=_CHANNEL_OPTIONS)
                self._health.start()
        if died:
            self._kill_now()
            raise BackendStartError(f"backend {self.backend!r} exited with code {self.returncode} right after "
                                    f"becoming healthy; log tail:\n{self.log_tail()}")
        log.info("backend pid %d healthy after %.2fs", self._proc.pid, time.monotonic() - t0)

    def _command(self) -> tuple[str, list[str], dict[str, str]]:
        """The backend's module, its command line and its environment."""
        module = f"workers.backends.{self.backend.replace('-', '_')}"
        cmd = [sys.executable, "-m", module, "--socket", str(self.socket_path),
               "--model", self.model, "--instance", self.instance, "--parent-pid", str(os.getpid())]
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return module, cmd, env

    def _wait_healthy(self, health_stub: health_pb2_grpc.HealthStub) -> None:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._exited.is_set():
                if self._forwarder is not None:
                    self._forwarder.join(1.0)
                raise BackendStartError(f"backend {self.backend!r} exited with code {self.returncode} "
                                        f"while starting; log tail:\n{self.log_tail()}")
            if self._stop_requested.is_set():
                raise BackendStartError(f"backend {self.backend!r} was stopped while starting")
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendStartError(f"backend {self.backend!r} not healthy after {self.start_timeout_s:g}s; "
                                        f"log tail:\n{self.log_tail()}")
            if self.socket_path.exists():
                try:
                    resp = health_stub.Check(request, timeout=min(0.5, left), wait_for_ready=True)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except (grpc.RpcError, ValueError):  # ValueError: channel closed by stop()
                    pass
            self._exited.wait(0.02)

    def _forward(self, pipe: IO[bytes], sink: IO[bytes] | None) -> None:
        """Copy the backend's output to ``sink`` (the log file) or our stderr (fd 2),
        keeping the last lines for error messages."""
        with pipe:
            for line in iter(pipe.readline, b""):
                self._tail.append(line)
                try:
                    if sink is None:
                        os.write(2, line)
                    else:
                        sink.write(line)
                        sink.flush()
                except (OSError, ValueError):
                    pass
        if sink is not None:
            sink.close()

    def log_tail(self, max_lines: int = 20) -> str:
        """The last lines the process wrote (also kept when they go to ``log_path``)."""
        return b"".join(list(self._tail)[-max_lines:]).decode(errors="replace").rstrip()

    def _watch(self) -> None:
        proc = self._proc
        if proc is None:
            return
        rc = proc.wait()
        self._exited.set()
        with self._state_lock:
            self._exit_seen = True
            report = self._started and not self._stop_requested.is_set()
            if self._health is not None:
                self._health.stop()
        if not report:
            self._exit_handled.set()
            return
        if self._hung_reason is None:
            log.warning("backend pid %d (model %r) %s unexpectedly", proc.pid, self.model, describe_exit(rc))
        else:
            log.warning("backend pid %d (model %r) %s", proc.pid, self.model, self.exit_reason)
        self._close_channel()
        try:
            if self.on_exit is not None:
                self.on_exit(rc)
        except Exception:  # a broken callback must not kill the watcher silently
            log.exception("on_exit callback failed")
        finally:
            self._exit_handled.set()

    # -- calls -----------------------------------------------------------------------
    def _gone_error(self) -> BackendCallError | None:
        if self._stop_requested.is_set():
            return BackendCallError(f"backend for model {self.model!r} was stopped")
        if self._exited.is_set():
            # Fail the call only once on_exit ran, so the caller sees the crash recorded.
            self._exit_handled.wait(5.0)
            return BackendCallError(f"backend process {self.exit_reason}")
        if not self._started:
            return BackendCallError("backend process not started")
        return None

    # -- stop ------------------------------------------------------------------------
    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and not self._exited.is_set():
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _cleanup(self) -> None:
        self._close_channel()
        if self._forwarder is not None:
            self._forwarder.join(1.0)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        try:
            os.unlink(health_socket(self.socket_path))
        except FileNotFoundError:
            pass

    def _kill_hung(self, reason: str) -> bool:
        """The health monitor's verdict: record ``reason`` and SIGKILL the process group,
        unless the process is being stopped or already exited (then False). The watcher
        thread reports the exit through ``on_exit``."""
        with self._state_lock:
            if self._stop_requested.is_set() or self._exit_seen or not self._started:
                return False
            self._hung_reason = reason
            self._signal(signal.SIGKILL)
        return True

    def _kill_now(self) -> None:
        """After a failed start: SIGKILL, reap, clean up."""
        self._stop_requested.set()
        self._signal(signal.SIGKILL)
        self._exited.wait(10.0)
        self._cleanup()
        self._stop_result = "killed"

    def stop(self) -> str:
        """Stop the process; idempotent and thread-safe. Tries Free (1 s deadline), then
        SIGTERM to the process group, waits ``stop_grace_s`` seconds, then SIGKILL; reaps it
        and removes the socket. Returns "terminated", "killed", "exited" (it had already
        exited on its own) or "not_started"; later calls return the first answer."""
        with self._lock:
            if self._stop_result is not None:
                return self._stop_result
            self._stop_requested.set()
            with self._state_lock:  # after this, no hang verdict can kill the process
                if self._health is not None:
                    self._health.stop()
            if self._proc is None:
                result = "not_started"
            elif self._exited.is_set():
                result = "exited"
            else:
                if self._stub is not None and self._started:
                    try:
                        self._stub.Free(pb.FreeRequest(model=self._ref()), timeout=min(1.0, self.stop_grace_s))
                    except (grpc.RpcError, ValueError):
                        pass
                self._close_channel()
                self._signal(signal.SIGTERM)
                if self._exited.wait(self.stop_grace_s):
                    result = "terminated"
                else:
                    log.warning("backend pid %d ignored SIGTERM for %gs; killing", self._proc.pid, self.stop_grace_s)
                    self._signal(signal.SIGKILL)
                    self._exited.wait(10.0)
                    result = "killed"
            self._cleanup()
            self._stop_result = result
        log.info("backend pid %s for model %r stopped: %s", self.pid, self.model, result)
        return result
