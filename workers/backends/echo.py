"""The echo backend: deterministic, no files, no heavy imports. The tests' workhorse.

Run as ``python -m workers.backends.echo --socket PATH --model NAME --instance ID``.

LoadModel options (``options_json``):

- ``load_delay_s`` (float, seconds, default 0): LoadModel takes this long. It sleeps in
  10 ms slices and gives up when the process is told to stop, so SIGTERM stays prompt.
- ``token_delay_s`` (float, seconds, default 0): each streamed token takes this long
  (the first one included), slept in 10 ms slices that check for cancellation.
- ``embed_delay_s`` (float, seconds, default 0): each Embed call takes this long, slept in
  10 ms slices that check for cancellation (a cancelled call answers CANCELLED).
- ``dim`` (int, default 8): embedding dimension.
- ``fail_load`` (bool, default false): LoadModel fails (after ``load_delay_s``).
- ``memory_mb`` (int, MiB, default 1): the memory the load reports.
- ``crash_at`` (str, optional): the process kills itself with SIGSEGV, as a native library's
  fault would, at "warmup" (inside LoadModel, after the load) or at "generate" (the first
  token of every generation). For the tests of warm-up failures and crash loops.
- ``refuse_text`` (str, optional): Embed refuses (INVALID_ARGUMENT) any call holding this text,
  as a model refuses an input it cannot take; the other texts of the call go unanswered too.

Generate streams back the words of the input (the prompt, or the content of the last chat
message), one per message, each followed by a space except the input's last word; so a
generation cut by ``max_tokens`` (params) is a prefix of the full one, finish_reason
"length". Embed gives each text a unit vector derived from sha256 (:func:`embed_text`),
identical in every process. GenerateImage is unsupported.

Test hook: with ``MODELBAY_ECHO_IGNORE_SIGTERM=1`` in its environment the process ignores
SIGTERM (SIGINT still stops it), so tests can check that the supervisor escalates to
SIGKILL.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import signal
import sys
from collections.abc import Callable, Generator, Sequence
from typing import Any

from workers.backends.model import BackendModel, InvalidParams, LoadInfo, wait_or_cancel
from workers.backends.server import main as base_main

IGNORE_SIGTERM_ENV = "MODELBAY_ECHO_IGNORE_SIGTERM"
CRASH_POINTS = ("warmup", "generate")


def _segfault() -> None:
    """Die as a native library's crash does: read address 0 (SIGSEGV)."""
    ctypes.string_at(0)


def embed_text(text: str, dim: int) -> list[float]:
    """A deterministic unit-length vector of ``dim`` floats for ``text``: component i is
    sha256(f"{i}:{text}") mapped to [-1, 1), then the vector is L2-normalised."""
    raw = []
    for i in range(dim):
        digest = hashlib.sha256(f"{i}:{text}".encode()).digest()
        raw.append(int.from_bytes(digest[:8], "big") / 2.0**63 - 1.0)
    norm = math.sqrt(sum(x * x for x in raw))
    if norm == 0.0:
        return [1.0] + [0.0] * (dim - 1)
    return [x / norm for x in raw]


def _number(options: dict[str, Any], key: str, default: float, kind: type, minimum: float) -> Any:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InvalidParams(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise InvalidParams(f"{key} must be >= {minimum}, got {value!r}")
    return kind(value)


class EchoModel(BackendModel):
    """Echoes words back and hashes texts into vectors; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.dim = 8
        self.token_delay_s = 0.0
        self.embed_delay_s = 0.0
        self.crash_at: str | None = None
        self.refuse_text: str | None = None

    def load(self, files: list[str], model_dir: str, options: dict[str, Any], device: str) -> LoadInfo:
        load_delay_s = _number(options, "load_delay_s", 0.0, float, 0.0)
        token_delay_s = _number(options, "token_delay_s", 0.0, float, 0.0)
        embed_delay_s = _number(options, "embed_delay_s", 0.0, float, 0.0)
        dim = _number(options, "dim", 8, int, 1)
        memory_mb = _number(options, "memory_mb", 1, int, 0)
        fail_load = options.get("fail_load", False)
        if not isinstance(fail_load, bool):
            raise InvalidParams(f"fail_load must be a boolean, got {fail_load!r}")
        crash_at = options.get("crash_at")
        if crash_at not in (None, *CRASH_POINTS):
            raise InvalidParams(f"crash_at must be one of {', '.join(CRASH_POINTS)}, got {crash_at!r}")
        refuse_text = options.get("refuse_text")
        if refuse_text is not None and not isinstance(refuse_text, str):
            raise InvalidParams(f"refuse_text must be a string, got {refuse_text!r}")
        if wait_or_cancel(load_delay_s, self.stopping.is_set):
            raise RuntimeError("load interrupted: the backend is shutting down")
        if fail_load:
            raise RuntimeError("echo load failed on purpose (option fail_load=true)")
        self.dim, self.token_delay_s, self.crash_at, self.refuse_text = dim, token_delay_s, crash_at, refuse_text
        self.embed_delay_s = embed_delay_s
        return LoadInfo(memory_mb=memory_mb, device=device or "cpu", dim=dim)

    def warmup(self) -> None:
        if self.crash_at == "warmup":
            _segfault()

    def embed(self, texts: list[str], params: dict[str, Any],
              cancelled: Callable[[], bool] = lambda: False) -> list[list[float]]:
        if self.refuse_text is not None and self.refuse_text in texts:
            raise InvalidParams(f"echo refuses the text {self.refuse_text!r} (option refuse_text)")
        if wait_or_cancel(self.embed_delay_s, cancelled):
            raise RuntimeError("embed cancelled")
        return [embed_text(text, self.dim) for text in texts]

    def generate(
        self, prompt: str, messages: list[dict[str, str]], params: dict[str, Any],
        cancelled: Callable[[], bool],
    ) -> Generator[str, None, str]:
        words = (messages[-1]["content"] if messages else prompt).split()
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            max_tokens = len(words)
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise InvalidParams(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        for i, word in enumerate(words[:max_tokens]):
            if self.crash_at == "generate":
                _segfault()
            if wait_or_cancel(self.token_delay_s, cancelled):
                return "stop"
            yield word if i == len(words) - 1 else word + " "
        return "length" if max_tokens < len(words) else "stop"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; honours the ``MODELBAY_ECHO_IGNORE_SIGTERM`` test hook."""
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
    if os.environ.get(IGNORE_SIGTERM_ENV) == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_signals = (signal.SIGINT,)
    return base_main(EchoModel, argv, backend_name="echo", stop_signals=stop_signals)


if __name__ == "__main__":
    sys.exit(main())
