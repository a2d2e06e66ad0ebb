"""How the llama-cpp backend sets llama.cpp up for its machine: CPU threads, several GPUs, and
what llama.cpp printed when a load fails.

- Threads (:func:`choose_threads`): the ``n_threads`` option, else the process's share of the
  CPUs: ``MODELBAY_BACKEND_CPUS`` when set (``modelbay up --workers N`` sets CPUs/N for each
  worker), else the CPUs it may run on (``sched_getaffinity``). With every layer on the GPU
  (``n_gpu_layers`` -1) at most :data:`GPU_THREADS` of them: the GPU does the work and more
  spinning threads only take CPU from the other processes of the node.
- GPUs (:func:`gpu_split`): llama.cpp spreads the layers over every GPU the process sees
  (``CUDA_VISIBLE_DEVICES``, set by the worker: a manifest with ``gpus`` N > 1 gets N, and
  the hint ``gpu_count`` N in its options), in proportion to their free memory.
  ``tensor_split`` (a list of proportions, one per visible GPU) sets the shares instead.
  Both need a llama.cpp built with GPU offload, and layers on the GPU.
- The load's log (:func:`native_log`): llama.cpp logs through llama-cpp-python's callback to
  stderr, which ``verbose=False`` throws away, so a CUDA error used to surface only as
  "Failed to load model from file". The load runs verbose with file descriptor 2 captured;
  a failure quotes the last lines, a success drops them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from workers.backends.model import InvalidParams

GPU_THREADS = 4  # CPU threads of a model whose every layer is on the GPU
LOG_TAIL_LINES = 20


def choose_threads(explicit: int | None, cpu_share: int, affinity: int, n_gpu_layers: int) -> int:
    """``n_threads`` for llama.cpp: ``explicit`` (the option) when given, else ``cpu_share``
    (``MODELBAY_BACKEND_CPUS``, 0: unset) or ``affinity`` (the CPUs this process may run on),
    at most :data:`GPU_THREADS` when every layer is offloaded (``n_gpu_layers`` -1)."""
    if explicit is not None:
        return explicit
    share = max(1, min(cpu_share, affinity) if cpu_share > 0 else affinity)
    return min(share, GPU_THREADS) if n_gpu_layers == -1 else share


def affinity_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gpu_split(gpu_count: int, split: object, gpu_ok: bool, n_gpu_layers: int) -> dict[str, Any]:
    """The Llama keyword arguments for several GPUs (``tensor_split``), from the options
    ``gpu_count`` and ``tensor_split`` (see the module docstring); {} for one GPU or the CPU.
    Raises :class:`InvalidParams` for a bad list, or for either option where this llama.cpp
    cannot offload or no layer is offloaded."""
    if split is None and gpu_count == 1:
        return {}
    if split is not None and (not isinstance(split, list) or not split or
                              not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                                      for x in split) or not any(split)):
        raise InvalidParams(f"tensor_split must be a non-empty list of proportions >= 0, one per GPU, got {split!r}")
    if not gpu_ok:
        raise InvalidParams("tensor_split and gpu_count need llama.cpp built with GPU offload (CUDA); "
                            "this llama-cpp-python has none")
    if n_gpu_layers == 0:
        raise InvalidParams("tensor_split and gpu_count need layers on the GPU (n_gpu_layers is 0)")
    if split is not None and gpu_count > 1 and len(split) != gpu_count:
        raise InvalidParams(f"tensor_split has {len(split)} entries but gpu_count is {gpu_count}")
    return {"tensor_split": [float(x) for x in split]} if split is not None else {}


@contextlib.contextmanager
def native_log(lines: int = LOG_TAIL_LINES) -> Iterator[Callable[[], str]]:
    """Capture file descriptor 2 (native messages) and ``sys.stderr`` (llama-cpp-python's log
    callback prints there) into a temporary file while the block runs; yields a function
    returning its last ``lines`` lines."""
    sys.stderr.flush()
    saved, saved_stream = os.dup(2), sys.stderr
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        stream = open(2, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = stream

        def tail() -> str:
            stream.flush()
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            return "\n".join(text.splitlines()[-lines:])

        try:
            yield tail
        finally:
            stream.flush()
            sys.stderr = saved_stream
            stream.close()
            os.dup2(saved, 2)
            os.close(saved)


def load_verbose(lib: ModuleType, build: Callable[..., Any], **kwargs: Any) -> Any:
    """``build(verbose=True, **kwargs)`` (a Llama) with its log captured: on failure a
    RuntimeError quoting the log's last lines (an :class:`InvalidParams` passes unchanged);
    afterwards llama-cpp-python is quiet again (errors only, no timings per generation)."""
    with native_log() as tail:
        try:
            llm = build(verbose=True, **kwargs)
        except InvalidParams:
            raise
        except Exception as exc:
            said = tail()
            raise RuntimeError(f"{exc}" + (f"; llama.cpp said:\n{said}" if said else "")) from exc
        finally:
            _quiet(lib)
    llm.verbose = False
    return llm


def _quiet(lib: ModuleType) -> None:
    """llama-cpp-python's log callback back to errors only."""
    set_verbose = getattr(getattr(lib, "llama", None), "set_verbose", None)
    if set_verbose is not None:
        set_verbose(False)
