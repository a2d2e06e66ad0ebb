"""Dynamic batching: concurrent requests gathered into forward passes of bounded size.

:class:`Batcher` owns one thread. A request (:meth:`Batcher.submit`, called from a gRPC
thread) joins the open batch; the batch closes when it holds ``max_batch_size`` texts or
``max_delay_s`` seconds after it opened, whichever comes first, and is encoded with one call
of ``encode``. No call of ``encode`` ever gets more than ``max_batch_size`` texts: a request
with more texts than the open batch has room for is split, its first texts fill the batch
and the rest start the next one (before any request that came later). Each caller gets back
exactly its own rows, in the order of its texts.

Priority: a request says how urgent it is (:data:`INTERACTIVE`, the default, or :data:`BULK`
for a batch's chunk). A batch opens with the most urgent request waiting and fills with the
next most urgent ones, so an interactive caller waits at most for the pass already running,
never behind bulk texts queued before it; within one priority, first come first served (the
rest of a split request keeps its place).

Isolation: a request cancelled before its texts run is dropped (also between the passes of a
split request); one cancelled while its batch runs still lets the others finish. When a
batch of several requests fails, each request's texts in it are encoded again on their own,
so only the request that really fails gets the error (the others are answered normally); a
request that failed in one pass is left out of its later passes.
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
INTERACTIVE, BULK = 0, 1
"""Request priorities: lower goes first."""
_CLOSE = -1  # the close marker's priority: ahead of everything


class BatchCancelled(Exception):
    """The caller went away before its rows were ready."""


@dataclass
class _Request:
    """One caller's texts; ``rows`` fills in as its pieces are encoded, ``scheduled`` is how
    many of its texts have been given to a batch so far."""

    texts: list[str]
    cancelled: Callable[[], bool]
    priority: int = INTERACTIVE
    seq: int = 0  # arrival order, within a priority
    done: threading.Event = field(default_factory=threading.Event)
    rows: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    scheduled: int = 0
    encoded: int = 0

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.texts)

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()

    def put(self, start: int, rows: Sequence[Any]) -> None:
        """Rows for texts ``start..start+len(rows)``; finishes the request when it has all."""
        self.rows[start:start + len(rows)] = list(rows)
        self.encoded += len(rows)
        if self.encoded == len(self.texts):
            self.finish()

    @property
    def live(self) -> bool:
        return not self.done.is_set() and not self.cancelled()


@dataclass(frozen=True)
class _Piece:
    """Texts ``start..end`` of ``request`` in one batch."""

    request: _Request
    start: int
    end: int

    @property
    def texts(self) -> list[str]:
        return self.request.texts[self.start:self.end]


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
        self._queue: queue.PriorityQueue[tuple[int, int, _Request | None]] = queue.PriorityQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._seq = 0
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], cancelled: Callable[[], bool] = lambda: False,
               priority: int = INTERACTIVE) -> Sequence[Any]:
        """Encode ``texts`` as part of a batch (``priority``: :data:`INTERACTIVE` or
        :data:`BULK`); blocks until done. Raises :class:`BatchCancelled` when ``cancelled()``
        turns true first, or what ``encode`` raised for these texts."""
        if not texts:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._seq += 1
            request = _Request(list(texts), cancelled, priority, self._seq)
            self._queue.put((priority, request.seq, request))
        while not request.done.wait(self.poll_s):
            if cancelled():
                raise BatchCancelled("the caller cancelled")
        if request.error is not None:
            raise request.error
        return request.rows

    def close(self) -> None:
        """Stop the thread after the batch in progress; waiting callers get an error."""
        with self._lock:
            self._closed = True
            self._queue.put((_CLOSE, 0, None))
        self._thread.join(5.0)

    def stats(self) -> dict[str, int]:
        return {"forward_passes": self.batches, "texts_encoded": self.texts, "requests": self.requests,
                "max_batch": self.max_batch}

    # -- the batching thread ------------------------------------------------------------
    def _take(self, request: _Request, room: int) -> _Piece:
        """The next ``room`` texts at most of ``request``; what is left of it goes back in the
        queue with its own priority and place."""
        start = request.scheduled
        request.scheduled = min(len(request.texts), start + room)
        if request.scheduled < len(request.texts):
            self._queue.put((request.priority, request.seq, request))
        return _Piece(request, start, request.scheduled)

    def _gather(self, first: _Request) -> tuple[list[_Piece], bool]:
        """One batch of at most ``max_batch_size`` texts starting with ``first``; True when
        the batcher was closed meanwhile."""
        batch = [self._take(first, self.max_batch_size)]
        size = len(batch[0].texts)
        deadline = time.monotonic() + self.max_delay_s
        while size < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                _, _, item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if not item.live:
                continue
            batch.append(self._take(item, self.max_batch_size - size))
            size += len(batch[-1].texts)
        return batch, False

    def _next(self) -> _Request | None:
        """The most urgent queued request that still wants its rows (None: closed)."""
        if self._closed:
            return None
        while True:
            _, _, item = self._queue.get()
            if item is None or item.live:
                return item

    def _loop(self) -> None:
        while True:
            first = self._next()
            if first is None:
                break
            batch, stop = self._gather(first)
            self._run([piece for piece in batch if piece.request.live])
            if stop:
                break
        while True:  # closed: fail whoever is still queued (a split request's rest too)
            try:
                _, _, item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item.done.is_set():
                item.finish(error=RuntimeError("the batcher is closed"))

    def _encode(self, texts: list[str]) -> Sequence[Any]:
        self.batches += 1
        self.texts += len(texts)
        self.max_batch = max(self.max_batch, len(texts))
        rows = self.encode(texts)
        if len(rows) != len(texts):
            raise RuntimeError(f"encode returned {len(rows)} rows for {len(texts)} texts")
        return rows

    def _run(self, batch: list[_Piece]) -> None:
        if not batch:
            return
        self.requests += sum(1 for piece in batch if piece.start == 0)
        texts = [t for piece in batch for t in piece.texts]
        try:
            rows = self._encode(texts)
        except Exception as exc:  # isolate: retry each request's piece alone
            if len({id(piece.request) for piece in batch}) == 1:
                batch[0].request.finish(error=exc)
                return
            log.warning("a batch of %d requests failed (%s); encoding them one by one", len(batch), exc)
            for piece in batch:
                try:
                    piece.request.put(piece.start, self._encode(piece.texts))
                except Exception as one:  # this request's own failure
                    piece.request.finish(error=one)
            return
        offset = 0
        for piece in batch:
            piece.request.put(piece.start, rows[offset:offset + piece.end - piece.start])
            offset += piece.end - piece.start
