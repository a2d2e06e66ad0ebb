"""One model on this node as the model manager holds it, and the errors of its load."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tasks.errors import ErrorCode, JobFailed
from tasks.schemas import Manifest
from workers.node.placement import CPU, Holding
from workers.supervisor.process import BackendProcess


class NotHere(Exception):
    """The model is neither ready nor loading on this node."""


class LoadFailed(JobFailed):
    """A load failed; its waiters fail with its code."""


class Unloaded(LoadFailed):
    """The model was unloaded while it loaded: the load ends ``cancelled``, not ``failed``."""

    def __init__(self, message: str = "the model was unloaded while loading") -> None:
        super().__init__(ErrorCode.UNLOADED, message)


@dataclass
class Entry:
    model: str
    manifest: Manifest
    load_job: str
    size_mb: int  # MiB: the estimate until loaded, then what it is charged (workers.node.devices)
    state: str = "loading"
    proc: BackendProcess | None = None
    in_flight: int = 0
    last_used: str | None = None
    last_used_mono: float = field(default_factory=time.monotonic)
    loaded_at: str | None = None
    error: LoadFailed | None = None
    unloading: bool = False
    crashed: bool = False
    device: str | None = None  # "cuda" or "cpu" once placement decided
    slots: tuple[str, ...] = ()  # the GPU uuids its process was given, or ("cpu",)
    settled: threading.Event = field(default_factory=threading.Event)

    @property
    def idle_evictable(self) -> bool:
        return self.state == "ready" and self.in_flight == 0 and not self.manifest.pinned and not self.unloading

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def gpu(self) -> str | None:
        """The GPU uuid(s) its process was given (comma-separated), or None on the CPU."""
        return ",".join(self.slots) if self.on_gpu and self.slots else None

    def holding(self) -> Holding:
        return Holding(model=self.model, size_mb=self.size_mb, slots=self.slots if self.on_gpu else (CPU,),
                       evictable=self.idle_evictable, unloading=self.unloading, last_used=self.last_used_mono)
