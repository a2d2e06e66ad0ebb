"""The diffusers backend: text-to-image with a Hugging Face ``diffusers`` pipeline.

Run as ``python -m workers.backends.diffusers --socket PATH --model NAME --instance ID``.
Needs the ``images`` extra (torch, diffusers, transformers, pillow); without it LoadModel
fails with a message naming ``pip install 'modelbay[images]'``. The model's files are a
pipeline saved with ``save_pretrained`` (``model_index.json`` plus one folder per component),
loaded with ``DiffusionPipeline.from_pretrained``, so nothing is ever downloaded.

LoadModel options (``options_json``):

- ``path`` (str, default: found): the pipeline directory, relative to the model directory.
  Without it, the shallowest directory holding ``model_index.json`` among the staged files'
  directories and the model directory itself.
- ``dtype`` (str, "float32", "float16" or "bfloat16"; default: :mod:`workers.backends.dtypes`:
  float32 on the CPU, bfloat16 on a GPU that does it, else float16 only for a pipeline
  saved in float16; FLUX and T5 give NaN, black images, in float16): the weights' dtype.
- ``device`` (str, "cpu", "cuda" or "cuda:N"; default: the worker's choice, else CUDA when
  torch sees one): where the pipeline runs.
- ``gpu_count`` (int >= 1, default 1): GPUs the pipeline spreads over. Above 1 its
  components are placed over the GPUs this process sees (``device_map="balanced"``; the
  worker exposes that many through ``CUDA_VISIBLE_DEVICES``); it needs CUDA and at least
  that many visible GPUs, else the load fails naming them.

GenerateImage params (``params_json``; unknown keys are ignored):

- ``negative_prompt`` (str, default none): what the image should not show.
- ``width``, ``height`` (int, pixels, multiples of 8 in 8..2048; default the pipeline's
  native size, ``sample_size`` x VAE scale factor, else 512).
- ``steps`` (int, 1..500, default 20): denoising steps; one progress event per step.
- ``guidance`` (float, 0..50, default 7.5): classifier-free guidance scale.
- ``seed`` (int, 0..2**63-1, default random): the torch generator's seed, reported back
  with the image; the same seed and params give the same PNG on the same machine.

A cancelled call stops within one denoising step. Calls run one at a time (pipelines are
not thread-safe); a second call waits for the first. Status ``stats_json``: ``images``
(completed images), ``steps_run`` (denoising steps executed, cancelled calls included) and
``last_steps`` (steps executed by the latest call).
"""
from __future__ import annotations

import gc
import importlib
import inspect
import io
import secrets
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from workers.backends.model import BackendModel, ImageResult, InvalidParams, LoadInfo
from workers.backends.dtypes import bf16_supported, choose_dtype, saved_dtype
from workers.backends.libs import (cuda_memory_mb, find_model_dir, limit_torch_threads, option, quiet_hf,
                                   require, torch_device)
from workers.backends.server import main as base_main

BACKEND = "diffusers"
EXTRA = "images"
SAVED_DTYPE_FOLDERS = ("transformer", "unet", "text_encoder")  # the first that says decides
MAX_SEED = 2**63 - 1
LOCK_POLL_S = 0.05


class GenerationCancelled(RuntimeError):
    """Raised inside the pipeline's step callback to stop a cancelled generation."""


WARMUP_SIZE_PX = 64  # the warm-up image's width and height


class DiffusersModel(BackendModel):
    """One diffusers pipeline; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.pipe: Any = None
        self.device = "cpu"
        self.default_size = 512
        self._lock = threading.Lock()  # one pipeline call at a time
        self._stats_lock = threading.Lock()
        self._images = self._steps_run = self._last_steps = 0

    # -- load / free -------------------------------------------------------------------
    def load(self, files: list[str], model_dir: str, options: dict[str, Any], device: str) -> LoadInfo:
        path = option(options, "path", str, None)
        dtype_name = option(options, "dtype", str, None)
        choose_dtype(dtype_name, "cpu", False, None)  # an unknown dtype fails before any import
        gpu_count = option(options, "gpu_count", int, 1, 1, 64)
        quiet_hf()
        diffusers = require("diffusers", BACKEND, EXTRA)
        torch = require("torch", BACKEND, EXTRA)
        require("PIL.Image", BACKEND, EXTRA)
        target = torch_device(device, options.get("device"))
        limit_torch_threads(torch)
        _check_gpus(torch, target, gpu_count)
        pipeline_dir = find_model_dir(files, model_dir, path, ("model_index.json",))
        saved = saved_dtype(pipeline_dir, SAVED_DTYPE_FOLDERS)
        dtype = getattr(torch, choose_dtype(dtype_name, target, bf16_supported(torch, target), saved))
        _quiet_progress_bars(diffusers)
        # diffusers renamed torch_dtype to dtype (the old name warns); use what this one knows.
        new_name = hasattr(getattr(diffusers.utils, "deprecation_utils", None), "_resolve_dtype")
        kwargs: dict[str, Any] = {"dtype" if new_name else "torch_dtype": dtype}
        if gpu_count > 1:
            kwargs["device_map"] = "balanced"
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipeline_dir), **kwargs)
        if gpu_count == 1:
            pipe = pipe.to(target)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.device = pipe, target
        self.default_size = _native_size(pipe)
        if target.startswith("cuda"):
            memory_mb = sum(cuda_memory_mb(f"cuda:{i}") for i in range(gpu_count)) if gpu_count > 1 \
                else cuda_memory_mb(target)
        else:
            memory_mb = _parameter_mb(pipe, torch)
        return LoadInfo(memory_mb=max(1, memory_mb), device=target)

    def warmup(self) -> None:
        """One denoising step of a 64x64 image without guidance, decoded; not counted in stats."""
        torch = require("torch", BACKEND, EXTRA)
        with self._lock, torch.inference_mode():
            self.pipe(prompt="warm-up", width=WARMUP_SIZE_PX, height=WARMUP_SIZE_PX, num_inference_steps=1,
                      guidance_scale=1.0, generator=torch.Generator(device=self.pipe.device).manual_seed(0))

    def free(self) -> None:
        with self._lock:
            self.pipe = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch = require("torch", BACKEND, EXTRA)
            torch.cuda.empty_cache()

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"images": self._images, "steps_run": self._steps_run, "last_steps": self._last_steps}

    # -- generate ----------------------------------------------------------------------
    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        width = option(params, "width", int, self.default_size, 8, 2048)
        height = option(params, "height", int, self.default_size, 8, 2048)
        for key, value in (("width", width), ("height", height)):
            if value % 8:
                raise InvalidParams(f"{key} must be a multiple of 8, got {value}")
        seed = option(params, "seed", int, None, 0, MAX_SEED)
        return {"negative_prompt": option(params, "negative_prompt", str, None), "width": width, "height": height,
                "steps": option(params, "steps", int, 20, 1, 500),
                "guidance": option(params, "guidance", float, 7.5, 0, 50),
                "seed": secrets.randbelow(2**32) if seed is None else seed}

    def generate_image(
        self, prompt: str, params: dict[str, Any], cancelled: Callable[[], bool],
        progress: Callable[[int, int], None],
    ) -> ImageResult:
        p = self._params(params)
        torch = require("torch", BACKEND, EXTRA)
        while not self._lock.acquire(timeout=LOCK_POLL_S):  # wait for the call before us
            if cancelled():
                raise GenerationCancelled("cancelled while waiting for the pipeline")
        try:
            pipe = self.pipe
            if pipe is None:
                raise RuntimeError("the pipeline is not loaded")
            if cancelled():
                raise GenerationCancelled("cancelled before the first step")
            with self._stats_lock:
                self._last_steps = 0
            image = pipe(**self._call_kwargs(pipe, prompt, p, torch, cancelled, progress)).images[0]
        finally:
            self._lock.release()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        with self._stats_lock:
            self._images += 1
        return ImageResult(png=buf.getvalue(), width=image.width, height=image.height, seed=p["seed"])

    def _call_kwargs(self, pipe: Any, prompt: str, p: dict[str, Any], torch: Any,
                     cancelled: Callable[[], bool], progress: Callable[[int, int], None]) -> dict[str, Any]:
        """The pipeline call's arguments, with a per-step callback in whichever form this
        pipeline takes: it counts the step, reports progress and stops a cancelled call."""
        steps = p["steps"]

        def on_step(step: int) -> None:
            with self._stats_lock:
                self._steps_run += 1
                self._last_steps += 1
            total = getattr(pipe, "num_timesteps", None) or steps  # a few schedulers take more
            progress(min(step + 1, total), total)
            if cancelled():
                raise GenerationCancelled(f"cancelled after step {step + 1}")

        def on_step_end(_pipe: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(step)
            return callback_kwargs

        def legacy_callback(step: int, _timestep: Any, _latents: Any) -> None:
            on_step(step)

        kwargs: dict[str, Any] = {
            "prompt": prompt, "negative_prompt": p["negative_prompt"], "width": p["width"],
            "height": p["height"], "num_inference_steps": steps, "guidance_scale": p["guidance"],
            "generator": torch.Generator(device=pipe.device).manual_seed(p["seed"]), "output_type": "pil",
        }
        accepted = inspect.signature(pipe.__call__).parameters
        if "callback_on_step_end" in accepted:
            kwargs["callback_on_step_end"] = on_step_end
        elif "callback" in accepted:
            kwargs.update(callback=legacy_callback, callback_steps=1)
        if not any(a.kind is inspect.Parameter.VAR_KEYWORD for a in accepted.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if kwargs.get("negative_prompt", "") is None:
            del kwargs["negative_prompt"]
        return kwargs


def _check_gpus(torch: Any, target: str, gpu_count: int) -> None:
    """Refuse ``gpu_count`` > 1 without CUDA or with fewer visible GPUs (InvalidParams)."""
    if gpu_count == 1:
        return
    if not target.startswith("cuda"):
        raise InvalidParams(f"gpu_count {gpu_count} needs CUDA; this load runs on {target!r}")
    visible = torch.cuda.device_count()
    if visible < gpu_count:
        raise InvalidParams(f"gpu_count {gpu_count}: this backend process sees {visible} GPU(s) "
                            "(CUDA_VISIBLE_DEVICES)")


def _quiet_progress_bars(diffusers: Any) -> None:
    """No tqdm bars from diffusers or transformers in the backend's log."""
    diffusers.utils.logging.disable_progress_bar()
    try:
        transformers_logging = importlib.import_module("transformers.utils.logging")
    except ImportError:  # a pipeline without transformers components
        return
    transformers_logging.disable_progress_bar()


def _native_size(pipe: Any) -> int:
    """The pipeline's default image side in pixels: latent ``sample_size`` x VAE scale
    factor (``default_sample_size`` where the pipeline has it), else 512."""
    sample = getattr(pipe, "default_sample_size", None)
    if not isinstance(sample, int):
        denoiser = getattr(pipe, "unet", None)
        if denoiser is None:
            denoiser = getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int) and isinstance(scale, int) and 8 <= sample * scale <= 2048:
        return sample * scale
    return 512


def _parameter_mb(pipe: Any, torch: Any) -> int:
    """MiB of parameters and buffers of the pipeline's torch modules, rounded up."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in list(component.parameters()) + list(component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return -(-total // (1024 * 1024))


def main(argv: Sequence[str] | None = None) -> int:
    return base_main(DiffusersModel, argv, backend_name=BACKEND)


if __name__ == "__main__":
    sys.exit(main())
