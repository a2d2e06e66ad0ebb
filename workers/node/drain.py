"""The worker's background duties beyond tasks: reaping dead nodes' jobs, and draining on a
graceful stop.

Drain (SIGTERM, a rolling update): Celery stops consuming and waits for the running tasks.
Meanwhile this node marks itself ``draining`` (placement skips it; its model states are
withdrawn, so new jobs load their model elsewhere) and gives its running jobs
``worker_stop_grace_s`` seconds to finish. Jobs still running then are handed back: each
goes back to the queue (it runs again on another node) and its backend call is cancelled,
so the task returns at once. Celery then shuts down, the backends stop and the node record
is removed.

Redis or NATS may be gone while the worker stops (the whole stack is shutting down, or an
outage): every step here and in :meth:`workers.runtime.Runtime.stop` that writes to them runs
:func:`bounded`, so a worker with no jobs exits within ``worker_stop_grace_s`` whatever is
reachable (the node record then expires by its TTL; the reaper of another node requeues
what it held). A broker that accepts connections but never answers can still hold Celery's
own loop in a socket read (kombu's Redis client has no read timeout): the
:class:`StopWatchdog` then ends the process once the drain is over.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from tasks.dispatch import Dispatcher
from tasks.settings import Settings
from tasks.store import Store
from workers.node.agent import NodeAgent
from workers.node.cancel import CancelWatcher
from workers.node.reaper import Reaper, requeue

log = logging.getLogger("modelbay.worker")

MARK_DRAINING_S = 2.0  # the most the drain waits to mark the node draining (a beat and a withdraw)
STOP_MARGIN_S = 3.0    # after the drain (or the stop), how long Celery may take to reach its next step


class Background:
    """The reaper thread of this worker, and the drain on stop."""

    def __init__(self, settings: Settings, store: Store, dispatcher: Dispatcher, cancels: CancelWatcher,
                 instance: str) -> None:
        self.settings, self.store, self.dispatcher, self.cancels = settings, store, dispatcher, cancels
        self.reaper = Reaper(store, dispatcher, settings, instance)
        self._stop = threading.Event()
        self._reaper_thread = threading.Thread(target=self._reap, name="modelbay-reaper", daemon=True)
        self.drained = threading.Event()

    def start(self) -> None:
        self._reaper_thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _reap(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_s):
            try:
                self.reaper.run_once()
            except Exception as exc:  # a Redis blip must not end the reaper for good
                log.warning("reaper round failed: %s", exc)

    def drain(self, agent: NodeAgent | None) -> None:
        """See the module docstring; runs in its own thread while Celery waits for tasks."""
        settings, store = self.settings, self.store
        try:
            deadline = time.monotonic() + settings.worker_stop_grace_s
            if agent is not None:  # Redis may be down: the grace counts from SIGTERM all the same
                bounded(agent.drain, min(MARK_DRAINING_S, settings.worker_stop_grace_s), "marking the node draining")
            while self.cancels.watched() and time.monotonic() < deadline:
                self._stop.wait(0.1)
            handed = self.cancels.take_all()
            for job_id, cancel in handed.items():
                job = store.get_job(job_id)
                if job is not None and job.status == "running":
                    reason = f"node {settings.node_id} stopped (still running after {settings.worker_stop_grace_s:g}s)"
                    requeue(store, self.dispatcher, job, reason, settings.job_max_attempts + 1)
                cancel()
            if handed:
                log.warning("handed %d running job(s) back to the queue", len(handed))
        except Exception:  # the stop must go on whatever happens here
            log.exception("drain failed")
        finally:
            self.drained.set()


class StopWatchdog:
    """Ends this process when its stop is stuck outside modelbay's code. Once the drain is
    over (``drained``, or its time is up) and no task runs (``busy()`` is false: Celery
    legitimately waits for its tasks, a load included), Celery must begin its stop
    (:attr:`stopping`) within ``STOP_MARGIN_S``; the stop must end (:attr:`stopped`) within
    ``stop_budget_s`` (it bounds its own steps; this is the backstop), and the process must
    then exit within ``STOP_MARGIN_S``. Otherwise the process exits at once: status 1 when
    the stop did not finish, 0 when only the process's own exit hung. Jobs still running
    were handed back by the drain, and backend processes stop on their own when their worker
    is gone."""

    def __init__(self, drained: threading.Event, drain_s: float, stop_budget_s: float,
                 busy: Callable[[], bool]) -> None:
        self.drained = drained
        self.drain_s = drain_s
        self.stop_budget_s = stop_budget_s
        self.busy = busy
        self.stopping = threading.Event()
        self.stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="modelbay-stop-watchdog", daemon=True).start()

    def _run(self) -> None:
        self.drained.wait(self.drain_s + STOP_MARGIN_S)
        while self.busy() and not self.stopping.wait(0.2):
            pass  # Celery waits for its running tasks: so does the watchdog
        if not self.stopping.wait(STOP_MARGIN_S):
            self._exit(1, "Celery did not begin its stop after the drain (is the broker answering?)")
        if not self.stopped.wait(self.stop_budget_s + STOP_MARGIN_S):
            self._exit(1, "the stop did not end")
        threading.Event().wait(STOP_MARGIN_S)
        self._exit(0, "the stop ended but the process did not exit")

    @staticmethod
    def _exit(status: int, why: str) -> None:
        log.error("stop watchdog: %s; exiting now (status %d)", why, status)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(status)


def bounded(step: Callable[[], object], timeout_s: float, what: str) -> bool:
    """Run ``step`` in a daemon thread and wait for it at most ``timeout_s`` seconds. True
    when it returned in time; otherwise (or when it raised) log and go on: the thread is left
    to finish or to die with the process. For stop steps that talk to Redis or NATS."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            step()
        except Exception as exc:  # reported below, in the stopping thread
            failed.append(exc)

    thread = threading.Thread(target=run, name=f"modelbay-stop-{what[:20]}", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout_s))
    if thread.is_alive():
        log.warning("%s did not finish within %.1fs (Redis or NATS unreachable?); stopping anyway", what, timeout_s)
        return False
    if failed:
        log.warning("%s failed: %s", what, failed[0])
        return False
    return True
