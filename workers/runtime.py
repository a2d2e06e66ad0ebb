"""The models a node holds: one supervised backend process per loaded model.

A load runs in the load task's thread and is detached from every request: nothing but
:meth:`ModelManager.unload` (an explicit unload or delete of the model) stops it.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

from celery import Celery

from tasks.names import model_queue, model_token
from tasks.schemas import JobRecord, Manifest, ModelNode, utcnow
from tasks.settings import Settings
from tasks.store import Store
from workers.backend_calls import BackendError, load_deadline_s
from workers.supervisor import BackendProcess

log = logging.getLogger("modelbay.worker")


class NotHere(Exception):
    """The model is neither ready nor loading on this node."""


class LoadFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Entry:
    model: str
    manifest: Manifest
    load_job: str
    state: str = "loading"
    proc: BackendProcess | None = None
    in_flight: int = 0
    last_used: str | None = None
    loaded_at: str | None = None
    error: LoadFailed | None = None
    unloading: bool = False
    settled: threading.Event = field(default_factory=threading.Event)


class ModelManager:
    """Loads, holds and unloads models on this node, and mirrors their state into Redis."""

    def __init__(self, settings: Settings, store: Store, celery: Celery) -> None:
        self.settings = settings
        self.store = store
        self.celery = celery
        self.hostname: str | None = None  # the Celery worker's name, set when it is ready
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self.socket_dir = Path(tempfile.mkdtemp(prefix=f"mb-{settings.node_id[:16]}-"))
        self.log_dir = Path(settings.run_dir).resolve() / "logs" / settings.node_id
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ---- loading ----------------------------------------------------------------------

    def load(self, job: JobRecord, manifest: Manifest) -> dict[str, object]:
        """Start the backend and load the model; returns the load's result. Raises
        :class:`LoadFailed`. A model already ready here is not loaded again."""
        with self._lock:
            entry = self._entries.get(job.model)
            if entry is None or entry.state == "failed":
                entry = Entry(model=job.model, manifest=manifest, load_job=job.id)
                self._entries[job.model] = entry
                mine = True
            else:
                mine = False
        if not mine:
            entry.settled.wait()
            if entry.state != "ready":
                raise entry.error or LoadFailed("load_failed", "the load in flight failed")
            return {"node": self.settings.node_id, "already_loaded": True}
        started = time.monotonic()
        self._publish(entry)
        try:
            result = self._start_and_load(entry)
        except LoadFailed as exc:
            self._settle_failed(entry, exc)
            raise
        entry.state, entry.loaded_at = "ready", utcnow()
        entry.last_used = entry.loaded_at
        self._publish(entry)
        self._consume(model_queue(entry.model), True)
        entry.settled.set()
        result.update(node=self.settings.node_id, load_s=round(time.monotonic() - started, 3))
        return result

    def _start_and_load(self, entry: Entry) -> dict[str, object]:
        manifest = entry.manifest
        if manifest.files:
            raise LoadFailed("staging_unsupported",
                             "this build cannot stage model files yet; only file-less backends load")
        proc = BackendProcess(
            manifest.backend, entry.model, self.socket_dir,
            start_timeout_s=self.settings.backend_start_timeout_s,
            stop_grace_s=self.settings.backend_stop_grace_s,
            log_path=self.log_dir / f"{model_token(entry.model)[:80]}.log",
            on_exit=lambda code, e=entry: self._on_exit(e, code))
        with self._lock:
            if entry.unloading:
                raise LoadFailed("unloaded", "the model was unloaded while loading")
            entry.proc = proc
        size = sum(f.size or 0 for f in manifest.files)
        try:
            proc.start()
            info = proc.load([], "", manifest.options, "",
                             timeout_s=load_deadline_s(size, base_s=self.settings.load_base_timeout_s))
        except BackendError as exc:
            proc.stop()
            if entry.unloading:
                raise LoadFailed("unloaded", "the model was unloaded while loading") from exc
            raise LoadFailed(getattr(exc, "code", "load_failed"), str(exc)) from exc
        return {"pid": proc.pid, "backend": manifest.backend, **dict(info)}

    def _settle_failed(self, entry: Entry, exc: LoadFailed) -> None:
        entry.state, entry.error = "failed", exc
        if exc.code == "unloaded":
            with self._lock:
                if self._entries.get(entry.model) is entry:
                    del self._entries[entry.model]
            self.store.delete_model_state(self.settings.node_id, entry.model)
        else:
            self._publish(entry)
        entry.settled.set()

    def _on_exit(self, entry: Entry, returncode: int) -> None:
        """The backend process died on its own: the model is lost on this node."""
        log.error("backend for %s exited unexpectedly (code %s)", entry.model, returncode)
        if entry.state == "ready":
            self._consume(model_queue(entry.model), False)
        entry.state = "failed"
        entry.error = LoadFailed("backend_exited", f"backend process exited with code {returncode}")
        self._publish(entry)
        entry.settled.set()

    # ---- using ------------------------------------------------------------------------

    def acquire(self, model: str, cancelled: Callable[[], bool]) -> Entry:
        """The ready entry for ``model``, waiting while it loads here. Raises :class:`NotHere`,
        :class:`LoadFailed`, or returns None-like via ``cancelled`` (raises ``NotHere``)."""
        while True:
            with self._lock:
                entry = self._entries.get(model)
                if entry is None or entry.unloading:
                    raise NotHere(model)
                if entry.state == "ready":
                    entry.in_flight += 1
                    return entry
                if entry.state == "failed":
                    raise entry.error or LoadFailed("load_failed", "model failed on this node")
            if entry.settled.wait(0.2):
                continue
            if cancelled():
                raise NotHere(model)

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.in_flight = max(0, entry.in_flight - 1)
            entry.last_used = utcnow()
        self._publish(entry)

    # ---- unloading --------------------------------------------------------------------

    def unload(self, model: str, *, stop_consuming: bool = True) -> str:
        """Stop the model's backend (loading or ready). Returns how it ended.

        ``stop_consuming`` False skips cancelling the model queue's consumer: at worker
        shutdown the consumer is already gone and would never answer."""
        with self._lock:
            entry = self._entries.get(model)
            if entry is None:
                return "not_loaded"
            entry.unloading = True
            was_ready = entry.state == "ready"
            entry.state = "unloading"
        if was_ready and stop_consuming:
            self._consume(model_queue(model), False)
        self._publish(entry)
        how = entry.proc.stop() if entry.proc is not None else "never_started"
        with self._lock:
            if self._entries.get(model) is entry:
                del self._entries[model]
        self.store.delete_model_state(self.settings.node_id, model)
        entry.settled.set()
        return how

    def stop_all(self) -> None:
        for model in list(self._entries):
            try:
                self.unload(model, stop_consuming=False)
            except Exception:  # shutting down: keep stopping the others
                log.exception("stopping %s", model)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    # ---- views ------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def memory_used_mb(self) -> int:
        return sum(e.manifest.memory_mb or 0 for e in self.entries() if e.state != "failed")

    def loads_in_flight(self) -> int:
        return sum(1 for e in self.entries() if e.state == "loading")

    def republish(self) -> None:
        for entry in self.entries():
            self._publish(entry)

    def _publish(self, entry: Entry) -> None:
        proc = entry.proc
        state = ModelNode(
            model=entry.model, node=self.settings.node_id, state=entry.state,  # type: ignore[arg-type]
            in_flight=entry.in_flight, last_used=entry.last_used, loaded_at=entry.loaded_at,
            load_job=entry.load_job, error=entry.error.message if entry.error else None,
            pid=proc.pid if proc is not None and entry.state == "ready" else None,
            socket=str(proc.socket_path) if proc is not None and entry.state == "ready" else None,
            instance=proc.instance if proc is not None else None,
            memory_mb=entry.manifest.memory_mb or 0)
        try:
            self.store.set_model_state(state)
        except Exception as exc:  # state mirroring must not break a load
            log.warning("could not publish state of %s: %s", entry.model, exc)

    def _consume(self, queue: str, start: bool) -> None:
        """Start or stop consuming ``queue`` on this worker (handled by its own event loop)."""
        if self.hostname is None:
            log.warning("worker name unknown; cannot %s %s", "consume" if start else "cancel", queue)
            return
        control = self.celery.control
        try:
            if start:
                reply = control.add_consumer(queue, exchange=queue, routing_key=queue,
                                             destination=[self.hostname], reply=True, timeout=10)
            else:
                reply = control.cancel_consumer(queue, destination=[self.hostname], reply=True,
                                                timeout=10)
            log.info("%s %s: %s", "consume" if start else "cancel", queue, reply)
        except Exception as exc:
            log.error("could not %s %s: %s", "consume" if start else "cancel", queue, exc)
