"""Live progress over NATS: every operation this process runs publishes debounced events.

An operation (a load: staging then loading; an unload) has one id (its job id), one origin
(this process) and a ``seq`` that only grows. Byte ticks go through the same
:class:`~workers.progress.debounce.Debouncer` as the job record (leading edge, trailing flush);
transitions go at once; while the operation lives, a keepalive is sent at least every
``ops_ttl_s / 3`` so mirrors do not expire it. Publishing never blocks or fails a task.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from tasks.bus import Bus
from tasks.events import DETAIL_FIELDS, EventStatus, ProgressEvent
from tasks.names import progress_subject
from tasks.schemas import utcnow
from tasks.settings import Settings
from workers.progress.debounce import Debouncer, to_job_progress

log = logging.getLogger("modelbay.worker")

# Internal progress events → the status on the wire (architecture §5). The end of staging and the
# start of loading are progress of the same operation; only the load's end completes it.
_WIRE: dict[str, EventStatus] = {"start": "start", "progress": "progress", "file_complete": "file_complete",
         "complete": "progress", "loading": "progress", "done": "complete", "error": "error"}


class Operation:
    """One live operation. ``update(event, fields)`` is the progress sink of a load.

    With ``quiet_s`` (inference) nothing is published until the operation has run that many
    seconds: a job that ends sooner publishes nothing at all (its record says everything), and
    one that runs longer shows up with its latest state."""

    def __init__(self, publisher: LivePublisher, op_id: str, kind: str, model: str, job: str | None,
                 quiet_s: float = 0.0) -> None:
        self.publisher = publisher
        self.id = op_id
        self.kind = kind
        self.model = model
        self.job = job
        self.seq = 0
        self.started_at = utcnow()
        self.state: dict[str, Any] = {}
        self.last_sent = time.monotonic()
        self.ended = False
        self._quiet_until = self.last_sent + quiet_s if quiet_s > 0 else None
        self._held: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.debouncer = Debouncer(self._send, publisher.settings.progress_interval_s)

    def update(self, event: str, fields: dict[str, Any]) -> None:
        if event == "loading":
            self.kind = "loading"
        if self._quiet_until is not None:
            if time.monotonic() < self._quiet_until:
                self._held.update((k, v) for k, v in fields.items() if v is not None)
                return
            self._quiet_until = None
            fields = {**self._held, **fields}
        self.debouncer.submit(event, dict(fields))

    def done(self) -> None:
        if self._quiet_until is None:
            self.debouncer.submit("done", {})
        self.publisher.forget(self)

    def fail(self, message: str) -> None:
        if self._quiet_until is None:
            self.debouncer.submit("error", {"message": message, "error": message})
        self.publisher.forget(self)

    def keepalive(self) -> None:
        if self.seq > 0:  # an operation still quiet has nothing to keep alive
            self._send("keepalive", {})

    def _send(self, event: str, fields: dict[str, Any]) -> None:
        with self._lock:
            if self.ended:
                return
            self.seq += 1
            for key in DETAIL_FIELDS:
                if fields.get(key) is not None:
                    self.state[key] = fields[key]
            if self.kind == "staging" and event in ("start", "progress", "file_complete", "complete"):
                # The same words as the job record's progress, from the same state.
                self.state["message"] = to_job_progress(event, self.state).message
            status: EventStatus = _WIRE.get(event, "keepalive")
            if status in ("complete", "error"):
                self.ended = True
            if fields.get("progress") is not None:
                self.state["progress"] = fields["progress"]
            done, total = self.state.get("bytes_done"), self.state.get("bytes_total")
            pct: float | None
            if status == "complete":
                pct = 100.0
            elif self.kind == "loading":
                pct = None  # LoadModel reports nothing until it ends: no percentage to show
            elif self.kind == "inference":
                pct = self.state.get("progress") or 0.0
            else:
                pct = round(100.0 * done / total, 1) if done is not None and total else 0.0
            event = ProgressEvent(op=self.id, kind=self.kind, status=status, seq=self.seq,
                                  origin=self.publisher.origin, model=self.model,
                                  node=self.publisher.settings.node_id, job=self.job, phase=self.kind,
                                  **{k: self.state.get(k) for k in DETAIL_FIELDS}, progress=pct,
                                  error=fields.get("error"), started_at=self.started_at, ts=time.time())
            self.last_sent = time.monotonic()
        key = self.job or self.id if self.kind == "inference" else self.model
        self.publisher.bus.publish(progress_subject(self.publisher.settings.nats_prefix, self.kind, key),
                                   event.encode())


class LivePublisher:
    """Creates operations and keeps them alive with keepalives until they end."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.origin = f"{settings.node_id}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._ops: dict[str, Operation] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._keepalives, name="modelbay-keepalive", daemon=True).start()
        on_reconnect = getattr(bus, "on_reconnect", None)  # a test's stand-in bus may have none
        if on_reconnect is not None:
            on_reconnect(self.republish)

    def operation(self, op_id: str, kind: str, model: str, job: str | None = None,
                  quiet_s: float = 0.0) -> Operation:
        op = Operation(self, op_id, kind, model, job, quiet_s)
        with self._lock:
            self._ops[op_id] = op
        return op

    def forget(self, op: Operation) -> None:
        with self._lock:
            self._ops.pop(op.id, None)

    def republish(self) -> None:
        """Send the whole state of every live operation now (a keepalive carries it all): after
        a NATS reconnect, what was published while the link was down may be lost, and a web
        replica that was reconnected too should not wait for the next tick to show the rows."""
        with self._lock:
            ops = list(self._ops.values())
        for op in ops:
            op.keepalive()

    def _keepalives(self) -> None:
        every_s = self.settings.ops_ttl_s / 3
        while True:
            time.sleep(min(1.0, every_s / 2))
            now = time.monotonic()
            with self._lock:
                due = [op for op in self._ops.values() if now - op.last_sent >= every_s]
            for op in due:
                op.keepalive()
