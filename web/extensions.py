"""Flask extensions: the store, the Celery sender and the job waiter, set up with ``init_app``."""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import redis
from flask import Flask, current_app

from tasks.celery_app import make_celery
from tasks.dispatch import Dispatcher
from tasks.schemas import TERMINAL, JobRecord
from tasks.settings import Settings
from tasks.store import Store
from web.live import Live
from web.perprocess import PerProcess

log = logging.getLogger("modelbay.web")


class _Waiting:
    """One waiting request: woken with the status the job's channel carried."""

    __slots__ = ("event", "status")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.status: str | None = None


class JobWaiter:
    """Long-poll support: one pub/sub listener thread per process wakes the requests waiting
    on a job when its status changes. Started lazily, so it is created after a fork."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._waiting: dict[str, list[_Waiting]] = defaultdict(list)
        self._listener = PerProcess(lambda: threading.Thread(target=self._listen, name="modelbay-job-waiter",
                                                             daemon=True).start())

    def wait(self, job_id: str, timeout_s: float, stop_at: frozenset[str] = TERMINAL) -> JobRecord | None:
        """The job once its status is in ``stop_at`` (terminal by default), or as it is after
        ``timeout_s`` seconds; None if there is no such job. The record is read once on entry
        (after the wait is registered, so no change is missed) and again only on a change
        whose status is in ``stop_at``: the channel's message carries the status."""
        self._listener.ensure()
        waiting = _Waiting()
        with self._lock:
            self._waiting[job_id].append(waiting)
        try:
            deadline = time.monotonic() + timeout_s
            record = self.store.get_job(job_id)
            while record is not None and record.status not in stop_at:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # The 1 s cap is a safety net for a missed pub/sub message.
                woke = waiting.event.wait(min(remaining, 1.0))
                waiting.event.clear()
                if woke and waiting.status is not None and waiting.status not in stop_at:
                    continue  # a step on the way (queued -> running): nothing to read yet
                record = self.store.get_job(job_id)
            return record
        finally:
            with self._lock:
                waiters = self._waiting.get(job_id, [])
                if waiting in waiters:
                    waiters.remove(waiting)
                if not waiters:
                    self._waiting.pop(job_id, None)

    def _listen(self) -> None:
        backoff_s = 0.1
        while True:
            try:
                pubsub = self.store.job_events()
                backoff_s = 0.1
                for message in pubsub.listen():
                    job_id = str(message.get("channel", "")).rsplit(":", 1)[-1]
                    status = message.get("data")
                    with self._lock:
                        for waiting in self._waiting.get(job_id, []):
                            waiting.status = status if isinstance(status, str) else None
                            waiting.event.set()
            except redis.RedisError as exc:
                log.warning("job waiter lost Redis (%s); retrying in %.1fs", exc, backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)


class Modelbay:
    """The app's handle on modelbay's shared parts: ``current_app.extensions["modelbay"]``."""

    def __init__(self, app: Flask | None = None, settings: Settings | None = None) -> None:
        self.settings = settings
        if app is not None:
            self.init_app(app, settings)

    def init_app(self, app: Flask, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.celery = make_celery(settings, main="modelbay-web")
        self.dispatcher = Dispatcher(self.store, self.celery)
        self.waiter = JobWaiter(self.store)
        self.live = Live(settings, self.store)
        app.extensions["modelbay"] = self


def mb() -> Modelbay:
    return current_app.extensions["modelbay"]
