"""The Celery tasks: load, unload, inference (and a no-op for the benchmark baseline).

Every task takes a job id only; the job record in Redis is the truth. A message for a job
that is already terminal (cancelled while queued, or a duplicate) does nothing.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, shared_task

from tasks.errors import ErrorCode, JobFailed, ModelbayError
from tasks.modelstats import RECORDER
from tasks.names import TASK_INFER, TASK_LOAD, TASK_NOOP, TASK_UNLOAD
from tasks.schemas import JobErrorInfo, JobRecord
from tasks.webhooks import job_ended
from workers import metrics
from workers.jobs.inference import RUNNERS, STARTS_RUNNING, Delivery, NotRunning
from workers.progress.debounce import job_progress_sink
from workers.node.models import Entry, LoadFailed, NotHere, Unloaded
from workers.node.taker import Taken
from workers.runtime import Runtime, runtime_of
from workers.supervisor.calls import BackendCallError, BackendCancelled

log = logging.getLogger("modelbay.worker")

MAX_REROUTES = 5


@shared_task(name=TASK_NOOP)
def noop() -> None:
    """Does nothing: ``bench/`` measures raw Celery round trips with it."""


@shared_task(name=TASK_LOAD, bind=True)
def load(self: Task, job_id: str) -> None:
    """Load a model on this node. Not cancellable by any client action (architecture §2)."""
    rt = runtime_of(self)
    change = rt.store.transition(job_id, "loading", allowed_from=("queued",), runner=rt.instance)
    if not change.applied or change.record is None:
        return
    job = change.record
    manifest = rt.store.get_manifest(job.model)
    op = rt.live.operation(job_id, "staging" if manifest and manifest.files else "loading", job.model, job_id)
    record_sink = job_progress_sink(rt.store, job_id, rt.settings.progress_interval_s)

    def sink(event: str, fields: dict[str, Any]) -> None:
        record_sink(event, fields)
        op.update(event, fields)

    try:
        if manifest is None:
            raise LoadFailed(ErrorCode.MODEL_NOT_FOUND, f"model {job.model!r} is no longer in the catalog")
        if not manifest.files:  # with files, staging sends the operation's "start"
            op.update("start", {"message": f"loading {job.model} on {rt.settings.node_id}"})
        try:
            result = rt.manager.load(job, manifest, sink)
        except LoadFailed:
            raise
        except Exception as exc:  # a bug must not leave the load (and its waiters) hanging
            log.exception("load %s of %s crashed", job_id, job.model)
            raise LoadFailed(ErrorCode.INTERNAL_ERROR, f"the load failed unexpectedly: {exc}") from exc
    except LoadFailed as exc:
        # The cooldown first (a client that sees the failure and retries at once meets it),
        # then the record, then the live op: a poll in between never shows a regression.
        status = "cancelled" if isinstance(exc, Unloaded) else "failed"
        if status == "failed":
            cooldown_s = rt.store.note_load_failure(job.model, exc.message)
            log.info("load %s of %s failed (%s); new loads wait %gs", job_id, job.model, exc.message, cooldown_s)
        rt.store.finish(job_id, status, error=JobErrorInfo(type=exc.code, message=exc.message))
        if status == "cancelled":
            op.done()  # an unload ended it: its row goes at once, on every replica (no error to show)
        else:
            op.fail(exc.message)
        _fail_waiters(rt, job, exc)
    else:
        rt.store.finish(job_id, "succeeded", result=result)
        op.done()
        rt.store.clear_cooldown(job.model)
        for waiter in rt.store.pop_waiters(job_id):
            rt.store.transition(waiter, "queued", allowed_from=("loading",))
        log.info("load %s of %s succeeded on %s", job_id, job.model, job.node)
    finally:
        rt.store.release_load(job.node or rt.settings.node_id, job.model, job_id)
        metrics.job_ended(rt.store.get_job(job_id))


def _fail_waiters(rt: Runtime, load_job: JobRecord, exc: LoadFailed) -> None:
    for waiter in rt.store.pop_waiters(load_job.id):
        _announce(rt, rt.store.fail(waiter, exc.code, f"model load failed: {exc.message}").record)


def _announce(rt: Runtime, record: JobRecord | None) -> None:
    """A job ended here: its webhook (if any) is due now. No round trip without one."""
    if record is None or record.webhook is None or not record.terminal:
        return
    if rt.settings.webhook_test_hold_s:  # tests: a window in which to kill this worker
        time.sleep(rt.settings.webhook_test_hold_s)
    job_ended(rt.store.webhooks, record)


@shared_task(name=TASK_UNLOAD, bind=True)
def unload(self: Task, job_id: str) -> None:
    rt = runtime_of(self)
    change = rt.store.transition(job_id, "running", allowed_from=("queued",))
    if not change.applied or change.record is None:
        return
    op = rt.live.operation(job_id, "unloading", change.record.model, job_id)
    op.update("start", {"message": f"unloading {change.record.model} on {rt.settings.node_id}"})
    try:
        how = rt.manager.unload(change.record.model)
    except Exception as exc:  # the job must end, whatever happened
        log.exception("unload %s of %s crashed", job_id, change.record.model)
        rt.store.fail(job_id, ErrorCode.INTERNAL_ERROR, f"the unload failed unexpectedly: {exc}")
        op.fail(str(exc))
        return
    rt.store.finish(job_id, "succeeded", result={"node": rt.settings.node_id, "stopped": how})
    op.done()
    metrics.job_ended(rt.store.get_job(job_id))


@shared_task(name=TASK_INFER, bind=True)
def infer(self: Task, job_id: str, reroutes: int = 0, route: int | None = None, record: str | None = None,
          taken: Taken | None = None) -> None:
    """Run one inference job on the model held here. Cancellable: the cancel watcher
    cancels the gRPC call when the job turns ``cancelled``, and the backend stops.

    ``route`` is the job's ``routed`` count when this message was sent: a message of a job
    routed again since (a stranded queue swept, a requeue) does nothing. ``record``: the
    job's record as read when its message was taken, or as queued when the message carried
    it; ``taken``: the message's bookkeeping, made or acknowledged by the job's own writes
    where they can (both workers/node/taker.py; never sent)."""
    rt = runtime_of(self)
    got = (JobRecord.model_validate_json(record), record) if record else rt.store.get_job_raw(job_id)
    if got is None:
        return
    job, raw = got
    if job.terminal or (route is not None and route != job.routed):
        return
    if taken is not None and job.task in STARTS_RUNNING:  # its move waits for the backend call
        taken.record()
    try:
        entry = rt.manager.acquire(job.model, lambda: rt.cancels.is_cancelled(job_id))
    except (NotHere, LoadFailed) as exc:
        if taken is not None:  # no move to running will record it
            taken.record()
        if isinstance(exc, LoadFailed):
            _announce(rt, rt.store.fail(job_id, exc.code, f"model load failed: {exc.message}").record)
        else:
            _reroute(rt, job, reroutes)
        return
    running = _Running(rt, job, raw, route, taken)
    try:
        final: JobRecord | None = None
        began = time.monotonic()
        try:
            final = _run(rt, job, entry, reroutes, running, taken)
        finally:  # the final record of a success is at hand; others are read back
            if running.record is not None:  # it ran here (else it was cancelled or is another's)
                RECORDER.note(job.model, (time.monotonic() - began) * 1000)  # flushed with the heartbeat
                final = final if final is not None else rt.store.get_job(job_id)
                metrics.job_ended(final)
                _announce(rt, final)
    finally:
        rt.manager.release(entry)


class _Running:
    """The job's move to ``running`` on this node: one compare-and-set from ``queued`` or
    ``loading``, only while the job is still on the route this message carried. Made when
    the runner's backend call is on its way (workers/jobs/inference.py), or before a runner
    that makes none. It records the taken message (``taken``) in the same round trip, if
    nothing did yet. ``record``/``raw``: the running record, once moved."""

    def __init__(self, rt: Runtime, job: JobRecord, raw: str, route: int | None, taken: Taken | None) -> None:
        self.rt, self.job, self.raw_read, self.route, self.taken = rt, job, raw, route, taken
        self.record: JobRecord | None = None
        self.raw: str | None = None

    def __call__(self) -> bool:
        rt, route = self.rt, self.route
        change = rt.store.transition(self.job.id, "running", allowed_from=("queued", "loading"),
                                     when=lambda r: route is None or r.routed == route,
                                     node=rt.settings.node_id, attempts=self.job.attempts + 1, runner=rt.instance,
                                     known=self.raw_read, note=self.taken.claim() if self.taken else None)
        if not change.applied or change.record is None:
            return False
        self.record, self.raw = change.record, change.raw
        return True


def _reroute(rt: Runtime, job: JobRecord, reroutes: int) -> None:
    """The model is not here (unloaded or lost after the message was routed): route the job
    again, at most ``MAX_REROUTES`` times (the count travels in the message)."""
    if rt.cancels.is_cancelled(job.id):
        return
    manifest = rt.store.get_manifest(job.model)
    if manifest is None or reroutes >= MAX_REROUTES:
        reason = "not in the catalog" if manifest is None else "not available after several tries"
        _announce(rt, rt.store.fail(job.id, ErrorCode.MODEL_UNAVAILABLE, f"model {job.model!r} is {reason}").record)
        return
    try:
        rt.dispatcher.route(job, manifest, reroutes=reroutes + 1)
    except ModelbayError as exc:  # no node, a cooldown, the pinned node gone...
        _announce(rt, rt.store.fail(job.id, exc.code, str(exc)).record)
    except Exception as exc:
        _announce(rt, rt.store.fail(job.id, ErrorCode.MODEL_UNAVAILABLE, str(exc)).record)


def _run(rt: Runtime, job: JobRecord, entry: Entry, reroutes: int, running: _Running,
         taken: Taken | None) -> JobRecord | None:
    """Run the job and write its end, if it moved to ``running`` here (``running``); its
    final record when it succeeded (None on the other paths). The write of a success
    acknowledges the taken message (``taken``) in the same round trip."""
    delivery = Delivery(running)
    if job.task not in STARTS_RUNNING:
        if not delivery.began():
            return None
        job = running.record or job
    try:
        result = RUNNERS[job.task or ""](rt, job, entry.proc, delivery)
    except (NotRunning, BackendCancelled):
        return None  # the job is another's, or already ``cancelled`` in the store
    except BackendCallError as exc:
        if not delivery.began() or running.record is None or rt.cancels.is_cancelled(job.id):
            return None
        if entry.crashed:
            _after_crash(rt, running.record, delivery, reroutes,
                         entry.proc.exit_reason if entry.proc is not None else None)
            return None
        code, message = exc.job_code, str(exc)  # the code its gRPC status gives (GRPC_ERROR_CODES)
        if code is ErrorCode.UNSUPPORTED_TASK:
            message = f"backend {entry.manifest.backend!r} of {job.model!r} does not support task {job.task!r}"
        rt.store.fail(job.id, code, message)
        return None
    except JobFailed as exc:
        if delivery.began():
            rt.store.fail(job.id, exc.code, str(exc))
        return None
    except Exception as exc:  # a bug must not leave the job running forever
        log.exception("job %s crashed", job.id)
        if delivery.began():
            rt.store.fail(job.id, ErrorCode.INTERNAL_ERROR, f"the job failed unexpectedly: {exc}")
        return None
    if not delivery.began():
        return None
    change = rt.store.finish(job.id, "succeeded", result=result, known=running.raw,
                             ack=taken.ack_tag() if taken is not None else "")
    if change.applied and taken is not None:
        taken.acked = True
    return change.record


def _after_crash(rt: Runtime, job: JobRecord, delivery: Delivery, reroutes: int, exit_reason: str | None = None) -> None:
    """The backend died under the job: retry it once if it produced nothing yet (its model
    loads again), else fail it with ``backend_crashed``."""
    if delivery.pieces == 0 and job.attempts < 2:
        log.warning("backend of %s crashed before job %s produced output; retrying", job.model, job.id)
        change = rt.store.transition(job.id, "queued", allowed_from=("running",))
        if change.applied and change.record is not None:
            _reroute(rt, change.record, reroutes)
        return
    rt.store.fail(job.id, ErrorCode.BACKEND_CRASHED,
                  f"the backend process of {job.model!r} {exit_reason or 'exited'} "
                  f"(during the job, after {delivery.pieces} token(s)); the next request loads the model again")
