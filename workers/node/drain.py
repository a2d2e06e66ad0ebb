"""The worker's background duties beyond tasks: reaping dead nodes' jobs, and draining on a
graceful stop.

Drain (SIGTERM, a rolling update): Celery stops consuming and waits for the running tasks.
Meanwhile this node marks itself ``draining`` (placement skips it; its model states are
withdrawn, so new jobs load their model elsewhere) and gives its running jobs
``worker_stop_grace_s`` seconds to finish. Jobs still running then are handed back: each
goes back to the queue (it runs again on another node) and its backend call is cancelled,
so the task returns at once. Celery then shuts down, the backends stop and the node record
is removed.
"""
from __future__ import annotations

import logging
import threading
import time

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
            if agent is not None:
                agent.drain()
            deadline = time.monotonic() + settings.worker_stop_grace_s
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
