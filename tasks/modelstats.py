"""Per-model throughput and queue counters: what ``queue_position``, ``eta_s``, the 429 of a
full queue and the operations page's sparklines read.

Throughput costs no Redis write per job: each worker notes its finished inference jobs in
memory (:data:`RECORDER`) and its heartbeat flushes them (:meth:`ModelStats.flush_model_stats`),
one report per node per model per beat, ``{t, node, jobs, window_s, p50_ms, p95_ms}``, in the
zset ``mb:mstat:<tok>`` (kept :data:`HISTORY_S`). Readers sum the reports across holders.

Queue counters (``mb:mq:<tok>``, a hash) move inside the scripts that already run per job:
``enq`` when an interactive job is submitted (the placement script, which also refuses past
the cap), ``started`` when such a job first turns ``running`` and ``gone`` when it ends
without ever running (the job's compare-and-set, :mod:`tasks.cas`). Queued now =
``enq − started − gone``; a job's position = its number (``queue_seq``) − ``started`` − 1,
clamped to [0, queued − 1]. Approximate: jobs that start out of order (several holders, a
pinned job on its node's queue) and jobs cancelled ahead of a job (they lower ``queued`` but
not ``seq − started``) make it an estimate; a job requeued after its worker died keeps its
first start counted (it shows position 0). Batch chunks never take a number.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass

import redis

from tasks.keys import model_counts_key, model_stats_key
from tasks.schemas import JobRecord

HISTORY_S = 1800.0        # how long reports are kept, seconds
THROUGHPUT_WINDOW_S = 60.0  # model_throughput looks at the reports of the last this many seconds


def percentile(sorted_ms: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ascending ``sorted_ms`` (nearest rank); 0.0 when empty."""
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))]


class Recorder:
    """Durations (ms) of the inference jobs this process ran, per model, since the last drain."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ms: dict[str, list[float]] = {}

    def note(self, model: str, duration_ms: float) -> None:
        with self._lock:
            self._ms.setdefault(model, []).append(duration_ms)

    def drain(self) -> dict[str, list[float]]:
        with self._lock:
            out, self._ms = self._ms, {}
        return out


RECORDER = Recorder()  # the worker process's (its job threads note, its heartbeat drains)


@dataclass
class Slot:
    """A queue place asked of the placement script: ``cap`` (0: none) in; ``seq`` (the job's
    number) and ``queued`` (jobs queued before it) out."""

    cap: int
    seq: int = 0
    queued: int = 0


def queue_count(current: JobRecord, new: JobRecord) -> str:
    """The counter of ``mb:mq`` that a transition current → new moves: ``started`` on a
    numbered job's first start, ``gone`` when it ends without having run, else ``""``."""
    if not new.queue_seq or current.status not in ("queued", "loading") or new.status == current.status:
        return ""
    if new.status == "running" and new.attempts <= 1:
        return "started"
    if new.terminal and current.attempts == 0:
        return "gone"
    return ""


def position(seq: int, counts: dict[str, str]) -> tuple[int, int]:
    """(jobs ahead of job number ``seq``, jobs queued now) from the model's counters."""
    enq, started, gone = (int(counts.get(k) or 0) for k in ("enq", "started", "gone"))
    queued = max(0, enq - started - gone)
    return max(0, min(seq - started - 1, queued - 1)), queued


def _merge(rows: list[dict[str, float]]) -> tuple[int, float | None, float | None]:
    """(jobs, job-weighted p50, p95) of reports; None percentiles without jobs."""
    jobs = sum(int(r["jobs"]) for r in rows)
    if not jobs:
        return 0, None, None
    p50 = sum(r["p50_ms"] * r["jobs"] for r in rows) / jobs
    p95 = sum(r["p95_ms"] * r["jobs"] for r in rows) / jobs
    return jobs, round(p50, 1), round(p95, 1)


class ModelStats:
    """The reports and their sums (a mixin of :class:`tasks.store.Store`, via ``NodeStore``)."""

    _r: redis.Redis

    def flush_model_stats(self, node_id: str, samples: dict[str, list[float]], window_s: float) -> None:
        """Write one report per model of ``samples`` (durations in ms, from :meth:`Recorder.drain`)
        covering the last ``window_s`` seconds; one round trip."""
        if not samples:
            return
        now = time.time()
        with self._r.pipeline(transaction=False) as pipe:
            for model, ms in samples.items():
                ms = sorted(ms)
                row = {"t": round(now, 3), "node": node_id, "jobs": len(ms), "window_s": window_s,
                       "p50_ms": round(percentile(ms, 0.5), 1), "p95_ms": round(percentile(ms, 0.95), 1)}
                key = model_stats_key(model)
                pipe.zadd(key, {json.dumps(row, sort_keys=True): now})
                pipe.zremrangebyscore(key, 0, now - HISTORY_S)
                pipe.expire(key, int(HISTORY_S))
            pipe.execute()

    def _reports(self, model: str, since: float) -> list[dict[str, float]]:
        return [json.loads(m) for m in self._r.zrangebyscore(model_stats_key(model), since, "+inf")]

    def model_throughput(self, model: str) -> dict[str, float | int | None]:
        """``{jobs_per_s, p50_ms, p95_ms, holders}`` of ``model`` over the last
        :data:`THROUGHPUT_WINDOW_S` seconds: per node, its jobs over the span its reports
        cover (so the rate while it worked on the model), summed over the nodes that reported
        (``holders``). Durations are a job's run time (running → end), ms; None without jobs."""
        rows = self._reports(model, time.time() - THROUGHPUT_WINDOW_S)
        rate = 0.0
        nodes: dict[str, list[dict[str, float]]] = {}
        for row in rows:
            nodes.setdefault(str(row["node"]), []).append(row)
        for own in nodes.values():
            span = max(r["t"] for r in own) - min(r["t"] for r in own) + max(r["window_s"] for r in own)
            rate += sum(r["jobs"] for r in own) / max(span, 1e-3)
        _, p50, p95 = _merge(rows)
        return {"jobs_per_s": round(rate, 3), "p50_ms": p50, "p95_ms": p95, "holders": len(nodes)}

    def model_history(self, model: str, bucket_s: float = 10.0, span_s: float = 600.0) -> list[dict[str, float | int | None]]:
        """The last ``span_s`` seconds of ``model`` in ``bucket_s``-second steps, oldest first:
        ``{t (the step's start, epoch s), jobs (ended in it, all holders), p50_ms, p95_ms}``
        (None in steps without jobs). For sparklines."""
        now = time.time()
        first = math.floor((now - span_s) / bucket_s) * bucket_s
        steps: dict[float, list[dict[str, float]]] = {}
        for row in self._reports(model, first):
            steps.setdefault(math.floor(row["t"] / bucket_s) * bucket_s, []).append(row)
        out: list[dict[str, float | int | None]] = []
        t = first
        while t <= now:
            jobs, p50, p95 = _merge(steps.get(t, []))
            out.append({"t": t, "jobs": jobs, "p50_ms": p50, "p95_ms": p95})
            t += bucket_s
        return out

    def place_in_queue(self, record: JobRecord) -> None:
        """Set ``record.queue_position`` and ``eta_s`` while it waits (a numbered job queued or
        waiting for its load); two reads, no scan. ``eta_s`` is None without recent throughput."""
        if not record.queue_seq or record.status not in ("queued", "loading"):
            return
        ahead, _ = position(record.queue_seq, self._r.hgetall(model_counts_key(record.model)))
        record.queue_position, record.eta_s = ahead, self.eta_s(record.model, ahead)

    def eta_s(self, model: str, ahead: int) -> float | None:
        """Seconds until a job with ``ahead`` jobs before it ends, at the recent rate; None
        when ``model`` has no recent throughput."""
        rate = self.model_throughput(model)["jobs_per_s"]
        return round((ahead + 1) / rate, 1) if isinstance(rate, float) and rate > 0 else None
