"""``GET /metrics``: Prometheus metrics of the web side, summed over gunicorn's processes.

Counted here: jobs submitted by kind and task. Computed from Redis at each scrape (every
replica gives the same answer): live nodes (``modelbay_nodes_up``, draining ones apart) and
the messages waiting in each Celery queue (``modelbay_queue_depth{queue}``: every live
node's ``node.<id>`` and every catalog model's ``model.<token>``; batch chunks wait in a
priority list of their own and are not in it), and the batches not yet ended by status
(``modelbay_batches{status}``). Also whether this
process's NATS subscriber is connected. The workers' own metrics (jobs by final status,
queue wait and run time, loads, staging bytes, evictions, in-flight per model) are served by
each worker on ``MODELBAY_WORKER_METRICS_PORT``.

Under gunicorn the hooks in :mod:`web.gunicorn_conf` set ``PROMETHEUS_MULTIPROC_DIR``, so
the counters of all worker processes are summed; elsewhere the process's own registry is used.
"""
from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Iterator

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from tasks.names import model_queue, node_queue
from web.extensions import mb
from web.openapi import STORE, Ok, documented

bp = Blueprint("metrics", __name__)

JOBS_SUBMITTED = Counter("modelbay_jobs_submitted_total", "Jobs created through the API", ["kind", "task"])


def count_submitted(kind: str, task: str | None) -> None:
    JOBS_SUBMITTED.labels(kind=kind, task=task or "").inc()


class StateCollector:
    """Gauges read from Redis and from this process at scrape time."""

    def collect(self) -> Iterator[Metric]:
        store = mb().store
        nodes = store.live_nodes(include_draining=True)
        up = GaugeMetricFamily("modelbay_nodes_up", "Worker nodes with a live heartbeat", labels=["draining"])
        up.add_metric(["false"], sum(1 for n in nodes if not n.draining))
        up.add_metric(["true"], sum(1 for n in nodes if n.draining))
        yield up
        queues = [node_queue(n.id) for n in nodes] + [model_queue(name) for name in store.manifests()]
        lengths = store.queues.depths(queues)
        depth = GaugeMetricFamily("modelbay_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        for queue, length in zip(queues, lengths, strict=True):
            depth.add_metric([queue], length)
        yield depth
        batches = GaugeMetricFamily("modelbay_batches", "Batches not yet ended, by status (the workers count "
                                    "the ended ones: modelbay_batches_total)", labels=["status"])
        for status, count in sorted(Tally(b.status for b in store.batches.active()).items()):
            batches.add_metric([status], count)
        yield batches
        bus = mb().live.bus
        yield GaugeMetricFamily("modelbay_web_nats_connected", "1 when this web process's NATS subscriber is up",
                                value=1.0 if bus is not None and bus.connected.is_set() else 0.0)


@bp.get("/metrics")
@documented("operations", "Prometheus metrics of the web side (MODELBAY_METRICS_OPEN opens it)",
            Ok(200, None, "the text exposition format", media="text/plain"), errors=STORE)
def metrics():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        counted = generate_latest(registry)
    else:
        counted = generate_latest(REGISTRY)
    state = CollectorRegistry()
    state.register(StateCollector())
    return Response(counted + generate_latest(state), mimetype=CONTENT_TYPE_LATEST)
