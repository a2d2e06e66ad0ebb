"""What a call to a backend process can return or raise: the supervisor's error classes
(each a :class:`~tasks.errors.JobFailed` with its :class:`~tasks.errors.ErrorCode`), the one
map from a call's gRPC status to the code of the job it served (:data:`GRPC_ERROR_CODES`),
the streamed Generate call, and the LoadModel deadline."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from tasks.errors import ErrorCode, JobFailed

# What a backend's gRPC status says of the job's request (workers/backends/servicer.py maps
# the model's exceptions to these statuses); any other status is the call's own failure.
GRPC_ERROR_CODES: Mapping[grpc.StatusCode, ErrorCode] = {
    grpc.StatusCode.UNIMPLEMENTED: ErrorCode.UNSUPPORTED_TASK,   # the model's Unsupported
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_PARAMS,  # the model's InvalidParams
}


class BackendError(JobFailed):
    """Base of the supervisor's errors; each class has one code and takes the message alone."""

    code = ErrorCode.BACKEND_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, message)


class BackendStartError(BackendError):
    """The process could not be started or did not become healthy in time."""

    code = ErrorCode.BACKEND_START_FAILED


class BackendCallError(BackendError):
    """A call failed; ``status`` is its gRPC status when there was one."""

    code = ErrorCode.BACKEND_CALL_FAILED

    def __init__(self, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def grpc_code(self) -> str | None:
        """The gRPC status's name ("INVALID_ARGUMENT"), or None."""
        return self.status.name if self.status is not None else None

    @property
    def job_code(self) -> ErrorCode:
        """The code of a job this call failed: what its status says of the request
        (:data:`GRPC_ERROR_CODES`), else the call's own ``backend_call_failed``."""
        return GRPC_ERROR_CODES.get(self.status, self.code) if self.status is not None else self.code


class BackendCancelled(BackendError):
    """The call was cancelled by the caller (:meth:`GenerateCall.cancel`)."""

    code = ErrorCode.CANCELLED


def load_deadline_s(size_bytes: int, base_s: float = 60.0, min_rate_mb_s: float = 50.0) -> float:
    """LoadModel deadline in seconds for ``size_bytes`` of model files: ``base_s`` plus the
    time to read them at ``min_rate_mb_s`` MiB/s."""
    if size_bytes < 0 or base_s < 0 or min_rate_mb_s <= 0:
        raise ValueError("size_bytes and base_s must be >= 0 and min_rate_mb_s > 0")
    return base_s + size_bytes / (min_rate_mb_s * 1024 * 1024)


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed message (``GenerateResponse`` as plain data): ``pieces`` tokens in ``text``,
    the first of them number ``index``. The last has ``done=True``, ``finish_reason``
    ("stop"/"length") and the token counts, and may hold text too (a call with ``flush_ms``)."""

    text: str
    index: int
    done: bool
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    pieces: int = 1


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
                              resp.prompt_tokens, resp.completion_tokens, resp.pieces)
        if chunk.done:
            self.done, self.finish_reason = True, chunk.finish_reason
            self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        return chunk



__all__ = ["GRPC_ERROR_CODES", "BackendError", "BackendStartError", "BackendCallError", "BackendCancelled",
           "GenerateChunk", "GenerateCall", "ImageEvent", "ImageCall", "load_deadline_s"]
