"""This worker as a node: its record in Redis, refreshed by a heartbeat thread."""
from __future__ import annotations

import logging
import os
import socket
import threading

from tasks.schemas import NodeRecord, utcnow
from tasks.settings import Settings
from tasks.store import Store
from workers.runtime import ModelManager

log = logging.getLogger("modelbay.worker")


def devices() -> list[dict[str, object]]:
    """The compute devices of this node (GPU discovery through NVML comes with eviction)."""
    return [{"type": "cpu", "cores": os.cpu_count() or 1}]


class NodeAgent:
    """Writes the node record every ``node_ttl_s / 3`` seconds; it expires ``node_ttl_s``
    after the last beat, so a dead worker drops out of placement on its own."""

    def __init__(self, settings: Settings, store: Store, manager: ModelManager, celery_hostname: str) -> None:
        self.settings = settings
        self.store = store
        self.manager = manager
        self.celery_hostname = celery_hostname
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelbay-heartbeat", daemon=True)

    def record(self) -> NodeRecord:
        return NodeRecord(
            id=self.settings.node_id, hostname=socket.gethostname(),
            celery_hostname=self.celery_hostname, pid=os.getpid(),
            backends=self.settings.backend_list, memory_budget_mb=self.settings.node_memory_mb,
            memory_used_mb=self.manager.memory_used_mb(), devices=devices(),
            started_at=self.started_at, last_heartbeat=utcnow(),
            loads_in_flight=self.manager.loads_in_flight())

    def beat(self) -> None:
        self.store.heartbeat(self.record())

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.store.remove_node(self.settings.node_id)

    def _run(self) -> None:
        interval_s = self.settings.node_ttl_s / 3
        while not self._stop.wait(interval_s):
            try:
                self.beat()
                self.manager.republish()
            except Exception as exc:  # a Redis blip must not end the heartbeat for good
                log.warning("heartbeat failed: %s", exc)
