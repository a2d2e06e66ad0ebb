"""The Celery app factory shared by web/ (sends tasks by name) and workers/ (runs them).

No result backend: job state lives in our own store (architecture §4), so ``apply_async`` never
subscribes the web process to a result channel.
"""
from __future__ import annotations

from celery import Celery

from tasks.redisconn import broker_transport, broker_transport_options, broker_url
from tasks.settings import Settings


def make_celery(settings: Settings, main: str = "modelbay") -> Celery:
    app = Celery(main, broker=broker_url(settings), set_as_current=False)
    # kombu's Redis (or Redis Sentinel) transport, surviving a Valkey restart or failover
    app.conf.broker_transport = broker_transport(settings)
    transport = {
        # Longer than the longest inference deadline, so an acked-late message that is
        # still running is not redelivered to a second worker.
        "visibility_timeout": settings.visibility_timeout_s,
        **broker_transport_options(settings),  # master_name, sentinel_kwargs, the replica wait
    }
    app.conf.update(
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_create_missing_queues=True,
        task_default_queue="modelbay.default",
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=settings.celery_events,
        task_send_sent_event=settings.celery_events,
        worker_hijack_root_logger=False,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_pool_limit=32,
    )
    return app
