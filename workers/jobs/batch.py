"""A batch's steps on the workers (:mod:`tasks.batches` has the records and the states).

``modelbay.batch.advance`` (one task, sent to a node's queue) does whatever the batch needs next,
under a lease so that one worker at a time advances it:

- ``validating``: read the input file once (streamed): every line must be JSON with a new
  ``custom_id``, method POST, the batch's ``url`` and a registered ``model``; the lines are
  grouped by model into chunks of up to ``batch_chunk_lines`` (``batches/<id>/in/<n>.jsonl``). A
  bad line fails the whole batch (``errors.data``: code, message, line). Else the batch goes
  ``in_progress`` and each chunk becomes an inference job of task ``batch`` on its model
  (:mod:`workers.jobs.batch_chunk`), placed and loaded as any job;
- every chunk done (or its job ended): ``finalizing``, then the parts are joined, streamed, into
  the output and error files (purpose ``batch_output``) and the batch is ``completed``;
- ``cancelling``, or past ``expires_at``: the chunk jobs are cancelled (the cancel path of jobs
  stops the running ones), running chunks get ``batch_cancel_grace_s`` to write what they did,
  and the batch is finalized as ``cancelled``/``expired``; lines that did not run are in the
  error file as ``batch_cancelled``/``batch_expired``.

The web sends the first ``advance``; the last chunk to finish sends one; and the reaper's round
(:func:`workers.jobs.batch_watch.watch`) sends one for any batch that needs a step and has no
lease (a worker that died while advancing it, a chunk job that failed without running, expiry).

Chunk messages go with a low priority (:func:`tasks.batches.chunk_route`): on a model's queue a
waiting interactive job, or a synchronous OpenAI call, is always taken before any chunk.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

from celery import Task, shared_task

from tasks.backends import check_task
from tasks.batches import (BATCH_CANCELLED, BATCH_EXPIRED, ENDPOINTS, FINAL, BatchRecord, ChunkDone, batch_prefix,
                           error_line, new_chunk_job_id, part_key, tally)
from tasks.errors import ModelbayError
from tasks.files import save_file
from tasks.names import TASK_BATCH_ADVANCE
from tasks.schemas import JobRecord
from workers import metrics
from workers.jobs.batch_chunk import run_chunk
from workers.jobs.batch_files import filestore
from workers.jobs.batch_split import split
from workers.jobs.batch_watch import pending_chunks
from workers.jobs.inference import RUNNERS
from workers.runtime import Runtime, runtime_of

log = logging.getLogger("modelbay.worker")

LEASE_S = 60
RUNNERS["batch"] = run_chunk  # a chunk job runs as an inference job of task "batch"


@shared_task(name=TASK_BATCH_ADVANCE, bind=True)
def advance(self: Task, batch_id: str) -> None:
    """Do the batch's next step (see the module), if no other worker is doing one."""
    rt = runtime_of(self)
    holder = f"{rt.instance}:{threading.get_ident()}"
    if not rt.store.batches.lease(batch_id, holder, LEASE_S):
        return
    try:
        _step(rt, batch_id, holder)
    except Exception:
        log.exception("batch %s: advancing failed (the reaper's round tries again)", batch_id)
    finally:
        rt.store.batches.release(batch_id, holder)


def _step(rt: Runtime, batch_id: str, holder: str) -> None:
    batches = rt.store.batches
    batch = batches.get(batch_id)
    if batch is None or batch.status in FINAL:
        return
    if batch.status == "validating":
        batch = split(rt, batch, holder)
        if batch is None or batch.status in FINAL:
            return
        if batch.status == "in_progress":
            _route_chunks(rt, batch)
            return
    if batch.status == "in_progress" and time.time() >= batch.expires_at_s:
        batch = batches.move(batch_id, "finalizing", allowed_from=("in_progress",), ending="expired") or batch
    if batch.status == "in_progress":
        _route_chunks(rt, batch)
        if not settled(rt, batch):
            return
        batch = batches.move(batch_id, "finalizing", allowed_from=("in_progress",)) or batch
    if batch.status == "cancelling" or batch.ending:
        _stop_chunks(rt, batch, holder)
    if batch.status in ("finalizing", "cancelling"):
        finalize(rt, batch)


def settled(rt: Runtime, batch: BatchRecord) -> bool:
    """Every chunk is marked done, or its job ended without running to the end."""
    done, records, missing = pending_chunks(rt.store, batch)
    return done >= batch.chunks or (missing == 0 and all(r.terminal for r in records.values()))


def _route_chunks(rt: Runtime, batch: BatchRecord) -> None:
    """Make each chunk's job and route it to its model (chunks that have a job are left)."""
    have = rt.store.batches.chunk_jobs(batch.id)
    for index in range(batch.chunks):
        if index in have:
            continue
        current = rt.store.batches.get(batch.id)
        if current is None or current.status != "in_progress" or rt.store.batches.closed(batch.id):
            return  # cancelled or expired meanwhile: no more chunks
        model = batch.models[batch.chunk_models[index]]
        job_id = rt.store.batches.claim_chunk(batch.id, index, new_chunk_job_id())
        record = JobRecord(id=job_id, kind="inference", model=model, task="batch",
                           input={"batch": batch.id, "chunk": index})
        manifest = rt.store.get_manifest(model)
        try:
            if manifest is None:
                raise ModelbayError(f"model {model!r} is no longer in the catalog")
            check_task(manifest.backend, ENDPOINTS[batch.endpoint], model=model, param="model")
            rt.dispatcher.route(record, manifest, create=True)
        except ModelbayError as exc:
            rt.store.create_job(record)
            rt.store.fail(job_id, exc.code, exc.message)


def _stop_chunks(rt: Runtime, batch: BatchRecord, holder: str) -> None:
    """Cancel the chunk jobs that did not end; give those that ran ``batch_cancel_grace_s``
    to write their part (their lines that did not run are answered as not run)."""
    why = "the batch expired" if batch.ending == "expired" else "the batch was cancelled"
    jobs = rt.store.batches.chunk_jobs(batch.id)
    records = rt.store.jobs(list(jobs.values()))
    running = {index for index, job_id in jobs.items()
               if (r := records.get(job_id)) is not None and r.status == "running"}
    for job_id, record in records.items():
        if not record.terminal:
            rt.store.cancel(job_id, why)
    deadline = time.monotonic() + rt.settings.batch_cancel_grace_s
    while running and time.monotonic() < deadline:
        done = rt.store.batches.done(batch.id)
        running = {i for i in running if str(i) not in done}
        rt.store.batches.lease(batch.id, holder, LEASE_S)
        time.sleep(0.1)


def finalize(rt: Runtime, batch: BatchRecord) -> None:
    """Join the parts into the output and error files and end the batch (see the module)."""
    fs = filestore(rt.settings)
    done = rt.store.batches.close(batch.id)
    jobs = rt.store.batches.chunk_jobs(batch.id)
    records = rt.store.jobs(list(jobs.values()))
    lost = {"failed": 0}

    def not_done(index: int) -> Iterator[bytes]:
        record = records.get(jobs.get(index, ""))
        if record is not None and record.status == "failed" and record.error is not None:
            code, message, outcome = record.error.type, record.error.message, "failed"
        elif batch.ending == "expired":
            code, message, outcome = BATCH_EXPIRED, "the batch expired before this request ran", "expired"
        elif batch.ending or batch.status == "cancelling":
            code, message, outcome = BATCH_CANCELLED, "the batch was cancelled before this request ran", "cancelled"
        else:
            code, message, outcome = "batch_failed", "the request did not run", "failed"
        count = 0
        for raw in fs.iter_lines(part_key(batch.id, index, "in")):
            if raw.strip():
                count += 1
                yield error_line(str(json.loads(raw).get("custom_id")), code, message)
        lost["failed"] += count if outcome == "failed" else 0
        metrics.batch_lines(outcome, count)

    def joined(kind: str) -> Iterator[bytes]:
        for index in range(batch.chunks):
            if index in done:
                yield from fs.iter_bytes(part_key(batch.id, index, "out" if kind == "out" else "err"))
            elif kind == "err":
                yield from not_done(index)

    output = _save(rt, batch, "output", joined("out"))
    errors = _save(rt, batch, "error", joined("err"))
    _end(rt, batch, done, lost["failed"], output, errors)


def _save(rt: Runtime, batch: BatchRecord, name: str, chunks: Iterator[bytes]) -> str | None:
    """Stream ``chunks`` into a new ``batch_output`` file; its id (None when it is empty)."""
    fs = filestore(rt.settings)
    obj = save_file(fs, rt.store.files, filename=f"{batch.id}_{name}.jsonl", purpose="batch_output", chunks=chunks)
    if obj.bytes == 0:
        rt.store.files.delete(obj.id)
        fs.delete(f"files/{obj.id}")
        return None
    return obj.id


def _end(rt: Runtime, batch: BatchRecord, done: dict[int, ChunkDone], lost: int, output: str | None,
         errors: str | None) -> None:
    completed, failed, usage = tally({str(k): v for k, v in done.items()})
    status = batch.ending or ("cancelled" if batch.status == "cancelling" else "completed")
    counts = {"total": batch.request_counts.total, "completed": completed, "failed": failed + lost}
    final = rt.store.batches.move(batch.id, status, allowed_from=("finalizing", "cancelling"),
                                  output_file_id=output, error_file_id=errors, request_counts=counts,
                                  usage=usage.model_dump())
    if final is not None and final.status in FINAL:
        metrics.batch_ended(final.status)
        filestore(rt.settings).delete_prefix(batch_prefix(batch.id))
        log.info("batch %s %s: %d completed, %d failed of %d", batch.id, final.status, completed,
                 failed + lost, batch.request_counts.total)
