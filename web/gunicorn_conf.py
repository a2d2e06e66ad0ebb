"""gunicorn settings and hooks (``--config python:web.gunicorn_conf``): the access log
(``MODELBAY_LOG_REQUESTS``), and Prometheus multiprocess mode.

Every gunicorn worker process counts into files under one directory, and ``/metrics``
(any worker) sums them. The master makes a fresh directory when it starts (under
``MODELBAY_RUN_DIR``, unless ``PROMETHEUS_MULTIPROC_DIR`` is already set) and its forked
workers inherit it; when a worker exits its live gauges are dropped.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.settings import load_settings

ENV = "PROMETHEUS_MULTIPROC_DIR"

# One line per request on stdout, only when asked: it costs about a tenth of a small request's
# CPU (docs/benchmarks.md), and a load balancer in front logs the same.
accesslog = "-" if load_settings().log_requests else None


def on_starting(server: Any) -> None:
    if os.environ.get(ENV):
        path = Path(os.environ[ENV])
        shutil.rmtree(path, ignore_errors=True)
    else:
        base = Path(load_settings().run_dir) / "prometheus"
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"web-{os.getpid()}-", dir=base))
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
