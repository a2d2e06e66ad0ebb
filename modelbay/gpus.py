"""The GPUs of this machine and how ``modelbay up --workers N`` shares them between its workers.

Each worker gets a contiguous share of the visible GPUs through ``CUDA_VISIBLE_DEVICES``
(by UUID: NVML's index order and CUDA's may differ): with G GPUs and N workers, the first
``G % N`` workers get ``G // N + 1`` GPUs and the others ``G // N``. When N > G, workers
G+1..N get no GPU at all (``CUDA_VISIBLE_DEVICES=""``): they are CPU nodes with the CPU
memory budget, rather than a second worker budgeting a GPU that another already budgets in
full. With no GPU (G = 0) nothing is set. A worker's job threads follow its share
(:meth:`tasks.settings.Settings.worker_threads`), and with several workers each is told its
share of the CPUs (``MODELBAY_BACKEND_CPUS``) unless that is set already.

GPUs are found with NVML (``nvidia-ml-py``), guarded: no package, no driver or any NVML
error means no GPU. Standard library only otherwise (the CLI imports no ML library).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from tasks.settings import Settings, env_name

VISIBLE = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU: NVML ``index``, ``uuid`` ("GPU-..."), ``name`` and memory in MiB."""

    index: int
    uuid: str
    name: str = ""
    memory_mb: int = 0


@dataclass(frozen=True)
class WorkerPlan:
    """What ``modelbay up`` starts one worker with: its node id, job threads, extra env."""

    node_id: str
    concurrency: int
    env: dict[str, str] = field(default_factory=dict)
    gpus: tuple[Gpu, ...] = ()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_gpus(load: Callable[[], ModuleType] | None = None) -> list[Gpu]:
    """Every GPU NVML reports (all of them, whatever ``CUDA_VISIBLE_DEVICES`` says); empty
    without ``pynvml``, a driver or a GPU. ``load`` returns the pynvml module (a seam)."""
    try:
        nvml = load() if load is not None else __import__("pynvml")
        nvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU: a CPU machine
        return []
    try:
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(Gpu(index, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)),
                             int(memory.total) // 2**20))
        return found
    except Exception:  # a GPU that fails its query: treat the machine as having none we can use
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: S110 - nothing to do about a failed shutdown
            pass


def visible(found: Sequence[Gpu], environ: Mapping[str, str] | None = None) -> list[Gpu]:
    """The GPUs of ``found`` that ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, in ``environ``,
    default ``os.environ``) lets this process use, in its order; all when it is unset."""
    raw = (os.environ if environ is None else environ).get(VISIBLE)
    if raw is None:
        return list(found)
    chosen = []
    for item in (v.strip() for v in raw.split(",")):
        match = next((g for g in found if item and (item == str(g.index) or g.uuid.startswith(item))), None)
        if match is None:
            break  # CUDA stops at the first entry it cannot find
        chosen.append(match)
    return chosen


def split(gpus: Sequence[Gpu], workers: int) -> list[list[Gpu]]:
    """``workers`` contiguous shares of ``gpus`` (see the module docstring); the shares of
    workers past the GPUs are empty."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    base, extra = divmod(len(gpus), workers)
    shares, start = [], 0
    for i in range(workers):
        size = base + (1 if i < extra else 0)
        shares.append(list(gpus[start:start + size]))
        start += size
    return shares


def worker_plans(settings: Settings, workers: int, gpus: Sequence[Gpu], cpus: int,
                 environ: Mapping[str, str] | None = None) -> list[WorkerPlan]:
    """The workers ``modelbay up --workers N`` starts on a machine with the visible ``gpus``
    and ``cpus`` CPUs: node ids (``<node id>-<n>`` when more than one), job threads, and the
    env each adds: ``CUDA_VISIBLE_DEVICES`` (only when there are GPUs) and, with several
    workers, ``MODELBAY_BACKEND_CPUS`` (unless ``environ`` sets it)."""
    environ = os.environ if environ is None else environ
    plans = []
    for i, share in enumerate(split(gpus, workers), start=1):
        env: dict[str, str] = {}
        if gpus:
            env[VISIBLE] = ",".join(g.uuid for g in share)
        if workers > 1 and env_name("backend_cpus") not in environ and not settings.backend_cpus:
            env[env_name("backend_cpus")] = str(max(1, cpus // workers))
        node = f"{settings.node_id}-{i}" if workers > 1 else settings.node_id
        plans.append(WorkerPlan(node, settings.worker_threads(len(share)), env, tuple(share)))
    return plans


def machine_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
