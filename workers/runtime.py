"""This node's runtime: everything a task needs, built once per worker process by a Celery
bootstep (:class:`NodeStep`) before the pool takes its first task, and stopped with the worker.

Tasks reach it through their app (:func:`runtime_of`), never through a module global, so
every helper that takes it is typed :class:`Runtime`.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from celery import Celery, Task, bootsteps
from celery.events.dispatcher import EventDispatcher
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from celery.worker import state as worker_state

from tasks.bus import Bus
from tasks.dispatch import Dispatcher
from tasks.settings import Settings
from tasks.store import Store
from workers import metrics
from workers.node.agent import NodeAgent, devices, memory_budget_mb
from workers.node.cancel import CancelWatcher
from workers.node.drain import Background, StopWatchdog, bounded
from workers.node.models import ModelManager
from workers.node.taker import QueueTaker
from workers.progress.live import LivePublisher
from workers.staging.stage import sweep

log = logging.getLogger("modelbay.worker")


class Runtime:
    """The model manager, the cancel watcher, the live publisher, the bus, the store and the
    dispatcher of this node; the heartbeat and the reaper once the worker is ready."""

    def __init__(self, settings: Settings, app: Celery, threads: int | None = None,
                 events: Callable[[], EventDispatcher | None] = lambda: None) -> None:
        """``threads``: the worker's job threads (its ``-c``); the model queues' taker gets as
        many. ``events``: the worker's task event dispatcher, once its consumer has one."""
        self.settings = settings
        if not settings.log_requests:  # Celery's own line per task received and per task ended
            for name in ("celery.app.trace", "celery.worker.strategy"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.store = Store.from_settings(settings, outage_s=settings.redis_outage_s)
        self.dispatcher = Dispatcher(self.store, app)
        self.devices = devices()  # NVML is asked once; the heartbeat reports the same list
        self.instance = uuid.uuid4().hex  # this worker process; jobs it runs carry it as ``runner``
        self.taker = QueueTaker(self.store.queues, app, self.instance, threads or int(app.conf.worker_concurrency or 1),
                                settings.log_requests, events, settings.taker_test_hold_s)  # the model queues' consumer
        self.manager = ModelManager(settings, self.store, memory_budget_mb(settings, self.devices),
                                    gpus=[d for d in self.devices if d["type"] == "cuda"], taker=self.taker)
        swept = sweep(settings.models_dir)  # temp files of copies a dead worker left behind
        if swept:
            log.info("removed %d stale staging temp file(s)", swept)
        self.cancels = CancelWatcher(self.store, settings.cancel_poll_s)
        self.bus = Bus(settings.nats_url, name=f"worker-{settings.node_id}").start()
        self.live = LivePublisher(settings, self.bus)
        self.background = Background(settings, self.store, self.dispatcher, self.cancels, self.instance)
        self.agent: NodeAgent | None = None
        self.stop_deadline: float | None = None  # monotonic s: SIGTERM + worker_stop_grace_s
        self.watchdog: StopWatchdog | None = None

    def ready(self, hostname: str) -> None:
        """The worker consumes: register the node, take over from a previous process with the
        same node id, start the reaper and the metrics endpoint."""
        settings = self.settings
        self.agent = NodeAgent(settings, self.store, self.manager, hostname, self.devices, self.instance)
        previous = self.agent.start()
        try:  # a node id that had state: take over from the process that held it
            taken = self.background.reaper.take_over(previous)
            if previous or any(taken.values()):
                log.warning("node %s took over from its previous process: %s", settings.node_id, taken)
        except Exception:  # the reaper does the same within a round or two
            log.exception("taking over node %s failed", settings.node_id)
        self.background.start()
        self.taker.start()
        metrics.serve(settings.worker_metrics_port, self.bus.connected.is_set)
        log.info("node %s ready as %s, consuming %s", settings.node_id, hostname, settings.node_queue)

    def shutting_down(self) -> None:
        """SIGTERM: drain (see :mod:`workers.node.drain`) while Celery waits for the running
        tasks; a :class:`~workers.node.drain.StopWatchdog` ends the process if the stop hangs."""
        settings = self.settings
        if self.stop_deadline is not None:  # a second SIGTERM: the first one's drain goes on
            return
        self.stop_deadline = time.monotonic() + settings.worker_stop_grace_s
        # The stop's own bounds (see stop()) at most: the backends, the bus, the node record.
        stop_budget_s = settings.worker_stop_grace_s + settings.backend_stop_grace_s + 1.0 + 2.0 + 1.0
        # Celery stops taking from its queues, the taker from the model queues (its blocked
        # threads are woken from a thread of their own: Redis may not answer).
        self.taker.stop_taking(wake=False)
        threading.Thread(target=self.taker.stop_taking, name="modelbay-taker-wake", daemon=True).start()
        self.watchdog = StopWatchdog(self.background.drained, settings.worker_stop_grace_s, stop_budget_s,
                                     busy=lambda: bool(worker_state.active_requests) or self.taker.busy())
        self.watchdog.start()
        threading.Thread(target=self.background.drain, args=(self.agent,), name="modelbay-drain", daemon=True).start()

    def stop(self) -> None:
        """The worker has stopped: stop every backend process and deregister the node.

        Redis and NATS may be unreachable now: the last writes go through a store that does
        not ride out an outage, and each step is :func:`~workers.node.drain.bounded` by what
        is left of the stop grace (at least ``backend_stop_grace_s`` + 1 s, so the backends
        get their SIGTERM-then-SIGKILL), so the worker exits whatever is down."""
        settings = self.settings
        if self.watchdog is not None:
            self.watchdog.stopping.set()
        # Celery waited for its tasks; the taker's end too (the drain hands back those past the grace).
        self.taker.stop_taking(wake=False)
        grace_s = (self.stop_deadline or time.monotonic()) - time.monotonic() + 1.0
        if not self.taker.join(max(1.0, grace_s)):
            log.warning("model queue jobs still running at the stop; the backends stop under them")
        self.background.stop()
        self.cancels.stop()
        quick = Store.from_settings(settings, outage_s=0.0)  # no tasks run any more: fail fast
        self.manager.store = quick
        if self.agent is not None:
            self.agent.store = quick
        deadline = self.stop_deadline or time.monotonic() + settings.worker_stop_grace_s
        floor_s = settings.backend_stop_grace_s + 1.0
        bounded(self.manager.stop_all, max(floor_s, deadline - time.monotonic()), "stopping the backends")
        self.bus.close(timeout_s=2.0)
        if self.agent is not None:
            bounded(self.agent.stop, max(1.0, deadline - time.monotonic()), "removing the node record")
        log.info("node %s stopped", settings.node_id)
        if self.watchdog is not None:
            self.watchdog.stopped.set()


class NodeStep(bootsteps.Step):
    """A worker bootstep: builds the :class:`Runtime` before the pool starts and hangs it on
    the app; its later stages follow Celery's worker signals (ready: consuming; shutting
    down: SIGTERM received; shutdown: every task has returned)."""

    def __init__(self, worker: object, **kwargs: object) -> None:
        super().__init__(worker, **kwargs)
        app = getattr(worker, "app")
        settings = getattr(app, "modelbay_settings", None)
        if not isinstance(settings, Settings):
            raise RuntimeError("NodeStep needs an app made by workers.app.create_app")
        threads = getattr(worker, "concurrency", None)
        rt = app.modelbay_runtime = Runtime(settings, app, threads if isinstance(threads, int) else None,
                                            lambda: getattr(getattr(worker, "consumer", None), "event_dispatcher", None))
        default_hostname = f"modelbay@{settings.node_id}"
        worker_ready.connect(lambda sender=None, **_: rt.ready(getattr(sender, "hostname", None) or default_hostname),
                             weak=False)
        worker_shutting_down.connect(lambda **_: rt.shutting_down(), weak=False)
        worker_shutdown.connect(lambda **_: rt.stop(), weak=False)


def runtime_of(task: Task) -> Runtime:
    """The runtime of the worker that runs ``task``."""
    rt = getattr(task.app, "modelbay_runtime", None)
    if not isinstance(rt, Runtime):
        raise RuntimeError("no node runtime: tasks run only inside a worker started from workers.app")
    return rt
