"""Flask extensions: the store, the Celery sender and the job waiter, set up with ``init_app``."""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

import redis
from flask import Flask, current_app

from tasks.cas import parse_event
from tasks.celery_app import make_celery
from tasks.catalog import CatalogCache
from tasks.dispatch import Dispatcher
from tasks.schemas import TERMINAL, JobRecord
from tasks.settings import Settings
from tasks.store import Store, new_job_id
from web.live import Live
from web.openai.coalesce import Coalescer
from web.perprocess import PerProcess

log = logging.getLogger("modelbay.web")
T = TypeVar("T")
EXPECTED_MAX = 10_000  # jobs listened for before they exist, per process (each waits for its request)


class _Waiting:
    """One waiting request: woken with the status the job's channel carried (and the record,
    when the event held it: :func:`tasks.cas.event_of`)."""

    __slots__ = ("event", "status", "raw")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.status: str | None = None
        self.raw: str | None = None


class JobWaiter:
    """Long-poll support: one pub/sub listener thread per process wakes the requests waiting
    on a job when its status changes. Started lazily, so it is created after a fork."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._waiting: dict[str, list[_Waiting]] = defaultdict(list)
        self._expected: dict[str, _Waiting] = {}
        self.subscribed = threading.Event()  # the listener hears job events (set once it has subscribed)
        self._listener = PerProcess(lambda: threading.Thread(target=self._listen, name="modelbay-job-waiter",
                                                             daemon=True).start())

    def expect(self, job_id: str) -> None:
        """Listen for ``job_id`` before the job exists: the first :meth:`wait` with ``known``
        then needs no read on entry. Undo with :meth:`forget` if the job is not created."""
        self._listener.ensure()
        waiting = _Waiting()
        with self._lock:
            if len(self._expected) >= EXPECTED_MAX:  # a bound, should a path ever leave some behind
                for old in list(self._expected)[:EXPECTED_MAX // 2]:
                    self._drop(old, self._expected.pop(old))
            self._expected[job_id] = waiting
            self._waiting[job_id].append(waiting)

    def listened(self, make: Callable[[str], T], ident: Callable[[T], str]) -> T:
        """``make(job_id)`` with a new job id that is :meth:`expect`-ed first; forgotten when
        ``make`` raises, or made something of another id (an Idempotency-Key's replay)."""
        job_id = new_job_id()
        self.expect(job_id)
        try:
            made = make(job_id)
        except BaseException:
            self.forget(job_id)
            raise
        if ident(made) != job_id:
            self.forget(job_id)
        return made

    def forget(self, job_id: str) -> None:
        with self._lock:
            waiting = self._expected.pop(job_id, None)
            if waiting is not None:
                self._drop(job_id, waiting)

    def wait(self, job_id: str, timeout_s: float, stop_at: frozenset[str] = TERMINAL,
             known: JobRecord | None = None) -> JobRecord | None:
        """The job once its status is in ``stop_at`` (terminal by default), or as it is after
        ``timeout_s`` seconds; None if there is no such job. The record is read once on entry
        (after the wait is registered, so no change is missed), unless the job was
        :meth:`expect`-ed and ``known`` is the record as created; then again only on a
        change whose status is in ``stop_at`` and whose event did not carry the record."""
        self._listener.ensure()
        with self._lock:
            expected = self._expected.pop(job_id, None) if known is not None else None
            waiting = expected or _Waiting()
            if expected is None:
                self._waiting[job_id].append(waiting)
        try:
            deadline = time.monotonic() + timeout_s
            record = known if expected is not None else self.store.get_job(job_id)
            while record is not None and record.status not in stop_at:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # The 1 s cap is a safety net for a missed pub/sub message.
                woke = waiting.event.wait(min(remaining, 1.0))
                waiting.event.clear()
                if woke and waiting.status is not None and waiting.status not in stop_at:
                    continue  # a step on the way (queued -> running): nothing to read yet
                raw, waiting.raw = (waiting.raw, None) if woke else (None, None)
                record = JobRecord.model_validate_json(raw) if raw else self.store.get_job(job_id)
            return record
        finally:
            with self._lock:
                self._drop(job_id, waiting)

    def _drop(self, job_id: str, waiting: _Waiting) -> None:
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
                self.subscribed.set()
                backoff_s = 0.1
                for message in pubsub.listen():
                    job_id = str(message.get("channel", "")).rsplit(":", 1)[-1]
                    data = message.get("data")
                    status, raw = parse_event(data) if isinstance(data, str) else (None, None)
                    with self._lock:
                        for waiting in self._waiting.get(job_id, []):
                            waiting.status, waiting.raw = status, raw
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
        self.catalog = CatalogCache(self.store.manifest_raw)  # kept manifests, checked where it matters
        self.dispatcher = Dispatcher(self.store, self.celery, self.catalog)
        self.waiter = JobWaiter(self.store)
        self.live = Live(settings, self.store)
        # POST /v1/embeddings calls share jobs under load (web/openai/coalesce.py)
        self.coalescer = Coalescer(settings.coalesce_embed_jobs, min(settings.coalesce_embed_texts, settings.max_inputs),
                                   settings.max_input_chars)
        app.extensions["modelbay"] = self


def mb() -> Modelbay:
    return current_app.extensions["modelbay"]
