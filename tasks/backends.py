"""The backends modelbay knows, as part of the contract: for each backend name, the tasks it
does, the LoadModel options its backend process reads (manifest ``options``), and the Python
package and pip extra it needs.

web/ checks manifests and jobs against this registry (a typo in a backend or option name, a
task the backend cannot do: 400 at once, nothing stored or queued); workers/ offers the
backends whose package is installed (``MODELBAY_BACKENDS=auto``). Each backend module
``workers.backends.<name with _ for ->`` reads exactly the options listed here
(``tests/test_registration.py`` parses the modules and compares).
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import get_args

from tasks.errors import ErrorCode, InvalidRequest
from tasks.schemas import Manifest, TaskName, manifest_device

TASK_NAMES: tuple[TaskName, ...] = get_args(TaskName)


@dataclass(frozen=True)
class Backend:
    """One backend: ``name`` as manifests spell it, the ``tasks`` it does, the LoadModel
    ``options`` it reads, and the importable ``package`` and pip ``extra`` it needs (both
    None for a backend that needs nothing beyond modelbay itself)."""

    name: str
    tasks: tuple[TaskName, ...]
    options: frozenset[str]
    package: str | None = None
    extra: str | None = None

    @property
    def module(self) -> str:
        """The module the worker runs as the backend process (``python -m <module>``)."""
        return f"workers.backends.{self.name.replace('-', '_')}"


_ALL: tuple[Backend, ...] = (
    # Seconds for the delays; memory_mb is MiB; dim is floats per vector; fail_load and
    # crash_at ("warmup" or "generate": the process dies of SIGSEGV there) are test hooks.
    Backend("echo", ("embed", "generate", "chat"),
            frozenset({"load_delay_s", "token_delay_s", "dim", "fail_load", "memory_mb", "crash_at", "refuse_text",
                       "embed_delay_s"})),
    # max_batch_size in texts, max_batch_delay_ms in milliseconds, max_seq_length in tokens.
    Backend("sentence-transformers", ("embed",),
            frozenset({"max_batch_size", "max_batch_delay_ms", "normalize", "device", "dtype", "max_seq_length",
                       "path", "gpu_count"}),
            package="sentence_transformers", extra="embeddings"),
    # n_ctx and n_batch in tokens, n_gpu_layers in layers; repack: bool, absent = automatic.
    # gpu_count: GPUs one model spans; tensor_split: a proportion per GPU (docs/gpu.md).
    Backend("llama-cpp", ("generate", "chat"),
            frozenset({"file", "n_ctx", "n_gpu_layers", "n_threads", "n_batch", "chat_format", "seed", "repack",
                       "gpu_count", "tensor_split"}),
            package="llama_cpp", extra="llama"),
    Backend("diffusers", ("image",), frozenset({"path", "dtype", "device", "gpu_count"}),
            package="diffusers", extra="images"),
)

BACKENDS: Mapping[str, Backend] = {b.name: b for b in _ALL}
"""Backend name → :class:`Backend`, in the order error messages list them."""

# Backend name → (the Python package it needs, the pip extra that installs it); echo needs
# nothing (placement names them when no node can run a backend).
BACKEND_EXTRAS: Mapping[str, tuple[str, str]] = {
    b.name: (b.package, b.extra) for b in _ALL if b.package is not None and b.extra is not None}


def _closest(word: str, choices: list[str]) -> str:
    """"; did you mean 'x'?" for the closest of ``choices``, or "." when none is close."""
    match = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {match[0]!r}?" if match else "."


def backend(name: str) -> Backend:
    """The backend called ``name``; :class:`InvalidRequest` ``unknown_backend`` (param
    ``backend``) naming the known backends and the closest match when there is none."""
    found = BACKENDS.get(name)
    if found is None:
        raise InvalidRequest(f"unknown backend {name!r}{_closest(name, list(BACKENDS))} "
                             f"Known backends: {', '.join(BACKENDS)}",
                             param="backend", code=ErrorCode.UNKNOWN_BACKEND)
    return found


def check_backend(name: str, options: Mapping[str, object]) -> None:
    """What registration checks, raising 400 :class:`InvalidRequest`: backend ``name`` is
    known (``unknown_backend``, see :func:`backend`), and it reads every key of ``options``
    (``unknown_option``, param ``options.<key>``, naming the option, the closest known one and
    all of them)."""
    spec = backend(name)
    known = sorted(spec.options)
    for key in options:
        if key not in spec.options:
            raise InvalidRequest(f"backend {name!r} has no option {key!r}{_closest(key, known)} "
                                 f"Its options: {', '.join(known)}",
                                 param=f"options.{key}", code=ErrorCode.UNKNOWN_OPTION)


def check_device(manifest: Manifest) -> None:
    """Registration's device check: 400 ``invalid_params`` when ``manifest`` names a GPU by
    number (``cuda:1``), gives ``device`` and ``options.device`` that disagree, or an
    ``options.gpu_count`` other than its ``gpus`` (:func:`tasks.schemas.manifest_device`)."""
    _, problem = manifest_device(manifest)
    if problem is not None:
        param = "options.gpu_count" if problem.startswith("options.gpu_count") else "options.device"
        raise InvalidRequest(problem, param=param, code=ErrorCode.INVALID_PARAMS)


def check_task(name: str, task: str, *, model: str, param: str = "task") -> None:
    """Raise 400 :class:`InvalidRequest` ``unsupported_task`` (param ``param``) naming the
    backend and the tasks it does when backend ``name`` of ``model`` does not do ``task``. An
    unknown backend (a manifest stored before this registry existed) is not judged here:
    placement answers 503 ``no_node`` for it."""
    spec = BACKENDS.get(name)
    if spec is not None and task not in spec.tasks:
        raise InvalidRequest(f"model {model!r} runs on backend {name!r}, which does not do task {task!r}; "
                             f"it does: {', '.join(spec.tasks)}", param=param, code=ErrorCode.UNSUPPORTED_TASK)


@functools.lru_cache(maxsize=1)
def installed_backends() -> tuple[str, ...]:
    """The backends whose package is installed here (located with importlib, never imported),
    in registry order; echo, which needs no package, always. What ``MODELBAY_BACKENDS=auto``
    offers."""
    found: list[str] = []
    for spec in _ALL:
        if spec.package is None:
            found.append(spec.name)
            continue
        try:
            if importlib.util.find_spec(spec.package) is not None:
                found.append(spec.name)
        except (ImportError, ValueError):
            continue
    return tuple(found)
