"""The Celery app the worker runs: ``celery -A workers.app worker`` (``modelbay worker``).

It registers the tasks, and on worker start brings up this node's runtime: the model
manager, the cancel watcher and the heartbeat. On shutdown it stops every backend process
and deregisters the node.
"""
from __future__ import annotations

import logging
import threading
import uuid

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from tasks.bus import Bus
from tasks.celery_app import make_celery
from tasks.dispatch import Dispatcher
from tasks.settings import Settings, load_settings
from tasks.store import Store
from workers import metrics
from workers.node.cancel import CancelWatcher
from workers.node.drain import Background
from workers.progress.live import LivePublisher
from workers.node.agent import NodeAgent, devices, memory_budget_mb
from workers.node.models import ModelManager
from workers.staging.stage import sweep

log = logging.getLogger("modelbay.worker")

settings: Settings = load_settings()
app = make_celery(settings, main="modelbay-worker")
app.conf.task_default_queue = settings.node_queue


class Runtime:
    """Everything a task needs on this node; built once per worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings, outage_s=settings.redis_outage_s)
        self.dispatcher = Dispatcher(self.store, app)
        self.devices = devices()  # NVML is asked once; the heartbeat reports the same list
        self.manager = ModelManager(settings, self.store, app, memory_budget_mb(settings, self.devices),
                                    gpus=[d for d in self.devices if d["type"] == "cuda"])
        swept = sweep(settings.models_dir)  # temp files of copies a dead worker left behind
        if swept:
            log.info("removed %d stale staging temp file(s)", swept)
        self.cancels = CancelWatcher(self.store, settings.cancel_poll_s)
        self.bus = Bus(settings.nats_url, name=f"worker-{settings.node_id}").start()
        self.live = LivePublisher(settings, self.bus)
        self.agent: NodeAgent | None = None
        self.instance = uuid.uuid4().hex  # this worker process; jobs it runs carry it as ``runner``
        self.background: Background | None = None


_runtime: Runtime | None = None


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(settings)
    return _runtime


@worker_ready.connect
def _on_ready(sender: object = None, **_: object) -> None:
    rt = runtime()
    hostname = getattr(sender, "hostname", None) or f"modelbay@{settings.node_id}"
    rt.manager.hostname = hostname
    rt.agent = NodeAgent(settings, rt.store, rt.manager, hostname, rt.devices, rt.instance)
    previous = rt.agent.start()
    rt.background = Background(rt)
    try:  # a node id that had state: take over from the process that held it
        taken = rt.background.reaper.take_over(previous)
        if previous or any(taken.values()):
            log.warning("node %s took over from its previous process: %s", settings.node_id, taken)
    except Exception:  # the reaper does the same within a round or two
        log.exception("taking over node %s failed", settings.node_id)
    rt.background.start()
    metrics.serve(settings.worker_metrics_port, rt.bus.connected.is_set)
    log.info("node %s ready as %s, consuming %s", settings.node_id, hostname, settings.node_queue)


@worker_shutting_down.connect
def _on_shutting_down(**_: object) -> None:
    """SIGTERM: drain (see :mod:`workers.node.drain`) while Celery waits for the running tasks."""
    if _runtime is not None and _runtime.background is not None:
        threading.Thread(target=_runtime.background.drain, name="modelbay-drain", daemon=True).start()


@worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    if _runtime is None:
        return
    if _runtime.background is not None:
        _runtime.background.stop()
    _runtime.cancels.stop()
    _runtime.manager.stop_all()
    _runtime.bus.close()
    if _runtime.agent is not None:
        _runtime.agent.stop()
    log.info("node %s stopped", settings.node_id)


import workers.jobs.tasks  # noqa: E402,F401  (registers the tasks on ``app``)
