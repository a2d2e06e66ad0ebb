"""The weights' dtype of a torch backend (sentence-transformers, diffusers), chosen in one place.

The rule (:func:`choose_dtype`):

1. The manifest's ``dtype`` option ("float32", "float16", "bfloat16") always wins.
2. On the CPU: float32.
3. On a GPU that does bfloat16 (``torch.cuda.is_bf16_supported()``: Ampere, compute
   capability 8.0, and later): bfloat16. It has float32's range, so the activations that
   overflow float16 (FLUX's and T5's: NaN, black images) stay finite.
4. On an older GPU (T4, V100): float16 only when the model was saved in float16 (its
   ``config.json`` says ``torch_dtype``/``dtype`` "float16", or its safetensors weights are
   F16): its authors ran it that way. Anything else runs in float32 there.

:func:`saved_dtype` reads what a model directory was saved in, without torch.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.backends.model import InvalidParams

DTYPES = ("float32", "float16", "bfloat16")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_HEADER_MAX_BYTES = 100 * 2**20  # a safetensors header larger than this is not read


def choose_dtype(explicit: str | None, device: str, bf16_supported: bool, saved: str | None) -> str:
    """The dtype name to load with: see the module docstring. ``explicit`` is the manifest's
    option (None: choose), ``device`` the torch device ("cpu", "cuda", "cuda:N"),
    ``bf16_supported`` whether that GPU does bfloat16, ``saved`` what the model was saved in
    (:func:`saved_dtype`; None when unknown). Raises :class:`InvalidParams` for an unknown
    ``explicit``."""
    if explicit is not None:
        if explicit not in DTYPES:
            raise InvalidParams(f"dtype must be one of {', '.join(DTYPES)}, got {explicit!r}")
        return explicit
    if not device.startswith("cuda"):
        return "float32"
    if bf16_supported:
        return "bfloat16"
    return "float16" if saved == "float16" else "float32"


def bf16_supported(torch: Any, device: str) -> bool:
    """Whether the CUDA ``device`` does bfloat16 natively (compute capability 8.0 or more);
    False on the CPU."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    major, _minor = torch.cuda.get_device_capability(torch.device(device))
    return bool(major >= 8)


def saved_dtype(model_dir: Path, subdirs: Sequence[str] = ("",)) -> str | None:
    """What the model in ``model_dir`` was saved in: the first of ``subdirs`` (relative to
    it) whose ``config.json`` names ``torch_dtype`` or ``dtype``, else whose safetensors
    weights are mostly one dtype; None when nothing says."""
    for sub in subdirs:
        folder = model_dir / sub
        config = folder / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except (OSError, ValueError):
                data = {}
            named = data.get("torch_dtype") or data.get("dtype") if isinstance(data, dict) else None
            if isinstance(named, str) and named in DTYPES:
                return named
        weights = sorted(folder.glob("*.safetensors"))
        if weights:
            found = safetensors_dtype(weights[0])
            if found is not None:
                return found
    return None


def safetensors_dtype(path: Path) -> str | None:
    """The dtype most of the tensors in the safetensors file ``path`` have (from its JSON
    header: 8 bytes of little-endian length, then the header); None when unreadable or
    not a float dtype we know."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _HEADER_MAX_BYTES:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    counts = Counter(v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
    if not counts:
        return None
    return _SAFETENSORS_DTYPES.get(counts.most_common(1)[0][0])
