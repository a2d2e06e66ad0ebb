"""Start or stop consuming a queue on this worker at run time (architecture §9): a worker consumes
``model.<token>`` while it holds the model ready, so any holder pulls the model's next job."""
from __future__ import annotations

import logging
import time

from celery import Celery
from celery.worker import state

log = logging.getLogger("modelbay.worker")


def set_consuming(celery: Celery, hostname: str | None, queue: str, start: bool, outage_s: float) -> bool:
    """Add (``start``) or cancel the consumer of ``queue`` on the worker ``hostname`` (handled
    by that worker's own event loop). The broadcast goes through the broker: during a broker
    outage it is lost or fails, so it is sent again (backoff from 0.5 s to 5 s) until the
    worker answers, for up to ``outage_s`` seconds; a model that is ready but not consumed
    would strand its jobs. True when the worker answered.

    A worker that is stopping has stopped consuming, and its own event loop no longer
    answers: then nothing is sent (an unload during a drain must not hold the stop up)."""
    verb = "consume" if start else "cancel"
    if hostname is None:
        log.warning("worker name unknown; cannot %s %s", verb, queue)
        return False
    control = celery.control
    deadline = time.monotonic() + outage_s
    wait_s = 0.5
    while True:
        if _stopping():
            log.info("worker stopping: not asking it to %s %s", verb, queue)
            return False
        try:
            if start:
                reply = control.add_consumer(queue, exchange=queue, routing_key=queue,
                                             destination=[hostname], reply=True, timeout=5)
            else:
                reply = control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=5)
            if any(hostname in r for r in reply or []):
                log.info("%s %s: %s", verb, queue, reply)
                return True
            problem = f"no answer from {hostname}"
        except Exception as exc:  # the broker is away: try again
            problem = str(exc)
        if time.monotonic() + wait_s > deadline:
            log.error("could not %s %s: %s", verb, queue, problem)
            return False
        log.warning("%s %s: %s; retrying in %.1fs", verb, queue, problem, wait_s)
        time.sleep(wait_s)
        wait_s = min(wait_s * 2, 5.0)


def _stopping() -> bool:
    """Celery's warm or cold shutdown has begun in this process."""
    # Identity, as Celery's own state.maybe_shutdown: a warm stop sets should_stop to exit code 0.
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))
