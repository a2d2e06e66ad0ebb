"""The reaper's look at the batches (one worker per round, every ``reaper_interval_s``).

- A batch that needs a step and that no worker is advancing gets an ``advance`` on this node's
  queue: one still ``validating``, ``cancelling`` or ``finalizing`` (the worker advancing it
  died: its lease expired), or ``in_progress`` past ``expires_at``, with every chunk marked
  done, or with chunk jobs that ended without running to the end (a load that failed, a node
  lost too often) or that are still to be made.
- A chunk job ``queued`` on a model that no live node holds or is loading, for ``stranded_s``,
  is routed again (a load placed): chunk messages wait in their queue's priority list, which
  the stranded-queue sweep (:mod:`workers.node.stranded`) does not read.

Cost per round: one SMEMBERS, and per active batch its record, its lease, and while it runs
its done marks and its unfinished chunk jobs' records.
"""
from __future__ import annotations

import logging
import time

from tasks.batches import BatchRecord
from tasks.dispatch import Dispatcher
from tasks.errors import ErrorCode, ModelbayError
from tasks.names import TASK_BATCH_ADVANCE
from tasks.schemas import JobRecord
from tasks.store import Store

log = logging.getLogger("modelbay.reaper")

_stuck: dict[str, float] = {}  # chunk job id → when this process first saw it wait unheld (monotonic s)


def pending_chunks(store: Store, batch: BatchRecord) -> tuple[int, dict[str, JobRecord], int]:
    """(chunks done, the records of the chunk jobs not done, chunk jobs not found or not made)."""
    done = store.batches.done(batch.id)
    jobs = store.batches.chunk_jobs(batch.id)
    pending = [job_id for index, job_id in jobs.items() if str(index) not in done]
    records = store.jobs(pending)
    return len(done), records, (batch.chunks - len(jobs)) + (len(pending) - len(records))


def needs_step(store: Store, batch: BatchRecord, pending: tuple[int, dict[str, JobRecord], int] | None) -> bool:
    if batch.status in ("validating", "cancelling", "finalizing"):
        return True
    if batch.status != "in_progress" or pending is None:
        return False
    done, records, missing = pending
    return (time.time() >= batch.expires_at_s or done >= batch.chunks or missing > 0
            or all(r.terminal for r in records.values()))


def unstick(store: Store, dispatcher: Dispatcher, records: dict[str, JobRecord], stranded_s: float) -> int:
    """Route again the chunk jobs waiting on a model nobody holds (see the module)."""
    held: dict[str, bool] = {}
    now, moved = time.monotonic(), 0
    for job in records.values():
        if job.status != "queued":
            _stuck.pop(job.id, None)
            continue
        if job.model not in held:
            states = store.model_nodes(job.model)
            held[job.model] = any(s.state == "ready" or (s.state in ("staging", "loading")
                                                         and store.active_load(s.node, job.model) is not None)
                                  for s in states)
        if held[job.model] or now - _stuck.setdefault(job.id, now) < stranded_s:
            continue
        _stuck.pop(job.id, None)
        manifest = store.get_manifest(job.model)
        try:
            if manifest is None:
                raise ModelbayError(f"model {job.model!r} is no longer in the catalog", code=ErrorCode.MODEL_NOT_FOUND)
            dispatcher.route(job, manifest)
            moved += 1
        except ModelbayError as exc:
            store.fail(job.id, exc.code, f"its model's queue has no holder; could not route it again: {exc.message}")
    if moved:
        log.warning("batch chunks routed again (their model had no holder): %d", moved)
    return moved


def watch(store: Store, dispatcher: Dispatcher, queue: str, stranded_s: float) -> int:
    """Send ``advance`` (to ``queue``) for each batch that needs one, and route stuck chunks
    again; how many advances were sent."""
    sent = 0
    seen: set[str] = set()
    for batch_id in store.batches.active_ids():
        batch = store.batches.get(batch_id)
        if batch is None:
            continue
        pending = pending_chunks(store, batch) if batch.status == "in_progress" else None
        if pending is not None:
            seen.update(pending[1])
            unstick(store, dispatcher, pending[1], stranded_s)
        if store.batches.leased(batch_id) or not needs_step(store, batch, pending):
            continue
        dispatcher.celery.send_task(TASK_BATCH_ADVANCE, args=[batch_id], queue=queue)
        sent += 1
    for job_id in set(_stuck) - seen:  # ended, or its batch did
        _stuck.pop(job_id, None)
    return sent
