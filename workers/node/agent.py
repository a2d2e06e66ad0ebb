"""This worker as a node: its record in Redis, refreshed by a heartbeat thread."""
from __future__ import annotations

import logging
import os
import socket
import threading

from tasks.modelstats import RECORDER
from tasks.schemas import GpuUsage, NodeRecord, utcnow
from tasks.settings import Settings
from tasks.store import Store
from workers.node import gpus as gpu_inventory
from workers.node.stranded import mark_orphaned
from workers.node.models import ModelManager
from workers.node.placement import CPU

log = logging.getLogger("modelbay.worker")


def gpus() -> list[dict[str, object]]:
    """The NVIDIA GPUs (or MIG instances) this process may use, from NVML, honouring
    ``CUDA_VISIBLE_DEVICES`` (:mod:`workers.node.gpus`), then the devices NVML could not read,
    each with its ``error`` (skipped, never fatal). Empty without a driver or the package."""
    found = gpu_inventory.inventory()
    for fault in found.faults:
        log.error("GPU %s skipped: %s", fault.index, fault.error)
    return found.devices()


def devices() -> list[dict[str, object]]:
    """The compute devices of this node: its visible GPUs (faulty ones with an ``error``), and the CPU."""
    return [*gpus(), {"type": "cpu", "cores": os.cpu_count() or 1}]


def memory_budget_mb(settings: Settings, found: list[dict[str, object]]) -> int:
    """The node's CPU model memory budget in MiB, ``MODELBAY_NODE_MEMORY_MB``: models run on
    the CPU are charged to it. Each GPU in ``found`` has its own budget (:mod:`workers.node.placement`)."""
    return settings.node_memory_mb


def memory_fields(manager: ModelManager) -> dict[str, object]:
    """The node record's memory fields, in MiB, from ``manager``'s pools (see :class:`NodeRecord`)."""
    live = [e for e in manager.entries() if e.state != "failed"]
    cpu = manager.cpu_pool.usage(e.holding() for e in live if not e.on_gpu)[CPU]
    fields: dict[str, object] = {"cpu_memory_budget_mb": cpu.budget_mb, "cpu_memory_used_mb": cpu.used_mb,
                                 "cpu_memory_evictable_mb": cpu.evictable_mb}
    pool = manager.gpu_pool
    if pool is None:
        return {**fields, "memory_budget_mb": cpu.budget_mb, "memory_used_mb": cpu.used_mb,
                "memory_evictable_mb": cpu.evictable_mb}
    use = pool.usage(e.holding() for e in live if e.on_gpu)
    rows = [GpuUsage(uuid=s.id, index=s.index, name=s.name, memory_total_mb=s.total_mb, budget_mb=use[s.id].budget_mb,
                     used_mb=use[s.id].used_mb, evictable_mb=use[s.id].evictable_mb, processes=use[s.id].processes)
            for s in pool.slots]
    return {**fields, "gpus": rows, "gpu_process_overhead_mb": pool.overhead_mb,
            "memory_budget_mb": sum(s.budget_mb for s in pool.slots),
            "memory_used_mb": sum(g.used_mb + pool.overhead_mb * g.processes for g in rows),
            "memory_evictable_mb": sum(g.evictable_mb for g in rows)}


class NodeAgent:
    """Writes the node record every ``node_ttl_s / 3`` seconds; it expires ``node_ttl_s``
    after the last beat, so a dead worker drops out of placement on its own."""

    def __init__(self, settings: Settings, store: Store, manager: ModelManager, celery_hostname: str,
                 found_devices: list[dict[str, object]], instance: str = "") -> None:
        self.settings = settings
        self.store = store
        self.manager = manager
        self.celery_hostname = celery_hostname
        self.started_at = utcnow()
        self.devices = found_devices
        self._stop = threading.Event()
        self.draining = False
        self.instance = instance
        self._thread = threading.Thread(target=self._run, name="modelbay-heartbeat", daemon=True)

    def record(self) -> NodeRecord:
        return NodeRecord(
            id=self.settings.node_id, hostname=socket.gethostname(),
            celery_hostname=self.celery_hostname, pid=os.getpid(),
            backends=self.settings.backend_list, **memory_fields(self.manager), devices=self.devices,
            device_errors=[d for d in self.devices if "error" in d],
            started_at=self.started_at, last_heartbeat=utcnow(),
            loads_in_flight=self.manager.loads_in_flight(), draining=self.draining, instance=self.instance)

    def beat(self) -> None:
        self.store.heartbeat(self.record())

    def start(self) -> list[str]:
        """Beat, and start the heartbeat. A restarted worker holds nothing: the model states
        its last life left behind are dropped, and their queues marked as maybe without a
        consumer (:mod:`workers.node.stranded`). Returns those models, for :meth:`Reaper.take_over`."""
        previous = self._withdraw_models()
        self.beat()
        self._thread.start()
        return previous

    def _withdraw_models(self) -> list[str]:
        previous = list(self.store.node_models(self.settings.node_id))
        self.store.clear_node_models(self.settings.node_id)
        mark_orphaned(self.store, previous)
        return previous

    def drain(self) -> None:
        """Stopping: placement skips this node from the next beat on, and its models are no
        longer offered (new jobs load them elsewhere); the running jobs go on."""
        self.draining = True
        self.beat()
        self._withdraw_models()
        log.info("node %s draining", self.settings.node_id)

    def stop(self) -> None:
        self._stop.set()
        self.store.remove_node(self.settings.node_id)

    def _run(self) -> None:
        interval_s = self.settings.node_ttl_s / 3
        while not self._stop.wait(interval_s):
            try:
                self.beat()
                # the jobs/s and durations of the models' jobs since the last beat (tasks.modelstats)
                self.store.flush_model_stats(self.settings.node_id, RECORDER.drain(), interval_s)
                if not self.draining:
                    self.manager.expire_idle()
                    self.manager.republish()
            except Exception as exc:  # a Redis blip must not end the heartbeat for good
                log.warning("heartbeat failed: %s", exc)
