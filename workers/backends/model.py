"""The model interface every backend implements: :class:`BackendModel`, what a load and an
image return, the errors a model raises and how they map to gRPC statuses.

Error mapping (model exception -> gRPC status): :class:`Unsupported` -> UNIMPLEMENTED,
:class:`InvalidParams` -> INVALID_ARGUMENT, anything else -> INTERNAL with the message.
Models are called from up to 16 gRPC threads at once: a model that is not thread-safe
must lock internally. A backend imports its heavy libraries (torch, llama_cpp, ...) inside
its model class, so only the backend process ever loads them.
"""
from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class Unsupported(Exception):
    """The model does not support this kind of call (answered UNIMPLEMENTED)."""


class InvalidParams(ValueError):
    """Bad options or request parameters (answered INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class LoadInfo:
    """What a load produced: memory in MiB, the device actually used, embedding dim or 0."""

    memory_mb: int
    device: str
    dim: int = 0


@dataclass(frozen=True)
class ImageResult:
    """One generated image: PNG bytes, size in pixels, the seed used."""

    png: bytes
    width: int
    height: int
    seed: int


def wait_or_cancel(seconds: float, cancelled: Callable[[], bool], slice_s: float = 0.01) -> bool:
    """Sleep ``seconds`` in slices of ``slice_s`` seconds; return True as soon as cancelled."""
    deadline = time.monotonic() + max(0.0, seconds)
    while True:
        if cancelled():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(slice_s, left))


class BackendModel(abc.ABC):
    """One model inside a backend process. Subclasses implement :meth:`load` and the calls
    they support; the others answer UNIMPLEMENTED. ``stopping`` is set when the process
    shuts down: long work (a load) should check it and give up."""

    def __init__(self) -> None:
        self.stopping = threading.Event()

    @abc.abstractmethod
    def load(self, files: list[str], model_dir: str, options: dict[str, Any], device: str) -> LoadInfo:
        """Load the model from local ``files``; ``device`` is "cuda", "cpu" or "" (pick)."""

    def warmup(self) -> None:
        """Run the loaded model once on a tiny input (one decode, one encode, one denoising
        step), inside LoadModel: a model that cannot run fails its load, with the load's
        cooldown, instead of failing every job after a load that looked fine. It may raise
        any exception (the load then fails with its message); it may also crash the process
        (a native library's fault), which the supervisor reports as the load's failure."""

    def embed(self, texts: list[str], params: dict[str, Any],
              cancelled: Callable[[], bool] = lambda: False) -> list[list[float]]:
        """Return one vector per text; ``cancelled()`` turns true when the caller went away."""
        raise Unsupported("this backend does not embed")

    def generate(
        self, prompt: str, messages: list[dict[str, str]], params: dict[str, Any],
        cancelled: Callable[[], bool],
    ) -> Iterator[str]:
        """Yield token text pieces; check ``cancelled()`` between tokens and stop when true.
        The generator may ``return "length"`` or ``"stop"``; when it returns None the
        reason is "length" if ``params["max_tokens"]`` pieces were produced, else "stop"."""
        raise Unsupported("this backend does not generate text")

    def generate_image(
        self, prompt: str, params: dict[str, Any], cancelled: Callable[[], bool],
        progress: Callable[[int, int], None],
    ) -> ImageResult:
        """Make one image; call ``progress(step, steps)`` per step and stop if cancelled."""
        raise Unsupported("this backend does not generate images")

    def free(self) -> None:
        """Release the model's memory (the process keeps running)."""

    def stats(self) -> dict[str, Any]:
        """Backend-specific counters for Status (``stats_json``); JSON-serialisable."""
        return {}

    def prompt_tokens(self, prompt: str, messages: list[dict[str, str]]) -> int:
        """Prompt token count for a generation's usage; :meth:`count_tokens` of each input
        unless the model knows better (a chat template adds tokens)."""
        return sum(self.count_tokens(m["content"]) for m in messages) if messages else self.count_tokens(prompt)

    def embed_with_usage(self, texts: list[str], params: dict[str, Any],
                         cancelled: Callable[[], bool]) -> tuple[list[list[float]], list[int]]:
        """:meth:`embed` plus each text's token count (:meth:`count_tokens`), in order: a
        caller that sent several requests' texts in one call splits the usage by request."""
        vectors = self.embed(texts, params, cancelled)
        return vectors, [self.count_tokens(t) for t in texts]

    def count_tokens(self, text: str) -> int:
        """Token count used for usage figures; whitespace words unless overridden."""
        return len(text.split())
