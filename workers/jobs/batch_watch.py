"""The reaper's look at the batches (one worker per round, every ``reaper_interval_s``): a batch
that needs a step and that no worker is advancing gets an ``advance`` on this node's queue.

That is a batch still ``validating``, ``cancelling`` or ``finalizing`` (the worker advancing it
died: its lease expired), or ``in_progress`` past ``expires_at``, with every chunk marked done,
or with chunk jobs that ended without running to the end (a load that failed, a node lost
too often) or that are still to be made. Cost per round: one SMEMBERS, and per active batch
its record, its lease, and the done marks and chunk jobs' records while it runs.
"""
from __future__ import annotations

import logging
import time

from celery import Celery

from tasks.batches import BatchRecord
from tasks.names import TASK_BATCH_ADVANCE
from tasks.store import Store

log = logging.getLogger("modelbay.reaper")


def needs_step(store: Store, batch: BatchRecord) -> bool:
    if batch.status in ("validating", "cancelling", "finalizing"):
        return True
    if batch.status != "in_progress":
        return False
    if time.time() >= batch.expires_at_s:
        return True
    done = store.batches.done(batch.id)
    if len(done) >= batch.chunks:
        return True
    jobs = store.batches.chunk_jobs(batch.id)
    if len(jobs) < batch.chunks:
        return True
    pending = [job_id for index, job_id in jobs.items() if str(index) not in done]
    records = store.jobs(pending)
    return len(records) < len(pending) or all(r.terminal for r in records.values())


def watch(store: Store, celery: Celery, queue: str) -> int:
    """Send ``advance`` (to ``queue``) for each batch that needs one; how many were sent."""
    sent = 0
    for batch_id in store.batches.active_ids():
        batch = store.batches.get(batch_id)
        if batch is None or store.batches.leased(batch_id) or not needs_step(store, batch):
            continue
        celery.send_task(TASK_BATCH_ADVANCE, args=[batch_id], queue=queue)
        sent += 1
    return sent
