"""Progress of a load, from staging ticks to the job record at a bounded rate.

:class:`Debouncer` is the rule architecture §5 sets for byte ticks: the first tick of an interval
goes out at once (leading edge), later ones only update the pending state, and the latest
state is flushed when the interval ends (trailing edge), so a stall never hides the last
bytes. Transitions (``start``, ``file_complete``, ``complete``, ``error``, ``loading``) are
always emitted at once. The job-record writer below allows about one Redis write per
``interval_s`` per load; the progress issue adds NATS as a second sink.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from tasks.schemas import JobProgress
from tasks.store import Store

log = logging.getLogger("modelbay.worker")

TRANSITIONS = frozenset({"start", "file_complete", "complete", "error", "loading", "done"})


class Debouncer:
    """Calls ``emit(event, state)`` for transitions at once and for ticks at most once per
    ``interval_s`` seconds, leading edge plus a trailing flush of the latest tick.

    ``clock`` and ``schedule(delay_s, fn)`` are injectable so tests can script time;
    by default a :class:`threading.Timer` runs the trailing flush."""

    def __init__(self, emit: Callable[[str, dict[str, Any]], None], interval_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self.emit = emit
        self.interval_s = interval_s
        self.clock = clock
        self.schedule = schedule or self._timer
        self._lock = threading.Lock()
        self._last_emit = float("-inf")
        self._pending: tuple[int, str, dict[str, Any]] | None = None
        self._flush_scheduled = False
        # Emits happen outside the lock (the caller's thread, or the flush timer's): each
        # carries the order it was submitted in, and one older than the last emitted is
        # dropped, so a late trailing flush never overwrites a newer transition.
        self._seq = 0
        self._emitted_seq = 0
        self._emit_lock = threading.Lock()

    def submit(self, event: str, state: dict[str, Any]) -> None:
        with self._lock:
            now = self.clock()
            self._seq += 1
            if event in TRANSITIONS:
                self._pending = None  # a stale tick must never follow a transition
                self._last_emit = now
                out: tuple[int, str, dict[str, Any]] | None = (self._seq, event, state)
            elif now - self._last_emit >= self.interval_s:
                self._last_emit = now
                out = (self._seq, event, state)
            else:
                self._pending = (self._seq, event, state)
                out = None
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.schedule(self._last_emit + self.interval_s - now, self._flush)
        if out is not None:
            self._safe_emit(*out)

    def _flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            pending, self._pending = self._pending, None
            if pending is None:
                return
            self._last_emit = self.clock()
        self._safe_emit(*pending)

    def _safe_emit(self, seq: int, event: str, state: dict[str, Any]) -> None:
        with self._emit_lock:
            if seq < self._emitted_seq:
                return  # a newer state went out meanwhile
            self._emitted_seq = seq
            try:
                self.emit(event, state)
            except Exception as exc:  # progress never fails a task
                log.warning("progress emit failed: %s", exc)

    @staticmethod
    def _timer(delay_s: float, fn: Callable[[], None]) -> threading.Timer:
        timer = threading.Timer(max(0.0, delay_s), fn)
        timer.daemon = True
        timer.start()
        return timer


def human_bytes(n: int | None) -> str:
    """1234567 → '1.2 MB' (decimal units, as progress lines show them)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def to_job_progress(event: str, state: dict[str, Any]) -> JobProgress:
    """A staging/loading event as the job record's ``progress``."""
    if event == "loading":  # LoadModel reports nothing until it ends: no percentage
        return JobProgress(phase="loading", progress=None, message=state.get("message"))
    done, total = state.get("bytes_done") or 0, state.get("bytes_total")
    pct = 100.0 if event == "complete" else (min(100.0, 100.0 * done / total) if total else 0.0)
    if event == "error":
        message = state.get("message")
    elif state.get("file") is None:
        message = f"staging {state.get('files_total') or 0} file(s). Total: {human_bytes(total)}"
    else:
        message = f"processing file: {state['file']}. Total: {human_bytes(total)}. Current: {human_bytes(done)}"
    return JobProgress(phase="staging", progress=round(pct, 1), bytes_done=done, bytes_total=total,
                       file=state.get("file"), file_index=state.get("file_index"),
                       files_total=state.get("files_total"), message=message)


def job_progress_sink(store: Store, job_id: str, interval_s: float) -> Callable[[str, dict[str, Any]], None]:
    """A progress sink that writes the load job's ``progress`` at most every ``interval_s``."""
    debouncer = Debouncer(lambda event, state: store.set_progress(job_id, to_job_progress(event, state)),
                          interval_s)
    return debouncer.submit
