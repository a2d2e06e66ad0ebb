"""The Celery app the worker runs: ``celery -A workers.app worker`` (``modelbay worker``).

:func:`create_app` builds it from the settings; the tasks (``workers.jobs.tasks``, shared
tasks that never import the app) are included, and :class:`workers.runtime.NodeStep` builds
this node's runtime when the worker starts. Its job threads (``worker_concurrency``) follow
the GPUs it sees (:meth:`tasks.settings.Settings.worker_threads`); ``modelbay worker`` passes
the same number as ``-c``. Celery's pool runs that many threads for the node queue (loads,
unloads, pinned jobs), and the model queues' taker as many for inference
(:mod:`workers.node.taker`).
"""
from __future__ import annotations

from celery import Celery

from tasks.batches import chunk_route
from tasks.celery_app import make_celery
from tasks.settings import Settings, load_settings
from workers.node.agent import gpus
from workers.runtime import NodeStep
from workers.webhooks import WebhookStep


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings if settings is not None else load_settings()
    app = make_celery(settings, main="modelbay-worker")
    app.conf.task_default_queue = settings.node_queue
    app.conf.worker_concurrency = settings.worker_threads(sum(1 for g in gpus() if not g.get("error")))
    app.modelbay_settings = settings  # read by NodeStep
    app.conf.include = ["workers.jobs.tasks", "workers.jobs.batch"]
    app.conf.task_routes = (chunk_route,)  # batch chunks behind every other job (tasks/batches.py)
    app.steps["worker"].add(NodeStep)
    app.steps["worker"].add(WebhookStep)  # posts the webhooks of ended jobs and batches (tasks/webhooks.py)
    return app


app = create_app()
