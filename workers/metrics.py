"""Prometheus metrics of one worker, served on ``MODELBAY_WORKER_METRICS_PORT`` (0: none).

- ``modelbay_jobs_total{kind,task,status}``: jobs this worker ended, by final status;
- ``modelbay_job_queue_wait_seconds{kind}``: created → started, and
  ``modelbay_job_run_seconds{kind,task}``: started → ended, apart;
- ``modelbay_loads_total{status}`` and ``modelbay_load_seconds``: model loads (staging included);
- ``modelbay_staging_bytes_total``: bytes transferred into the model cache;
- ``modelbay_evictions_total``: models unloaded to make room;
- ``modelbay_inflight{model}``: jobs running on each model here;
- ``modelbay_worker_nats_connected``: 1 while the progress bus is connected;
- ``modelbay_batches_total{status}``: batches this worker finalized, by final status, and
  ``modelbay_batch_lines_total{outcome}``: batch lines answered here (completed, failed, and at
  finalizing those that never ran: cancelled, expired).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from tasks.schemas import JobRecord

log = logging.getLogger("modelbay.worker")

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
JOBS = Counter("modelbay_jobs_total", "Jobs ended on this worker", ["kind", "task", "status"])
QUEUE_WAIT = Histogram("modelbay_job_queue_wait_seconds", "Seconds from creation to start", ["kind"],
                       buckets=_SECONDS)
RUN_TIME = Histogram("modelbay_job_run_seconds", "Seconds from start to end", ["kind", "task"], buckets=_SECONDS)
LOADS = Counter("modelbay_loads_total", "Model loads on this worker", ["status"])
LOAD_SECONDS = Histogram("modelbay_load_seconds", "Seconds a load took, staging included", buckets=_SECONDS)
STAGING_BYTES = Counter("modelbay_staging_bytes_total", "Bytes transferred into the model cache")
EVICTIONS = Counter("modelbay_evictions_total", "Models unloaded to make room for another")
INFLIGHT = Gauge("modelbay_inflight", "Jobs running on a model on this worker", ["model"])
BATCHES = Counter("modelbay_batches_total", "Batches finalized on this worker, by final status", ["status"])
BATCH_LINES = Counter("modelbay_batch_lines_total", "Batch lines answered on this worker, by outcome", ["outcome"])
NATS_CONNECTED = Gauge("modelbay_worker_nats_connected", "1 while this worker's NATS connection is up")


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def job_ended(record: JobRecord | None) -> None:
    """Count a job this worker ended (call with its final record)."""
    if record is None or not record.terminal:
        return
    task = record.task or ""
    JOBS.labels(kind=record.kind, task=task, status=record.status).inc()
    created, started, finished = _ts(record.created_at), _ts(record.started_at), _ts(record.finished_at)
    if created and started:
        QUEUE_WAIT.labels(kind=record.kind).observe(max(0.0, (started - created).total_seconds()))
    if started and finished:
        run_s = max(0.0, (finished - started).total_seconds())
        RUN_TIME.labels(kind=record.kind, task=task).observe(run_s)
        if record.kind == "load":
            LOAD_SECONDS.observe(run_s)
    if record.kind == "load":
        LOADS.labels(status=record.status).inc()


def batch_lines(outcome: str, count: int) -> None:
    """Count ``count`` batch lines answered with ``outcome`` (completed, failed, cancelled, expired)."""
    if count > 0:
        BATCH_LINES.labels(outcome=outcome).inc(count)


def batch_ended(status: str) -> None:
    BATCHES.labels(status=status).inc()


def serve(port: int, nats_connected: Callable[[], bool]) -> None:
    """Start the metrics endpoint (a daemon thread); a port in use is a warning, not a crash."""
    NATS_CONNECTED.set_function(lambda: 1.0 if nats_connected() else 0.0)
    if port <= 0:
        return
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("metrics port %d unavailable (%s): this worker serves no metrics", port, exc)
        return
    log.info("metrics on :%d/metrics", port)
