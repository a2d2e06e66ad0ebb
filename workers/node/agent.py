"""This worker as a node: its record in Redis, refreshed by a heartbeat thread."""
from __future__ import annotations

import logging
import os
import socket
import threading

from tasks.schemas import NodeRecord, utcnow
from tasks.settings import Settings
from tasks.store import Store
from workers.node.stranded import mark_orphaned
from workers.node.models import ModelManager

log = logging.getLogger("modelbay.worker")


def gpus() -> list[dict[str, object]]:
    """The NVIDIA GPUs this process may use, from NVML (``nvidia-ml-py``), honouring
    ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs). Empty without a driver or the package."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: a CPU node
        return []
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        wanted = None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            if wanted is not None and str(index) not in wanted and uuid not in wanted:
                continue
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append({"type": "cuda", "index": index, "uuid": uuid,
                          "name": name.decode() if isinstance(name, bytes) else name,
                          "memory_total_mb": memory.total // (1024 * 1024),
                          "memory_used_mb": memory.used // (1024 * 1024)})
        return found
    finally:
        pynvml.nvmlShutdown()


def devices() -> list[dict[str, object]]:
    """The compute devices of this node: its visible GPUs, and the CPU."""
    return [*gpus(), {"type": "cpu", "cores": os.cpu_count() or 1}]


def memory_budget_mb(settings: Settings, found: list[dict[str, object]]) -> int:
    """The node's model memory budget in MiB: the sum of its GPUs' memory, else
    ``MODELBAY_NODE_MEMORY_MB``."""
    total = sum(int(d["memory_total_mb"]) for d in found if d["type"] == "cuda")  # type: ignore[call-overload]
    return total or settings.node_memory_mb


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
            backends=self.settings.backend_list, memory_budget_mb=self.manager.budget_mb,
            memory_used_mb=self.manager.memory_used_mb(),
            memory_evictable_mb=self.manager.memory_evictable_mb(), devices=self.devices,
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
                if not self.draining:
                    self.manager.expire_idle()
                    self.manager.republish()
            except Exception as exc:  # a Redis blip must not end the heartbeat for good
                log.warning("heartbeat failed: %s", exc)
