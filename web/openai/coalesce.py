"""Embedding calls coalesced into shared jobs (issue 16): a job costs the same CPU for one text
as for sixty-four, so under load the calls of one web process for one model share jobs.

Per web process there is a *lane* for each (caller's scope, model, node pin). A call's texts
join its lane's pending list. While fewer than ``max_jobs`` of the lane's jobs are on their
way (queued for, or running at, a holder of the model), the first thread to look takes the
pending calls in arrival order, as many as fit in ``max_texts`` texts and ``max_chars``
characters, and submits them as one job; each call then reads its rows from that job's
result. An idle lane sends a call at once, alone: a call waits here only while it would
otherwise wait behind the lane's own jobs in the queue, so one client sees no added latency.

The lane's place is given back (:meth:`Coalescer.release`) once the job is no longer on its
way: it ended, its submission failed, or it waits for a load (while a model loads, calls go
as jobs of their own and wait for the load as before). A job is cancelled only when every
call that shares it has left without its result (its client went, or a load ran past the
wait): :meth:`Batch.leave` says when.

Scopes keep callers apart: calls with different API keys never share a job, since a shared
job's record holds every call's texts. Nothing here imports Flask; the routes' side is
:class:`web.openai.serving.SharedCall`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from tasks.schemas import JobRecord


class LeftWaiting(Exception):
    """The call's client went while the call waited for a place in a job."""


@dataclass(eq=False)
class Part:
    """One call's texts; ``start`` is the row of its first text in the shared job."""

    texts: list[str]
    start: int = 0
    batch: Batch | None = None

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)


@dataclass(eq=False)
class _Lane:
    pending: list[Part] = field(default_factory=list)
    jobs: int = 0  # this lane's jobs on their way


class Batch:
    """One shared job: the calls in it, its record once submitted, and who still waits."""

    def __init__(self, key: Hashable, parts: list[Part]) -> None:
        self.key = key
        self.parts = parts
        start = 0
        for part in parts:
            part.start, part.batch = start, self
            start += len(part.texts)
        self.texts = [t for part in parts for t in part.texts]
        self.record: JobRecord | None = None  # the job, once submitted
        self.error: BaseException | None = None  # why it could not be submitted
        self.submitted = threading.Event()
        self.final: JobRecord | None = None  # the job's record once it ended
        self.ended = threading.Event()
        self.released = False
        self._lock = threading.Lock()
        self._watching = False
        self._left = 0

    def watch(self, read: Callable[[], JobRecord | None], slice_s: float) -> JobRecord:
        """The job's record within about ``slice_s`` seconds: one call at a time reads it
        (``read``, the job waiter's long-poll); the others wait for what it finds."""
        with self._lock:
            if self.final is not None:
                return self.final
            mine = not self._watching
            if mine:
                self._watching = True
        if not mine:
            self.ended.wait(slice_s)
            return self.final or self.record or _missing()
        try:
            record = read()
        finally:
            with self._lock:
                self._watching = False
        if record is not None:
            self.record = record
            if record.terminal:
                self.final = record
                self.ended.set()
        return record or self.record or _missing()

    def leave(self) -> bool:
        """This call is done with the job; True when it was the last and the job has not
        ended, so nobody will read the result: the caller cancels the job."""
        with self._lock:
            self._left += 1
            return self._left == len(self.parts) and self.final is None


def _missing() -> JobRecord:
    raise RuntimeError("a shared job was read before it was submitted")


class Coalescer:
    """The lanes of one web process; see the module docstring. ``max_jobs`` 0 is not
    expected here (the route then makes a plain call)."""

    def __init__(self, max_jobs: int, max_texts: int, max_chars: int, slice_s: float = 0.2) -> None:
        self.max_jobs = max_jobs
        self.max_texts = max_texts
        self.max_chars = max_chars
        self.slice_s = slice_s  # how often a call waiting for a place looks at its client, seconds
        self._cond = threading.Condition()
        self._lanes: dict[Hashable, _Lane] = {}

    def join(self, key: Hashable, texts: list[str], submit: Callable[[list[str]], JobRecord],
             gone: Callable[[], bool]) -> Part:
        """A place for ``texts`` in a job of lane ``key``, once that job is submitted
        (``submit`` makes a job of the texts it is given; the thread that forms a batch calls
        it). Raises what ``submit`` raised, or :class:`LeftWaiting` when ``gone()``."""
        part = Part(list(texts))
        with self._cond:
            lane = self._lanes.setdefault(key, _Lane())
            lane.pending.append(part)
        while True:
            with self._cond:
                if part.batch is not None:
                    break
                if lane.jobs >= self.max_jobs:
                    self._cond.wait(self.slice_s)
                    if part.batch is None and gone():
                        lane.pending.remove(part)
                        self._tidy(key, lane)
                        raise LeftWaiting()
                    continue
                batch = self._take(key, lane)
            self._submit(batch, submit)
        batch = part.batch
        batch.submitted.wait()  # the thread that formed it is submitting
        if batch.error is not None:
            raise batch.error
        return part

    def release(self, batch: Batch) -> None:
        """The job is no longer on its way: its lane may send another (once per batch)."""
        with self._cond:
            if batch.released:
                return
            batch.released = True
            lane = self._lanes.get(batch.key)
            if lane is not None:
                lane.jobs -= 1
                self._tidy(batch.key, lane)
            self._cond.notify_all()

    def lanes(self) -> int:
        """Lanes with pending calls or jobs on their way (for tests)."""
        with self._cond:
            return len(self._lanes)

    def _take(self, key: Hashable, lane: _Lane) -> Batch:
        """The pending calls that fit in one job, oldest first (always at least one)."""
        texts = chars = count = 0
        for part in lane.pending:
            if count and (texts + len(part.texts) > self.max_texts or chars + part.chars > self.max_chars):
                break
            texts, chars, count = texts + len(part.texts), chars + part.chars, count + 1
        parts, lane.pending = lane.pending[:count], lane.pending[count:]
        lane.jobs += 1
        return Batch(key, parts)

    def _submit(self, batch: Batch, submit: Callable[[list[str]], JobRecord]) -> None:
        try:
            batch.record = submit(batch.texts)
        except BaseException as exc:  # every call of the batch answers this error
            batch.error = exc
        finally:
            batch.submitted.set()
            if batch.record is None or batch.record.status != "queued":  # failed, or waits for a load
                self.release(batch)

    def _tidy(self, key: Hashable, lane: _Lane) -> None:
        if not lane.pending and lane.jobs <= 0 and self._lanes.get(key) is lane:
            del self._lanes[key]
