"""The reaper: no job is lost when a worker dies (architecture §4).

Celery's Redis transport redelivers an unacknowledged message only after its visibility
timeout (hours, since a job may run that long), so a dead node's work is found from the job
records instead. Every worker runs :class:`Reaper` every ``reaper_interval_s`` seconds; one
of them per round holds the ``mb:reaper`` lock (:meth:`tasks.queues.QueueStore.claim_round`) and
does the work:

- an inference job ``running`` (``mb:inflight``) on a node whose heartbeat expired, or whose
  worker came back as a new process (the job's ``runner`` is not the node's ``instance``), goes back
  to the queue (:func:`requeue`) and runs elsewhere; after ``job_max_attempts`` attempts in
  all it fails with ``node_lost``;
- a load or unload on such a node fails with ``node_lost``, whether it runs or still waits
  in the node's queue (a message the dead process had taken but not started is otherwise
  redelivered only after the visibility timeout); the inference jobs waiting for that load
  are routed again, which places a new load on a live node. A load is stamped at placement
  with the node's ``instance``, so a node that came back as a new process is seen at once;
- a node gone for good (heartbeat expired, or stopped) is buried once, and model queues that
  lost their last holder are swept ``stranded_s`` after (:mod:`workers.node.stranded`);
- a job pinned to a node that is gone fails with ``node_lost``.

A worker that comes back under the same node id runs :meth:`Reaper.take_over` for its own
node before its background duties start: its predecessor's running jobs and loads go back
to routing, and the queues of the models it held are swept at once.

A node that is draining (a graceful stop) still heartbeats, so its running jobs are left to
finish. A redelivered or duplicate message of a job that already ended does nothing, and a
result is written once (terminal records are never overwritten).
"""
from __future__ import annotations

import logging
import time

from tasks.dispatch import Dispatcher
from tasks.errors import ErrorCode, ModelbayError
from tasks.schemas import JobRecord
from tasks.settings import Settings
from tasks.store import Store
from workers.jobs.batch_watch import watch as watch_batches
from workers.node.stranded import Sweeper

log = logging.getLogger("modelbay.reaper")


def requeue(store: Store, dispatcher: Dispatcher, job: JobRecord, reason: str, max_attempts: int) -> str:
    """Send a ``running`` (or waiting) inference job back to the queue; what happened:
    "requeued", "failed" (attempts used up, or it cannot be routed) or "skipped" (it had
    moved on meanwhile)."""
    if job.attempts >= max_attempts:
        store.fail(job.id, ErrorCode.NODE_LOST, f"{reason}; gave up after {job.attempts} attempt(s)")
        return "failed"
    if job.pin is not None and store.get_node(job.pin) is None:
        store.fail(job.id, ErrorCode.NODE_LOST, f"{reason}; the job is pinned to node {job.pin}, which is gone")
        return "failed"
    manifest = store.get_manifest(job.model)
    if manifest is None:
        store.fail(job.id, ErrorCode.MODEL_NOT_FOUND, f"{reason}, and model {job.model!r} is no longer in the catalog")
        return "failed"
    seen = job.routed  # routed again by someone else since ``job`` was read: theirs stands
    change = store.transition(job.id, "queued", allowed_from=("running", "loading", "queued"),
                              when=lambda r: r.routed == seen, node=job.pin)
    if not change.applied or change.record is None:
        return "skipped"
    try:
        dispatcher.route(change.record, manifest)
    except ModelbayError as exc:
        store.fail(job.id, exc.code, f"{reason}; could not route it again: {exc.message}")
        return "failed"
    log.warning("job %s requeued (attempt %d done): %s", job.id, job.attempts, reason)
    return "requeued"


class Reaper:
    """One round per :meth:`run_once`; see the module docstring."""

    def __init__(self, store: Store, dispatcher: Dispatcher, settings: Settings, instance: str = "") -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.settings = settings
        self.instance = instance  # this worker process: never lost in its own eyes
        self.sweeper = Sweeper(store, dispatcher, settings)
        self._last_reply: float | None = None  # when Redis last answered this reaper (monotonic)
        self._judge_after = 0.0  # no node is judged lost before this (monotonic)

    def run_once(self) -> dict[str, int]:
        """Reap if this process wins the round's lock; counts of what was done."""
        lock_s = max(1, round(self.settings.reaper_interval_s))
        asked = time.monotonic()
        won = self.store.queues.claim_round(self.settings.node_id, lock_s)
        # Since the last reply, or (a first round) since this call was sent: a first round
        # blocked by an outage must not judge the nodes whose records expired meanwhile either.
        now = self._replied(asked if self._last_reply is None else self._last_reply)
        if not won or now < self._judge_after:
            return {}
        nodes = self.store.live_nodes(include_draining=True)
        if self._replied(now) < self._judge_after:  # the outage began between the two calls
            return {}
        alive = {n.id: n.instance for n in nodes}
        # A worker that was frozen (SIGSTOP, a long pause) may reap before its own heartbeat
        # is back: it is alive, whatever its expired record says.
        alive[self.settings.node_id] = self.instance
        counts = self._reap(alive)
        gone = self.sweeper.gone_long(self.store.gone_nodes(alive))
        more: dict[str, int] = {"pinned_failed": sum(self.sweeper.bury(n) for n in gone)}
        if counts["requeued"] or counts["loads_failed"]:
            self.sweeper.lost_worker()
        due = self.sweeper.due()
        for found in (self.sweeper.rescue_taken(),
                      self.sweeper.sweep(due, [n for n in nodes if not n.draining]) if due else {}):
            for key, value in found.items():
                more[key] = more.get(key, 0) + value
        counts.update({k: v for k, v in more.items() if v})  # the stranded-queue part, when it acted
        try:  # batches that need a step nobody is taking (workers/jobs/batch_watch.py)
            watch_batches(self.store, self.dispatcher, self.settings.node_queue, self.settings.stranded_s)
        except Exception:
            log.exception("reaper: looking at the batches failed")
        if any(counts.values()):
            log.warning("reaper: %s", counts)
        return counts

    def _replied(self, since: float) -> float:
        """Note that Redis just answered; returns now (monotonic seconds). If it had not
        answered since ``since`` for longer than a round and a heartbeat interval (a restart, an
        outage, or this process frozen), node records may have expired only because nobody
        could refresh them: judge no node until every live one has had a TTL (and a retry
        backoff) to beat again."""
        now = time.monotonic()
        if now - since > self.settings.reaper_interval_s + self.settings.node_ttl_s / 3:
            self._judge_after = now + self.settings.node_ttl_s + 1.0
            log.warning("reaper: Redis did not answer for %.1fs; no node is judged lost for %.1fs",
                        now - since, self._judge_after - now)
        self._last_reply = now
        return now

    def take_over(self, previous: list[str]) -> dict[str, int]:
        """This worker came back under a node id that still had state: hand its predecessor's
        running jobs and loads back for routing, and sweep the queues of the ``previous``
        models it held (they stay marked, so the reaper sweeps them again ``stranded_s``
        later for jobs routed on the stale state meanwhile)."""
        self.sweeper.lost_worker()  # the predecessor may have taken messages it never started
        counts = self._reap({self.settings.node_id: self.instance}, only=self.settings.node_id)
        if previous:
            entries = [(m, 0.0) for m in previous]
            counts.update(self.sweeper.sweep(entries, self.store.live_nodes(), keep=True))
        return counts

    def _reap(self, alive: dict[str, str], only: str | None = None) -> dict[str, int]:
        def lost(job: JobRecord) -> bool:  # its node is gone, or came back as a new process
            if only is not None and job.node != only:
                return False
            return job.node not in alive or bool(job.runner and alive[job.node] and job.runner != alive[job.node])

        counts = {"requeued": 0, "failed": 0, "skipped": 0, "loads_failed": 0}
        ids = self.store.inflight_ids()
        records = self.store.jobs(ids)
        self.store.forget_inflight([i for i in ids if i not in records or records[i].status != "running"])
        for job in records.values():
            if job.status == "running" and lost(job):
                how = requeue(self.store, self.dispatcher, job, f"node {job.node} was lost while running the job",
                              self.settings.job_max_attempts)
                counts[how] += 1
        for op in self.store.active_ops():
            if op.node is None or not lost(op):
                continue
            message = f"node {op.node} was lost during the {op.kind}"
            if self.store.fail(op.id, ErrorCode.NODE_LOST, message).applied:
                counts["loads_failed"] += 1
            if op.kind == "load":
                self.store.release_load(op.node, op.model, op.id)
                self.store.delete_model_state(op.node, op.model)
                for waiter_id in self.store.pop_waiters(op.id):
                    waiter = self.store.get_job(waiter_id)
                    if waiter is not None and not waiter.terminal:
                        counts[requeue(self.store, self.dispatcher, waiter, message,
                                       self.settings.job_max_attempts + 1)] += 1
        return counts
