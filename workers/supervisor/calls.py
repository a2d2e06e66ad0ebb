"""What a call to a backend process can return or raise: the supervisor's error classes
(each with a stable ``code``), the streamed Generate call, and the LoadModel deadline."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc


class BackendError(Exception):
    """Base of the supervisor's errors; ``code`` is a stable machine-readable string."""

    code = "backend_error"


class BackendStartError(BackendError):
    """The process could not be started or did not become healthy in time."""

    code = "backend_start_failed"


class BackendCallError(BackendError):
    """A call failed; ``grpc_code`` is the gRPC status name when there was one."""

    code = "backend_call_failed"

    def __init__(self, message: str, grpc_code: str | None = None) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


class BackendCancelled(BackendError):
    """The call was cancelled by the caller (:meth:`GenerateCall.cancel`)."""

    code = "cancelled"


def load_deadline_s(size_bytes: int, base_s: float = 60.0, min_rate_mb_s: float = 50.0) -> float:
    """LoadModel deadline in seconds for ``size_bytes`` of model files: ``base_s`` plus the
    time to read them at ``min_rate_mb_s`` MiB/s."""
    if size_bytes < 0 or base_s < 0 or min_rate_mb_s <= 0:
        raise ValueError("size_bytes and base_s must be >= 0 and min_rate_mb_s > 0")
    return base_s + size_bytes / (min_rate_mb_s * 1024 * 1024)


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed piece (``GenerateResponse`` as plain data). The last has ``done=True``,
    ``finish_reason`` ("stop"/"length") and the token counts."""

    text: str
    index: int
    done: bool
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _StreamCall:
    """Shared cancel/translate logic of a server-streaming backend call."""

    def __init__(self, call: Any, translate: Callable[[grpc.RpcError], BackendError]) -> None:
        self._call = call
        self._translate = translate
        self._cancelled = threading.Event()
        self.done = False

    def _next(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            if self.done:
                raise StopIteration from None
            if self._cancelled.is_set():
                raise BackendCancelled("call cancelled by the caller") from None
            raise self._translate(err) from None

    def cancel(self) -> None:
        """Cancel the stream (thread-safe, idempotent); the backend stops its work."""
        if not self.done:
            self._cancelled.set()
            self._call.cancel()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


@dataclass(frozen=True)
class ImageEvent:
    """One GenerateImage message: a step (``png`` None) or the final PNG (pixels, seed)."""

    step: int
    steps: int
    png: bytes | None = None
    width: int = 0
    height: int = 0
    seed: int = 0


class ImageCall(_StreamCall):
    """Iterator over the :class:`ImageEvent` of one GenerateImage stream; cancel and errors
    as :class:`GenerateCall`. The stream ends after the event that carries the image."""

    def __iter__(self) -> Iterator[ImageEvent]:
        return self

    def __next__(self) -> ImageEvent:
        if self.done:
            raise StopIteration
        resp = self._next()
        if resp.HasField("image"):
            self.done = True
            image = resp.image
            return ImageEvent(0, 0, image.png, image.width, image.height, image.seed)
        return ImageEvent(resp.progress.step, resp.progress.steps)



class GenerateCall(_StreamCall):
    """Iterator over the :class:`GenerateChunk` of one Generate stream.

    :meth:`cancel` may be called from any thread: the stream is cancelled (the backend
    stops generating) and iteration, blocked or not, ends by raising
    :class:`BackendCancelled`. Once the done chunk arrived, cancel changes nothing and
    iteration just ends. Other failures raise :class:`BackendCallError`. Used as a context
    manager, leaving the block cancels an unfinished stream."""

    def __init__(self, call: Any, translate: Callable[[grpc.RpcError], BackendError]) -> None:
        super().__init__(call, translate)
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def __iter__(self) -> Iterator[GenerateChunk]:
        return self

    def __next__(self) -> GenerateChunk:
        resp = self._next()
        chunk = GenerateChunk(resp.text, resp.index, resp.done, resp.finish_reason,
                              resp.prompt_tokens, resp.completion_tokens)
        if chunk.done:
            self.done, self.finish_reason = True, chunk.finish_reason
            self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        return chunk



__all__ = ["BackendError", "BackendStartError", "BackendCallError", "BackendCancelled",
           "GenerateChunk", "GenerateCall", "ImageEvent", "ImageCall", "load_deadline_s"]
