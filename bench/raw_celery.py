"""The baseline: a bare Celery app (threads pool, Redis result backend) with a no-op task.

``celery -A bench.raw_celery worker -P threads`` runs it; the broker comes from
``BENCH_REDIS_URL``. Nothing of modelbay is involved.
"""
from __future__ import annotations

import os

from celery import Celery

url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("raw", broker=url, backend=url.rsplit("/", 1)[0] + "/1")
app.conf.update(worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
                task_acks_late=True, worker_hijack_root_logger=False)


@app.task(name="bench.noop")
def noop() -> None:
    return None
