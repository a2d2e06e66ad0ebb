"""Dynamic batching: concurrent requests gathered into one forward pass.

:class:`Batcher` owns one thread. A request (:meth:`Batcher.submit`, called from a gRPC
thread) joins the open batch; the batch closes when it holds ``max_batch_size`` texts or
``max_delay_s`` seconds after its first request arrived, whichever comes first, and is
encoded with one call of ``encode``. Each caller gets back exactly its own rows.

Isolation: a request cancelled before its batch runs is dropped from it; one cancelled
while its batch runs still lets the others finish. When a batch of several requests fails,
each request is encoded again on its own, so only the request that really fails gets the
error (the others are answered normally).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("modelbay.backend")

Encode = Callable[[list[str]], Sequence[Any]]


class BatchCancelled(Exception):
    """The caller went away before its rows were ready."""


@dataclass
class _Request:
    texts: list[str]
    cancelled: Callable[[], bool]
    done: threading.Event = field(default_factory=threading.Event)
    rows: Sequence[Any] | None = None
    error: BaseException | None = None

    def finish(self, rows: Sequence[Any] | None = None, error: BaseException | None = None) -> None:
        self.rows, self.error = rows, error
        self.done.set()


class Batcher:
    """See the module docstring. ``encode(texts)`` returns one row per text; ``max_delay_s``
    is in seconds. Counters: ``batches`` (calls of ``encode``), ``texts``, ``requests``,
    ``max_batch`` (most texts in one call)."""

    def __init__(self, encode: Encode, max_batch_size: int = 64, max_delay_s: float = 0.005,
                 poll_s: float = 0.01) -> None:
        if max_batch_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size must be >= 1 and max_delay_s >= 0")
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.poll_s = poll_s
        self.batches = self.texts = self.requests = self.max_batch = 0
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], cancelled: Callable[[], bool] = lambda: False) -> Sequence[Any]:
        """Encode ``texts`` as part of a batch; blocks until done. Raises
        :class:`BatchCancelled` when ``cancelled()`` turns true first, or what ``encode``
        raised for these texts."""
        if not texts:
            return []
        request = _Request(list(texts), cancelled)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(request)
        while not request.done.wait(self.poll_s):
            if cancelled():
                raise BatchCancelled("the caller cancelled")
        if request.error is not None:
            raise request.error
        if request.rows is None:
            raise BatchCancelled("the request was dropped")
        return request.rows

    def close(self) -> None:
        """Stop the thread after the batch in progress; waiting callers get an error."""
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join(5.0)

    def stats(self) -> dict[str, int]:
        return {"forward_passes": self.batches, "texts_encoded": self.texts, "requests": self.requests,
                "max_batch": self.max_batch}

    # -- the batching thread ------------------------------------------------------------
    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, size = [first], len(first.texts)
        deadline = time.monotonic() + self.max_delay_s
        while size < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
            size += len(item.texts)
        return batch, False

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._gather(first)
            self._run([r for r in batch if not r.cancelled()])
            if stop:
                break
        while True:  # closed: fail whoever is still queued
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.finish(error=RuntimeError("the batcher is closed"))

    def _encode(self, texts: list[str]) -> Sequence[Any]:
        self.batches += 1
        self.texts += len(texts)
        self.max_batch = max(self.max_batch, len(texts))
        rows = self.encode(texts)
        if len(rows) != len(texts):
            raise RuntimeError(f"encode returned {len(rows)} rows for {len(texts)} texts")
        return rows

    def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        self.requests += len(batch)
        texts = [t for r in batch for t in r.texts]
        try:
            rows = self._encode(texts)
        except Exception as exc:  # isolate: retry each request alone
            if len(batch) == 1:
                batch[0].finish(error=exc)
                return
            log.warning("a batch of %d requests failed (%s); encoding them one by one", len(batch), exc)
            for request in batch:
                try:
                    request.finish(rows=self._encode(request.texts))
                except Exception as one:  # this request's own failure
                    request.finish(error=one)
            return
        start = 0
        for request in batch:
            request.finish(rows=rows[start:start + len(request.texts)])
            start += len(request.texts)
