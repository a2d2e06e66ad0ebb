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
what it held).
"""
from __future__ import annotations

import logging
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
                bounded(agent.drain, settings.worker_stop_grace_s, "marking the node draining")
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
