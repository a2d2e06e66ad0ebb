"""Helpers the ML backends share: importing an optional library with an error that names
the pip extra, picking the torch device, and reading typed options.

Imported by backend processes only; nothing here imports torch at module level.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from workers.backends.model import InvalidParams


class MissingExtra(RuntimeError):
    """A backend's library is not installed; the message names the extra to install."""


def require(module: str, backend: str, extra: str) -> ModuleType:
    """``import module`` or raise :class:`MissingExtra`, e.g. "the llama-cpp backend needs
    llama_cpp, which is not installed: pip install 'modelbay[llama]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"the {backend} backend needs the Python package {module!r}, which is not installed "
                           f"({exc}): install the extra with pip install 'modelbay[{extra}]'") from exc


def find_model_dir(files: list[str], model_dir: str, rel: str | None, markers: Sequence[str]) -> Path:
    """The directory a library loads from: ``model_dir/rel`` when the option ``path`` is
    given (it must stay inside the model directory and hold one of ``markers``), else the
    shallowest directory among ``model_dir`` and the staged files' parents that holds one of
    ``markers`` (tried in order). Raises :class:`InvalidParams` naming what is missing."""
    want = " or ".join(markers)
    if rel is not None:
        if not model_dir:
            raise InvalidParams("path needs a model directory, and this load has none")
        base = Path(model_dir).resolve()
        found = (base / rel).resolve()
        if not found.is_relative_to(base):
            raise InvalidParams(f"path must stay inside the model directory, got {rel!r}")
        if not any((found / m).is_file() for m in markers):
            raise InvalidParams(f"path {rel!r} holds no {want}")
        return found
    candidates = {Path(f).parent for f in files} | ({Path(model_dir)} if model_dir else set())
    for marker in markers:
        hits = [d for d in candidates if (d / marker).is_file()]
        if hits:
            return min(hits, key=lambda d: (len(d.resolve().parts), str(d)))
    raise InvalidParams(f"no {want} in the model directory {model_dir!r} or beside any of its {len(files)} "
                        "file(s) (set the option path)")


def quiet_hf() -> None:
    """Hugging Face libraries offline (no hub access, ever) and without progress bars."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def torch_device(requested: str, option: Any = None) -> str:
    """The torch device to use: the manifest option ``device`` ("cpu", "cuda", "cuda:N")
    wins, then the worker's ``requested`` ("cuda"/"cpu"), else CUDA when torch sees one.
    The worker sets ``CUDA_VISIBLE_DEVICES`` per backend process, so "cuda" is the GPU it
    chose. Asking for CUDA where there is none is an :class:`InvalidParams`."""
    import torch  # backend process only

    want = option if option is not None else requested
    if want is not None and not isinstance(want, str):
        raise InvalidParams(f"device must be a string such as 'cpu' or 'cuda', got {want!r}")
    if not want:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        if option is None:  # the worker saw a GPU that torch cannot use (a CPU-only wheel)
            return "cpu"
        raise InvalidParams(f"device {want!r} was asked for but torch sees no CUDA device")
    if want != "cpu" and not want.startswith("cuda"):
        raise InvalidParams(f"device must be 'cpu', 'cuda' or 'cuda:N', got {want!r}")
    return want


def option(options: dict[str, Any], key: str, kind: type, default: Any, minimum: float | None = None,
           maximum: float | None = None) -> Any:
    """``options[key]`` checked to be of ``kind`` (bool, int, float or str; an int is
    accepted for a float) and within [minimum, maximum]; ``default`` when absent or None.
    Raises :class:`InvalidParams` naming the key."""
    value = options.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidParams(f"{key} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidParams(f"{key} must be >= {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidParams(f"{key} must be <= {maximum:g}, got {value!r}")
    return value


def cuda_memory_mb(device: str) -> int:
    """MiB torch has allocated on ``device`` (0 on CPU)."""
    import torch  # backend process only

    if not device.startswith("cuda"):
        return 0
    return int(torch.cuda.memory_allocated(torch.device(device)) // (1024 * 1024))


def limit_torch_threads(torch: Any) -> None:
    """torch's CPU threads to ``MODELBAY_BACKEND_CPUS`` when set (``modelbay up --workers N``
    sets CPUs/N), so the backend processes of several workers do not each take every CPU."""
    from tasks.settings import load_settings

    share = load_settings().backend_cpus
    if share > 0:
        torch.set_num_threads(share)
