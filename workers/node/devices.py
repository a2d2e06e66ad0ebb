"""How a model's backend process meets its device: which device it asks for, the environment
and options it is started with, whether it really came up there, and the memory it is
charged after its load.

- Device: the manifest's ``device`` (or ``options.device``): "cpu" runs on the CPU (no GPU,
  ``CUDA_VISIBLE_DEVICES=""``, charged to the node's CPU budget); "cuda" or unset runs on a GPU
  the worker assigns (unset on a node without GPUs: the CPU). "cuda:N" is refused: each backend
  process sees only the GPUs it was given, as "cuda".
- Environment: ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` always; ``CUDA_VISIBLE_DEVICES`` the uuids of
  its GPUs (several for a manifest with ``gpus`` > 1), or "" on the CPU.
- Several GPUs: the backend receives the hint ``gpu_count`` (int) in its options.
- Honest device: a process given a GPU that reports a non-CUDA device fails the load with
  ``device_unavailable`` (and is stopped), unless the manifest has ``allow_cpu_fallback``.
- Accounted size after a load (:func:`accounted_mb`): the largest of the estimate (manifest
  ``memory_mb``, else the files' size: the lower bound), the backend's own report
  (LoadResponse.memory_mb) and what NVML sees the process use less its CUDA contexts.
"""
from __future__ import annotations

from typing import Any, Literal

from tasks.errors import ErrorCode
from tasks.schemas import Manifest, manifest_device
from workers.node.entry import LoadFailed

Device = Literal["cpu", "cuda"]


def device_for(manifest: Manifest, has_gpus: bool) -> Device:
    """The device a load of ``manifest`` asks for on this node. Raises :class:`LoadFailed`
    ``invalid_params`` for a "cuda:N" device, ``device_unavailable`` for "cuda" on a node
    without GPU (unless the manifest allows the CPU fallback)."""
    device, problem = manifest_device(manifest)
    if problem is not None:
        raise LoadFailed(ErrorCode.INVALID_PARAMS, problem)
    if device == "cpu":
        return "cpu"
    if has_gpus:
        return "cuda"
    if device == "cuda" and not manifest.allow_cpu_fallback:
        raise LoadFailed(ErrorCode.DEVICE_UNAVAILABLE, "the manifest asks for device 'cuda' but this node has no "
                         "usable GPU (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them); set "
                         "\"allow_cpu_fallback\": true to run it on the CPU")
    return "cpu"


def backend_env(device: str, gpus: tuple[str, ...]) -> dict[str, str]:
    """The environment a backend process on ``device`` (with GPUs ``gpus``) adds to the worker's."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(gpus) if device == "cuda" else ""}


def backend_options(manifest: Manifest, device: str, gpus: tuple[str, ...]) -> dict[str, Any]:
    """The LoadModel options: the manifest's, with ``gpu_count`` when a process spans GPUs
    (a manifest's own ``options.gpu_count`` must equal its ``gpus``: :func:`device_for`)."""
    options = dict(manifest.options)
    if device == "cuda" and len(gpus) > 1:
        options["gpu_count"] = len(gpus)
    return options


_MISSING = {
    "llama-cpp": "llama-cpp-python was built without GPU offload: install a CUDA build "
                 "(CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall llama-cpp-python)",
    "sentence-transformers": "torch in the worker's environment cannot use CUDA: a CPU-only torch wheel, or no "
                             "NVIDIA driver in the container; install a CUDA build of torch",
    "diffusers": "torch in the worker's environment cannot use CUDA: a CPU-only torch wheel, or no NVIDIA "
                 "driver in the container; install a CUDA build of torch",
}


def came_up_on_cpu(manifest: Manifest, gpus: tuple[str, ...], reported: str) -> LoadFailed | None:
    """The error for a backend given ``gpus`` that reports device ``reported``, when that is
    not CUDA and the manifest does not allow the CPU fallback; else None."""
    if reported.startswith("cuda") or manifest.allow_cpu_fallback:
        return None
    why = _MISSING.get(manifest.backend, "the backend cannot use CUDA here (its library or the driver is missing)")
    return LoadFailed(ErrorCode.DEVICE_UNAVAILABLE,
                      f"backend {manifest.backend!r} was given GPU {','.join(gpus)} but came up on "
                      f"{reported or 'an unknown device'}: {why}; or set \"allow_cpu_fallback\": true in the "
                      f"manifest to run it on the CPU")


def accounted_mb(estimate_mb: int, reported_mb: int, nvml_mb: int | None, overhead_mb: int, gpus: int) -> int:
    """The MiB a loaded model is charged (the CUDA contexts are charged apart): the largest of
    ``estimate_mb`` (the lower bound), the backend's ``reported_mb`` and ``nvml_mb`` (NVML's
    per-process usage over its ``gpus`` GPUs, less ``overhead_mb`` per GPU), when known."""
    measured = 0 if nvml_mb is None else nvml_mb - overhead_mb * gpus
    return max(estimate_mb, reported_mb, measured)
