"""Backend hang detection: one daemon thread per backend process that asks the standard
gRPC health service (``grpc.health.v1.Health/Check``) whether it still answers.

A crashed backend is noticed by the supervisor's watcher thread when the process exits. A
*hung* backend (deadlocked, stuck in native code, stopped by a signal) does not exit: it
just stops answering, and every call to it would wait for its own deadline. The
:class:`HealthMonitor` closes that gap: every ``interval_s`` seconds it calls Check with a
deadline of ``timeout_s`` seconds; after ``failures`` consecutive failed checks (deadline
exceeded, UNAVAILABLE, any other gRPC error, or a status other than SERVING) it calls
``on_unhealthy(reason)``. The supervisor's callback SIGKILLs the process group; its watcher
then reaps the process and reports the exit like a crash, so in-flight calls fail and the
model is marked failed on the node. A successful check resets the count.

The monitor owns its own channel (closing the supervisor's channel on stop cannot make a
check fail), waits with :meth:`threading.Event.wait` (no busy sleeping), and ends as soon
as :meth:`HealthMonitor.stop` is called; it never keeps a process alive. A hang is detected
at most about ``failures * (interval_s + timeout_s)`` seconds after it starts.

Defaults come from :class:`tasks.settings.Settings` (``backend_health_interval_s``,
``backend_health_timeout_s``, ``backend_health_failures``), the single place of defaults.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tasks.settings import Settings

log = logging.getLogger("modelbay.health")

_FIELDS = Settings.model_fields
DEFAULT_INTERVAL_S: float = _FIELDS["backend_health_interval_s"].default
"""Seconds between two health checks (0 disables monitoring)."""
DEFAULT_TIMEOUT_S: float = _FIELDS["backend_health_timeout_s"].default
"""Deadline of one health check, in seconds."""
DEFAULT_FAILURES: int = _FIELDS["backend_health_failures"].default
"""Consecutive failed checks after which the backend counts as hung."""


def validate(interval_s: float, timeout_s: float, failures: int) -> None:
    """Raise ``ValueError`` unless ``interval_s`` >= 0 (0: monitoring off), ``timeout_s`` > 0
    (seconds) and ``failures`` >= 1 (an integer)."""
    if interval_s < 0:
        raise ValueError(f"health interval must be >= 0 seconds (0 disables it), got {interval_s!r}")
    if timeout_s <= 0:
        raise ValueError(f"health check timeout must be > 0 seconds, got {timeout_s!r}")
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
        raise ValueError(f"health failures must be an integer >= 1, got {failures!r}")


class HealthMonitor:
    """Checks one backend process's health every ``interval_s`` seconds; see the module
    docstring.

    ``target`` is the gRPC target of the backend (``unix:/path.sock``); ``service`` the
    health service name to ask about; ``pid`` and ``model`` only label log lines.
    ``on_unhealthy(reason)`` is called once, from the monitor thread, after ``failures``
    consecutive failed checks; it returns True when it acted (killed the process) and False
    when it declined (the process is already being stopped). Either way the monitor ends."""

    def __init__(
        self, target: str, *, service: str, pid: int, model: str, on_unhealthy: Callable[[str], bool],
        interval_s: float = DEFAULT_INTERVAL_S, timeout_s: float = DEFAULT_TIMEOUT_S,
        failures: int = DEFAULT_FAILURES, channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        validate(interval_s, timeout_s, failures)
        if interval_s == 0:
            raise ValueError("a HealthMonitor needs interval_s > 0 (0 means: do not create one)")
        self.target = target
        self.service = service
        self.pid = pid
        self.model = model
        self.on_unhealthy = on_unhealthy
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = failures
        self.channel_options = list(channel_options)
        self._stopped = threading.Event()
        self._count_lock = threading.Lock()
        self._checks_ok = 0
        self._failures_in_a_row = 0
        self._last_problem: str | None = None
        self._verdict: str | None = None
        self._thread: threading.Thread | None = None

    # -- observation -------------------------------------------------------------------
    @property
    def checks_ok(self) -> int:
        """How many checks answered SERVING since the monitor started."""
        with self._count_lock:
            return self._checks_ok

    @property
    def failures_in_a_row(self) -> int:
        """Consecutive failed checks so far (reset to 0 by a successful one)."""
        with self._count_lock:
            return self._failures_in_a_row

    @property
    def last_problem(self) -> str | None:
        """What the last failed check saw (e.g. "DEADLINE_EXCEEDED"), None if none failed."""
        with self._count_lock:
            return self._last_problem

    @property
    def verdict(self) -> str | None:
        """The reason passed to ``on_unhealthy``, once the backend was declared hung."""
        return self._verdict

    @property
    def running(self) -> bool:
        """True while the monitor thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the monitor thread (a daemon); calling it twice is an error."""
        if self._thread is not None:
            raise RuntimeError("HealthMonitor already started")
        self._thread = threading.Thread(target=self._run, name=f"backend-health-{self.pid}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (thread-safe, idempotent, does not block). A check in
        flight ends within ``timeout_s`` seconds and its outcome is ignored."""
        self._stopped.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` seconds for the thread to end; True once it ended."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.running

    # -- the loop ----------------------------------------------------------------------
    def _check(self, stub: health_pb2_grpc.HealthStub) -> str | None:
        """One Check with the deadline; None when SERVING, else what went wrong."""
        request = health_pb2.HealthCheckRequest(service=self.service)
        try:
            resp = stub.Check(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            code: grpc.StatusCode | None = getattr(err, "code", lambda: None)()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"no answer within {self.timeout_s:g}s"
            return code.name if code is not None else str(err)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return None

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.target, options=self.channel_options)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stopped.wait(self.interval_s):
                try:
                    problem = self._check(stub)
                except ValueError:  # the channel was closed under us: we are shutting down
                    return
                if self._stopped.is_set():  # stopped during the check: its outcome means nothing
                    return
                with self._count_lock:
                    if problem is None:
                        self._checks_ok += 1
                        self._failures_in_a_row = 0
                        continue
                    self._failures_in_a_row += 1
                    self._last_problem = problem
                    count = self._failures_in_a_row
                log.warning("health check of backend pid %d (model %r) failed (%d/%d): %s",
                            self.pid, self.model, count, self.failures, problem)
                if count >= self.failures:
                    self._declare_hung(count, problem)
                    return
        except Exception:  # a bug here must not pass silently; the backend is left alone
            log.exception("health monitor of backend pid %d (model %r) failed", self.pid, self.model)
        finally:
            channel.close()

    def _declare_hung(self, count: int, problem: str) -> None:
        reason = (f"health check failed {count} times in a row "
                  f"(timeout {self.timeout_s:g}s, every {self.interval_s:g}s; last: {problem})")
        self._verdict = reason
        try:
            acted = self.on_unhealthy(reason)
        except Exception:
            log.exception("on_unhealthy callback of backend pid %d failed", self.pid)
            return
        if acted:
            log.error("backend pid %d (model %r) is hung: %s; killed it", self.pid, self.model, reason)
        else:
            log.info("backend pid %d (model %r) failed its health checks while stopping; left to the stop",
                     self.pid, self.model)


__all__ = ["DEFAULT_FAILURES", "DEFAULT_INTERVAL_S", "DEFAULT_TIMEOUT_S", "HealthMonitor", "validate"]
