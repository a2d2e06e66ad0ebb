"""Cancellation of running inference: one thread per worker polls the job records of the
calls in flight and cancels the gRPC call of any job that turned terminal (``DELETE
/v1/jobs/{id}`` writes ``cancelled`` atomically). One MGET per poll, whatever the count; a
cancel reaches the backend within a poll (``MODELBAY_CANCEL_POLL_S``) of being written."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tasks.store import Store

log = logging.getLogger("modelbay.worker")


class CancelWatcher:
    def __init__(self, store: Store, poll_s: float) -> None:
        self.store = store
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._watched: dict[str, Callable[[], None]] = {}
        self._cancelled: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelbay-cancel", daemon=True)
        self._thread.start()

    def watch(self, job_id: str, on_cancel: Callable[[], None]) -> None:
        with self._lock:
            self._watched[job_id] = on_cancel
        self._wake.set()

    def unwatch(self, job_id: str) -> bool:
        """Stop watching; True when the job was cancelled while watched."""
        with self._lock:
            self._watched.pop(job_id, None)
            if job_id in self._cancelled:
                self._cancelled.discard(job_id)
                return True
        return False

    def watched(self) -> list[str]:
        """The jobs whose backend call is in flight on this node."""
        with self._lock:
            return list(self._watched)

    def take_all(self) -> dict[str, Callable[[], None]]:
        """Stop watching every job; their cancel functions (for a hand-back on stop)."""
        with self._lock:
            taken, self._watched = self._watched, {}
        return taken

    def is_cancelled(self, job_id: str) -> bool:
        record = self.store.get_job(job_id)
        return record is None or record.status == "cancelled"

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ids = list(self._watched)
            if not ids:
                self._wake.wait(1.0)
                self._wake.clear()
                # The first look is a poll later, as every other: a job that ends sooner (most
                # of them, at low load) costs no read and no wake-up of this thread.
                self._stop.wait(self.poll_s)
                continue
            try:
                records = self.store.jobs(ids)
            except Exception as exc:  # Redis blips must not kill the watcher
                log.warning("cancel watcher: %s", exc)
                self._stop.wait(self.poll_s * 10)
                continue
            for job_id in ids:
                record = records.get(job_id)
                if record is None or record.status == "cancelled":
                    with self._lock:
                        callback = self._watched.pop(job_id, None)
                        self._cancelled.add(job_id)
                    if callback is not None:
                        log.info("job %s cancelled: stopping its backend call", job_id)
                        callback()
            self._stop.wait(self.poll_s)
