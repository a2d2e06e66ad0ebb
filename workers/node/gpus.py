"""This node's GPUs, from NVML (``nvidia-ml-py``): the inventory the worker reads once at
start, and the memory NVML sees a backend process use.

- ``CUDA_VISIBLE_DEVICES`` is honoured: NVML indices (in PCI bus order, which is why every
  backend process gets ``CUDA_DEVICE_ORDER=PCI_BUS_ID``), ``GPU-…`` and ``MIG-…`` UUIDs or
  unique prefixes of them; empty (or starting with ``-1``) means no GPU.
- A GPU in MIG mode is listed as its MIG instances (each its own memory and ``MIG-`` uuid),
  never as the parent: CUDA runs a process on an instance, not on the whole GPU.
- An error reading one device skips that device and is reported (:class:`DeviceFault`); it
  never stops the worker. No driver or no package: a CPU node.

The seam for tests is :func:`read_inventory`, which takes any NVML-like object, and the
module-level :data:`open_nvml`, which tests may replace.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    """A GPU a backend process can be given: a whole GPU or a MIG instance. Memory in MiB."""

    index: int  # NVML index of the physical GPU
    uuid: str  # "GPU-…", or "MIG-…" for a MIG instance
    name: str
    memory_total_mb: int
    memory_used_mb: int
    mig_slot: int | None = None  # the instance's slot on GPU ``index``; None for a whole GPU

    def as_device(self) -> dict[str, object]:
        found: dict[str, object] = {"type": "cuda", "index": self.index, "uuid": self.uuid, "name": self.name,
                                    "memory_total_mb": self.memory_total_mb, "memory_used_mb": self.memory_used_mb}
        if self.mig_slot is not None:
            found["mig_slot"] = self.mig_slot
        return found


@dataclass(frozen=True)
class DeviceFault:
    """A device NVML could not read: skipped, and listed in the node record."""

    index: int  # -1: the device count itself failed
    error: str
    uuid: str | None = None

    def as_device(self) -> dict[str, object]:
        return {"type": "cuda", "index": self.index, "uuid": self.uuid, "error": self.error}


@dataclass
class Inventory:
    gpus: list[Gpu] = field(default_factory=list)
    faults: list[DeviceFault] = field(default_factory=list)

    def devices(self) -> list[dict[str, object]]:
        """The GPUs, then the faulty devices (each with its ``error``)."""
        return [g.as_device() for g in self.gpus] + [f.as_device() for f in self.faults]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def visible_tokens(visible: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of tokens; None when it is unset (every GPU). CUDA
    stops at the first invalid token: so does this, at ``-1`` or an empty token."""
    if visible is None:
        return None
    tokens: list[str] = []
    for token in (t.strip() for t in visible.split(",")):
        if not token or token.startswith("-"):
            break
        tokens.append(token)
    return tokens


def _is_visible(gpu: Gpu, parent_uuid: str, tokens: list[str] | None) -> bool:
    if tokens is None:
        return True
    for token in tokens:
        if token.isdigit():
            if gpu.mig_slot is None and int(token) == gpu.index:
                return True
        elif gpu.uuid.startswith(token) or (gpu.mig_slot is not None and parent_uuid.startswith(token)):
            return True
    return False


def _mig_enabled(nvml: Any, handle: object) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # NVMLError_NotSupported: a GPU without MIG
        return False
    return bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))


def _mig_instances(nvml: Any, handle: object, index: int, name: str) -> list[Gpu]:
    found = []
    for slot in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except Exception:  # NVMLError_NotFound: an empty slot
            continue
        memory = nvml.nvmlDeviceGetMemoryInfo(mig)
        found.append(Gpu(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(mig)), name=f"{name} MIG {slot}",
                         memory_total_mb=int(memory.total) // MIB, memory_used_mb=int(memory.used) // MIB,
                         mig_slot=slot))
    return found


def _read_device(nvml: Any, index: int) -> tuple[str, list[Gpu]]:
    """The parent uuid and the GPUs (one, or its MIG instances) of NVML device ``index``."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    name = _text(nvml.nvmlDeviceGetName(handle))
    if _mig_enabled(nvml, handle):
        return uuid, _mig_instances(nvml, handle, index, name)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return uuid, [Gpu(index=index, uuid=uuid, name=name, memory_total_mb=int(memory.total) // MIB,
                      memory_used_mb=int(memory.used) // MIB)]


def read_inventory(nvml: Any, visible: str | None) -> Inventory:
    """The GPUs ``nvml`` (an initialised ``pynvml``, or a fake) shows, limited to ``visible``
    (a ``CUDA_VISIBLE_DEVICES`` value, or None)."""
    tokens = visible_tokens(visible)
    inventory = Inventory()
    if tokens == []:
        return inventory
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:
        inventory.faults.append(DeviceFault(index=-1, error=_error(exc)))
        return inventory
    for index in range(count):
        try:
            parent, gpus = _read_device(nvml, index)
        except Exception as exc:  # a lost GPU, no permission: skip it, say so
            if tokens is None or str(index) in tokens or not all(t.isdigit() for t in tokens):
                inventory.faults.append(DeviceFault(index=index, error=_error(exc)))
            continue
        inventory.gpus.extend(g for g in gpus if _is_visible(g, parent, tokens))
    return inventory


def _open_pynvml() -> Any | None:
    """``pynvml``, initialised; None without the package or a driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: a CPU node
        return None
    return pynvml


open_nvml: Callable[[], Any | None] = _open_pynvml
"""Opens NVML (tests replace it with a fake); the caller shuts it down."""


def inventory() -> Inventory:
    """This process's GPUs (see the module's rules); empty on a CPU node."""
    nvml = open_nvml()
    if nvml is None:
        return Inventory()
    try:
        return read_inventory(nvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting NVML down must not lose the inventory
            pass


def process_memory_mb(uuids: tuple[str, ...], pid: int | None) -> int | None:
    """MiB NVML sees process ``pid`` use on the GPUs ``uuids`` (CUDA context included), from
    ``nvmlDeviceGetComputeRunningProcesses``; None when NVML cannot tell (no NVML, the pid not
    listed: in a container without the host's PID namespace NVML shows host pids)."""
    if not uuids or pid is None:
        return None
    nvml = open_nvml()
    if nvml is None:
        return None
    try:
        total, seen = 0, False
        for uuid in uuids:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = getattr(proc, "usedGpuMemory", None)
                if proc.pid == pid and used is not None:
                    total, seen = total + int(used) // MIB, True
        return total if seen else None
    except Exception:  # NVML could not tell: the backend's own report stands
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # as above
            pass
