"""``GET /api/queues``: what waits, per model and per node, for the operations page (it polls).

Per catalog model: the jobs waiting in its queue (kombu's list ``model.<token>``) and the
batch chunks waiting in its priority lists (``model.<token>\\x06\\x16<step>``, see
:mod:`tasks.publish`), the age of the oldest of each (the list's tail, LINDEX -1: kombu
LPUSHes and BRPOPs; the age is from its job record's ``created_at``, so a job requeued after
its worker died keeps its first age), the nodes holding the model ready, and its recent
throughput (jobs/s, p50/p95 latency in ms, and a short history for sparklines) when the store
keeps one (``store.model_throughput``/``store.model_history``; ``null`` and ``[]`` otherwise).
Per live node: the pinned jobs waiting in ``node.<id>``.

Cost of one request, whatever the queues hold: the catalog, the live nodes and each node's
models, one pipeline of LLEN + LINDEX -1 per list, one read of the tails' job records (plus the
throughput reads, per model). Never a scan of a queue. Every replica answers the same.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from flask import Blueprint, jsonify
from pydantic import BaseModel, Field

from tasks.names import model_queue, node_queue
from tasks.publish import PRIORITY_STEPS, queue_key
from tasks.schemas import JobRecord, NodeRecord
from tasks.store import Store
from web.extensions import mb
from web.metrics import message_job
from web.openapi import STORE, Ok, documented

log = logging.getLogger("modelbay.web")
bp = Blueprint("queues", __name__, url_prefix="/api/queues")

THROUGHPUT_FIELDS = ("jobs_per_s", "p50_ms", "p95_ms")
HISTORY_FIELDS = ("t", "jobs", "p50_ms", "p95_ms")


class Throughput(BaseModel):
    """A model's recent throughput summed over its holders (what the store measured)."""

    jobs_per_s: float | None = Field(default=None, description="jobs ended per second, recently")
    p50_ms: float | None = Field(default=None, description="median job latency, milliseconds")
    p95_ms: float | None = Field(default=None, description="95th percentile job latency, milliseconds")


class HistoryPoint(BaseModel):
    t: float | str | None = Field(default=None, description="the bucket's time (unix seconds or ISO 8601)")
    jobs: float | None = Field(default=None, description="jobs ended in the bucket")
    p50_ms: float | None = None
    p95_ms: float | None = None


class ModelQueue(BaseModel):
    model: str
    depth: int = Field(description="inference jobs waiting in model.<token>")
    oldest_job: str | None = Field(default=None, description="the job waiting longest (the queue's tail)")
    oldest_created_at: str | None = Field(default=None, description="its created_at, ISO 8601 UTC")
    oldest_age_s: float | None = Field(default=None, description="seconds since then; null when none waits")
    chunk_depth: int = Field(description="batch chunks waiting in the model's priority lists")
    chunk_oldest_age_s: float | None = Field(default=None, description="age of the oldest waiting chunk, s")
    holders: list[str] = Field(description="live, not draining nodes holding the model ready")
    throughput: Throughput | None = Field(default=None, description="null when the store keeps none")
    history: list[HistoryPoint] = Field(default_factory=list, description="recent buckets, oldest first")


class NodeQueue(BaseModel):
    node: str
    draining: bool
    depth: int = Field(description="pinned jobs waiting in node.<id>")
    oldest_job: str | None = None
    oldest_age_s: float | None = None


class QueuesView(BaseModel):
    at: str = Field(description="when this was read, ISO 8601 UTC")
    models: list[ModelQueue]
    nodes: list[NodeQueue]


@bp.get("")
@documented("operations", "What waits: per model its queue depth, oldest job's age, holders and "
            "throughput; per node its pinned jobs (a fixed number of reads, no queue scan)",
            Ok(200, QueuesView, "models by name, then live nodes"), errors=STORE)
def list_queues():
    return jsonify(queue_view(mb().store, time.time()))


def queue_view(store: Store, now_s: float) -> dict[str, object]:
    """The body of ``GET /api/queues`` at ``now_s`` (unix seconds)."""
    models = sorted(store.manifests())
    nodes = store.live_nodes(include_draining=True)
    keys = [queue_key(model_queue(m), p) for m in models for p in PRIORITY_STEPS]
    keys += [node_queue(n.id) for n in nodes]
    lists = store.queues.depths_and_oldest(keys)
    tails = {key: job for key, (_, raw) in zip(keys, lists, strict=True) if (job := message_job(raw))}
    records = store.jobs(list(set(tails.values())))
    waiting = {key: (depth, records.get(tails.get(key, ""))) for key, (depth, _) in zip(keys, lists, strict=True)}
    holders = _holders(store, nodes)
    out_models = []
    for name in models:
        steps = [waiting[queue_key(model_queue(name), p)] for p in PRIORITY_STEPS]
        depth, record = steps[0]
        chunk_ages = [age for d, rec in steps[1:] if (age := _age(d, rec, now_s)) is not None]
        out_models.append({
            "model": name, "depth": depth, **_oldest(depth, record, now_s),
            "chunk_depth": sum(d for d, _ in steps[1:]), "chunk_oldest_age_s": max(chunk_ages, default=None),
            "holders": holders.get(name, []), **_throughput(store, name)})
    out_nodes = []
    for node in nodes:
        depth, record = waiting[node_queue(node.id)]
        oldest = _oldest(depth, record, now_s)
        out_nodes.append({"node": node.id, "draining": node.draining, "depth": depth,
                          "oldest_job": oldest["oldest_job"], "oldest_age_s": oldest["oldest_age_s"]})
    return {"at": _iso(now_s), "models": out_models, "nodes": out_nodes}


def _holders(store: Store, nodes: list[NodeRecord]) -> dict[str, list[str]]:
    """Model → ids of the live, not draining nodes holding it ready (one read per node)."""
    held: dict[str, list[str]] = {}
    for node in nodes:
        if node.draining:
            continue
        for model, state in store.node_models(node.id).items():
            if state.state == "ready":
                held.setdefault(model, []).append(node.id)
    return held


def _oldest(depth: int, record: JobRecord | None, now_s: float) -> dict[str, object]:
    if record is None or not depth:
        return {"oldest_job": None, "oldest_created_at": None, "oldest_age_s": None}
    return {"oldest_job": record.id, "oldest_created_at": record.created_at,
            "oldest_age_s": _age(depth, record, now_s)}


def _age(depth: int, record: JobRecord | None, now_s: float) -> float | None:
    """Seconds since ``record`` was created (never negative), or None when nothing waits."""
    if record is None or not depth:
        return None
    created = datetime.fromisoformat(record.created_at.replace("Z", "+00:00")).timestamp()
    return round(max(0.0, now_s - created), 3)


def _throughput(store: Store, model: str) -> dict[str, object]:
    """``throughput`` and ``history`` of ``model`` from the store's own measures, read
    defensively: a store without them, or one that fails, gives ``null`` and ``[]``."""
    summary = getattr(store, "model_throughput", None)
    history = getattr(store, "model_history", None)
    try:
        measured = summary(model) if callable(summary) else None
        points = history(model) if callable(history) else None
    except Exception:  # the page must show the queues even when the measures are broken
        log.exception("reading the throughput of %s", model)
        measured, points = None, None
    return {"throughput": _pick(measured, THROUGHPUT_FIELDS) if measured is not None else None,
            "history": [_pick(p, HISTORY_FIELDS) for p in (points or [])]}


def _pick(source: object, fields: tuple[str, ...]) -> dict[str, object]:
    """``fields`` of a mapping or an object (missing ones are None)."""
    if isinstance(source, Mapping):
        return {f: source.get(f) for f in fields}
    return {f: getattr(source, f, None) for f in fields}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
