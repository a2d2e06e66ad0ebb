"""``GET /metrics``: Prometheus metrics of the web side, summed over gunicorn's processes.

Counted here: jobs submitted by kind and task. Computed from Redis at each scrape (every
replica gives the same answer): live nodes (``modelbay_nodes_up``, draining ones apart) and
the messages waiting in each Celery queue (``modelbay_queue_depth{queue}``: every live
node's ``node.<id>`` and every catalog model's ``model.<token>``; batch chunks wait in a
priority list of their own and are not in it), and the batches not yet ended by status
(``modelbay_batches{status}``). For autoscaling (deploy/kubernetes: KEDA), per catalog
model: the age of the oldest job waiting in its queue (``modelbay_queue_oldest_age_seconds
{model}``: the tail of ``model.<token>``, LINDEX -1, and its job record's ``created_at``;
0 when none waits), the nodes holding it ready (``modelbay_model_holders{model}``) and the
jobs waiting per holder (``modelbay_model_jobs_per_holder{model}``: the queue's depth over
its holders, the whole depth when none holds it). Each scrape costs a fixed number of round
trips whatever the queues hold (one per live node for its models, and a few), never a scan of a queue. Also whether this
process's NATS subscriber is connected. The workers' own metrics (jobs by final status,
queue wait and run time, loads, staging bytes, evictions, in-flight per model) are served by
each worker on ``MODELBAY_WORKER_METRICS_PORT``.

Under gunicorn the hooks in :mod:`web.gunicorn_conf` set ``PROMETHEUS_MULTIPROC_DIR``, so
the counters of all worker processes are summed; elsewhere the process's own registry is used.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections import Counter as Tally
from collections.abc import Iterator
from datetime import datetime

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from tasks.names import model_queue, node_queue
from tasks.schemas import NodeRecord
from tasks.store import Store
from web.extensions import mb
from web.openapi import STORE, Ok, documented

bp = Blueprint("metrics", __name__)

JOBS_SUBMITTED = Counter("modelbay_jobs_submitted_total", "Jobs created through the API", ["kind", "task"])


# POST /v1/embeddings calls, whether or not they shared a job (web/openai/coalesce.py): over
# modelbay_jobs_submitted_total{task="embed"}, the calls per job
EMBEDDINGS_CALLS = Counter("modelbay_embeddings_calls_total",
                           "POST /v1/embeddings calls that waited for their job (shared: it may hold other calls)",
                           ["shared"])


def count_submitted(kind: str, task: str | None) -> None:
    JOBS_SUBMITTED.labels(kind=kind, task=task or "").inc()


def count_embeddings_call(shared: bool) -> None:
    EMBEDDINGS_CALLS.labels(shared="true" if shared else "false").inc()


class StateCollector:
    """Gauges read from Redis and from this process at scrape time."""

    def collect(self) -> Iterator[Metric]:
        store = mb().store
        nodes = store.live_nodes(include_draining=True)
        up = GaugeMetricFamily("modelbay_nodes_up", "Worker nodes with a live heartbeat", labels=["draining"])
        up.add_metric(["false"], sum(1 for n in nodes if not n.draining))
        up.add_metric(["true"], sum(1 for n in nodes if n.draining))
        yield up
        models = list(store.manifests())
        queues = [node_queue(n.id) for n in nodes] + [model_queue(name) for name in models]
        lists = [(n, None) for n in store.queues.depths(queues[:len(nodes)])]
        lists += store.queues.depths_and_oldest(queues[len(nodes):])  # models: their tails too
        depth = GaugeMetricFamily("modelbay_queue_depth", "Messages waiting in a Celery queue", labels=["queue"])
        for queue, (length, _) in zip(queues, lists, strict=True):
            depth.add_metric([queue], length)
        yield depth
        yield from backlog(store, nodes, models, lists[len(nodes):])
        batches = GaugeMetricFamily("modelbay_batches", "Batches not yet ended, by status (the workers count "
                                    "the ended ones: modelbay_batches_total)", labels=["status"])
        for status, count in sorted(Tally(b.status for b in store.batches.active()).items()):
            batches.add_metric([status], count)
        yield batches
        bus = mb().live.bus
        yield GaugeMetricFamily("modelbay_web_nats_connected", "1 when this web process's NATS subscriber is up",
                                value=1.0 if bus is not None and bus.connected.is_set() else 0.0)


def backlog(store: Store, nodes: list[NodeRecord], models: list[str],
            queues: list[tuple[int, str | None]]) -> Iterator[Metric]:
    """The autoscaling gauges of each model in ``models`` (``queues``: its queue's depth and
    oldest message, in order): the oldest waiting job's age in seconds, the nodes holding it
    ready, jobs per holder."""
    holders: Tally[str] = Tally()
    for node in nodes:
        if not node.draining:
            holders.update(m for m, state in store.node_models(node.id).items() if state.state == "ready")
    waiting = {name: job_id for name, (_, raw) in zip(models, queues, strict=True) if (job_id := message_job(raw))}
    records = store.jobs(list(waiting.values()))
    now = time.time()
    age = GaugeMetricFamily("modelbay_queue_oldest_age_seconds", "Age of the oldest job waiting in a model's "
                            "queue, from its record's created_at (0: none waits)", labels=["model"])
    held = GaugeMetricFamily("modelbay_model_holders", "Live nodes (not draining) holding a model ready",
                             labels=["model"])
    per = GaugeMetricFamily("modelbay_model_jobs_per_holder", "Jobs waiting in a model's queue per node holding "
                            "it (the whole depth when none does)", labels=["model"])
    for name, (length, _) in zip(models, queues, strict=True):
        record = records.get(waiting.get(name, ""))
        age.add_metric([name], max(0.0, now - _epoch(record.created_at)) if record is not None and length else 0.0)
        held.add_metric([name], holders[name])
        per.add_metric([name], length / max(1, holders[name]))
    yield from (age, held, per)


def message_job(raw: str | None) -> str | None:
    """The job id a queued Celery message carries (its first argument), or None."""
    if not raw:
        return None
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return None
    return str(args[0]) if args else None


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


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
