"""Model queues that lost their last holder, and the sweep that routes their jobs again: no
job waits forever on a queue that nobody consumes.

A job routed to ``model.<token>`` waits there for a holder of the model to take it. When a
node stops holding the model (an unload, an eviction, a backend crash, a drain, a node whose
heartbeat expired, a worker that came back under the same node id), the queue may be left
with no consumer. Each of those events writes the model into ``mb:orphans`` with the time
(:func:`mark_orphaned`). The reaper (:mod:`workers.node.reaper`: one worker per round, every
``reaper_interval_s`` seconds) hands the entries older than ``stranded_s`` seconds to
:meth:`Sweeper.sweep`:

- a live node holds the model ``ready``: the queue has a consumer; the entry goes;
- a load of the model is in flight: its holder will consume the queue; the entry stays (if
  the load fails, a later round sweeps);
- else the queue's messages are read (kombu's Redis transport keeps a queue as a Redis list
  named after it, LPUSH to send, BRPOP to take; a message is JSON whose ``body`` is the
  base64 of ``[args, kwargs, embed]``), and every inference job still ``queued``/``loading``
  under that message's route number is routed again (:meth:`Dispatcher.route`: moved to a
  current holder, or a load placed on a node that can serve it). Then the message is removed
  (LREM). A message removed late, or taken by a worker meanwhile, does nothing: its route
  number is stale (``JobRecord.routed``).

A node whose heartbeat expired (or that stopped) ``stranded_s`` seconds ago and has not come
back is handled once (:meth:`Sweeper.bury`): its models are marked, and the inference jobs
pinned to it and still waiting in ``node.<id>`` fail with ``node_lost``.

A message a worker had *taken* but not started when it died sits in kombu's ``unacked``
hash (its delivery time in ``unacked_index``) until the visibility timeout. So for
``2 × stranded_s`` seconds after a worker is found lost (a restart's takeover, a buried node,
a job or load of a lost process), the reaper also looks there (:meth:`Sweeper.rescue_taken`):
an inference job still ``queued``/``loading`` under a message delivered more than
``stranded_s`` seconds ago (a live worker starts a message within milliseconds of taking it),
and not waiting for a load still in flight, is routed again and its old message dropped.

Keys (:mod:`tasks.keys`, written through ``store.queues``, :mod:`tasks.queues`):
``mb:orphans``, a sorted set of model name → the epoch seconds at which a node last
stopped holding it (ZADD GT: it only moves later); ``mb:rescue``, set (with an expiry) while
taken messages are looked at; ``mb:gone``, a hash of node id → when it was first found gone.

Cost: one ZRANGEBYSCORE and one EXISTS per reaper round while nothing is wrong, whatever the
catalog's size.
"""
from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from tasks.dispatch import Dispatcher
from tasks.errors import ErrorCode, ModelbayError
from tasks.names import TASK_INFER, model_queue, node_queue
from tasks.schemas import JobRecord, NodeRecord
from tasks.settings import Settings
from tasks.store import Store

log = logging.getLogger("modelbay.reaper")


def mark_orphaned(store: Store, models: Iterable[str], at_s: float | None = None, *, quiet: bool = False) -> None:
    """Note that a node stopped holding ``models`` at ``at_s`` (epoch seconds, default now).
    With ``quiet`` a Redis error is logged, not raised (an unload must go on)."""
    names = list(models)
    if not names:
        return
    when = time.time() if at_s is None else at_s
    try:
        store.queues.mark_orphaned(names, when)
    except redis.RedisError as exc:
        if not quiet:
            raise
        log.warning("could not mark %s as without a holder here: %s", names, exc)


@dataclass(frozen=True)
class Message:
    """One task message as kombu's Redis transport stores it."""

    raw: str
    task: str
    job_id: str
    route: int | None


def parse_message(raw: str) -> Message | None:
    """The task, job id and route number of a stored message; None if it is not ours."""
    try:
        msg = json.loads(raw)
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
        route = kwargs.get("route")
        return Message(raw, str(msg["headers"]["task"]), str(args[0]),
                       route if isinstance(route, int) else None)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def read_queue(store: Store, queue: str) -> list[Message]:
    """The messages waiting in ``queue``, oldest first (one LRANGE)."""
    raws = store.queues.messages(queue)
    return [m for raw in reversed(raws) if (m := parse_message(raw)) is not None]


def waiting(job: JobRecord | None, message: Message) -> bool:
    """True when ``message`` is the live one of a job that still waits to run."""
    return (job is not None and job.kind == "inference" and job.status in ("queued", "loading")
            and (message.route is None or message.route == job.routed))


class Sweeper:
    """Routes again the jobs of model queues that lost their last holder; see the module."""

    def __init__(self, store: Store, dispatcher: Dispatcher, settings: Settings) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.settings = settings

    def due(self, now_s: float | None = None, limit: int = 100) -> list[tuple[str, float]]:
        """Entries older than ``stranded_s`` (model, epoch seconds), oldest first."""
        now = time.time() if now_s is None else now_s
        return self.store.queues.orphaned_before(now - self.settings.stranded_s, limit)

    def sweep(self, entries: list[tuple[str, float]], nodes: list[NodeRecord], *,
              keep: bool = False) -> dict[str, int]:
        """Check each (model, marked at) entry against the live ``nodes``; see the module.
        With ``keep`` the entries stay for a later round (a takeover sweeps at once, and
        the reaper checks again ``stranded_s`` later for messages sent meanwhile)."""
        counts = {"rerouted": 0, "failed": 0, "dropped": 0}
        for model, marked_s in entries:
            states = self.store.model_nodes(model, nodes)
            if not any(s.state == "ready" for s in states):
                if any(s.state in ("staging", "loading") and self.store.active_load(s.node, model) is not None
                       for s in states):
                    if not keep:  # its holder will consume the queue; look again stranded_s later
                        self.store.queues.postpone_orphan(model, time.time())
                    continue
                for key, value in self._reroute_queue(model).items():
                    counts[key] += value
            if not keep:
                self.store.queues.forget_orphan(model, marked_s)
        if counts["rerouted"] or counts["failed"]:
            log.warning("stranded jobs routed again: %s", counts)
        return counts

    def _reroute_queue(self, model: str) -> dict[str, int]:
        queue = model_queue(model)
        counts = {"rerouted": 0, "failed": 0, "dropped": 0}
        for message in read_queue(self.store, queue):
            if message.task == TASK_INFER:
                job = self.store.get_job(message.job_id)
                if waiting(job, message) and job is not None:
                    counts[self._reroute(job)] += 1
                else:
                    counts["dropped"] += 1
                self.store.queues.remove_message(queue, message.raw)  # after the new message is out
        return counts

    def _reroute(self, job: JobRecord, reason: str = "") -> str:
        manifest = self.store.get_manifest(job.model)
        reason = reason or f"its queue {model_queue(job.model)} lost its last consumer"
        if manifest is None:
            self.store.fail(job.id, ErrorCode.MODEL_NOT_FOUND,
                            f"{reason}, and model {job.model!r} is no longer in the catalog")
            return "failed"
        try:
            self.dispatcher.route(job, manifest)
        except ModelbayError as exc:
            self.store.fail(job.id, exc.code, f"{reason}; could not route it again: {exc.message}")
            return "failed"
        log.warning("job %s routed again: %s", job.id, reason)
        return "rerouted"

    def lost_worker(self) -> None:
        """A worker process was found lost: look at taken messages for ``2 × stranded_s``."""
        self.store.queues.open_rescue(int(self.settings.stranded_s * 2000) + 1)

    def rescue_taken(self, now_s: float | None = None) -> dict[str, int]:
        """While ``mb:rescue`` is set: route again the inference jobs whose message was taken
        more than ``stranded_s`` ago and not started (see the module)."""
        counts = {"rerouted": 0, "failed": 0}
        if not self.store.queues.rescuing():
            return counts
        cutoff = (time.time() if now_s is None else now_s) - self.settings.stranded_s
        taken: list[tuple[str, Message]] = []
        for tag, raw in self.store.queues.taken_before(cutoff):
            try:
                message = parse_message(json.dumps(json.loads(raw)[0])) if raw else None
            except (ValueError, TypeError, IndexError, KeyError):
                message = None
            if message is not None and message.task == TASK_INFER:
                taken.append((tag, message))
        jobs = self.store.jobs([m.job_id for _, m in taken])
        for tag, message in taken:
            job = jobs.get(message.job_id)
            if job is None or not waiting(job, message):
                continue
            load = self.store.get_job(job.load_job) if job.status == "loading" and job.load_job else None
            if load is not None and not load.terminal:
                continue  # it waits for a load: the load's end decides (the reaper fails a lost one)
            counts[self._reroute(job, "its message was taken by a worker that was lost before starting it")] += 1
            self.store.queues.drop_taken(tag)  # the old message does nothing now: keep kombu from restoring it
        return counts

    def gone_long(self, node_ids: list[str], now_s: float | None = None) -> list[str]:
        """Of the nodes found gone, those gone for ``stranded_s`` seconds (a worker restarted
        under the same id within that, as in a rolling update, keeps its queue)."""
        if not node_ids:
            return []
        now = time.time() if now_s is None else now_s
        new, since = self.store.queues.note_gone(node_ids, now)
        for node_id, first in zip(node_ids, new):
            if first:  # just found gone: the queues of the models it held lose a consumer now
                mark_orphaned(self.store, self.store.node_models(node_id), now)
        return [n for n, s in zip(node_ids, since) if s is not None and now - float(s) >= self.settings.stranded_s]

    def bury(self, node_id: str) -> int:
        """A node gone for a while (heartbeat expired, or stopped): mark the models it held
        (again), fail the inference jobs pinned to it that still wait in its queue
        (``node_lost``), and forget it. Its loads and unloads are the reaper's (they fail with ``node_lost``).
        Returns the number of jobs failed."""
        held = self.store.node_models(node_id)
        mark_orphaned(self.store, held)
        failed = 0
        queue = node_queue(node_id)
        for message in read_queue(self.store, queue):
            if message.task != TASK_INFER:
                continue  # loads and unloads: their records fail in the reaper's round
            if self.store.get_node(node_id) is not None:
                return failed  # it came back meanwhile: it serves its queue
            job = self.store.get_job(message.job_id)
            why = f"the job is pinned to node {node_id}, whose heartbeat expired"
            if waiting(job, message) and self.store.fail(message.job_id, ErrorCode.NODE_LOST, why).applied:
                failed += 1
            self.store.queues.remove_message(queue, message.raw)
        if self.store.get_node(node_id) is not None:
            return failed
        self.store.forget_node(node_id)
        self.store.queues.forget_gone(node_id)
        self.lost_worker()
        log.warning("node %s is gone: %d model(s) marked, %d pinned job(s) failed", node_id, len(held), failed)
        return failed
