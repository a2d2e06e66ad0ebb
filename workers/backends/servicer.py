"""The gRPC side of every modelbay backend process: :class:`BackendServicer` serves the
``modelbay.backend.v1.Backend`` service over one :class:`~workers.backends.model.BackendModel`.

A backend is a module ``workers.backends.<name>`` whose ``__main__`` calls
:func:`workers.backends.server.main` with a factory for its model; that serves this
servicer and the standard ``grpc.health.v1`` service on a unix socket (health also on
:func:`health_socket`), and exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from workers.backends.model import BackendModel, InvalidParams, LoadInfo, Unsupported
from workers.backends.proto.modelbay.backend.v1 import backend_pb2 as pb
from workers.backends.proto.modelbay.backend.v1 import backend_pb2_grpc as pb_grpc

SERVICE_NAME = "modelbay.backend.v1.Backend"
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
log = logging.getLogger("modelbay.backend")


def health_socket(socket_path: str | os.PathLike[str]) -> str:
    """The second socket a backend serves grpc.health.v1 on, with threads of its own, so a
    backend busy with many calls still answers its health checks (the supervisor's hang
    detection must not mistake load for a hang)."""
    return f"{os.fspath(socket_path)}.health"


class _Run:
    """Book-keeping of one streaming call; it finishes exactly once, as "completed",
    "cancelled" or "failed". While the handler is suspended at a ``yield`` gRPC may never
    resume it (it stops iterating once the RPC is cancelled), so the RPC-done callback
    finishes a suspended run itself; a running one notices ``event`` within a token."""

    def __init__(self, servicer: BackendServicer) -> None:
        self.servicer = servicer
        self.event = threading.Event()  # set when the RPC ended (cancelled, deadline, stop)
        self.lock = threading.RLock()
        self.busy = True  # False while suspended at a yield
        self.outcome: str | None = None

    def finish(self, outcome: str) -> None:
        with self.lock:
            if self.outcome is None:
                self.outcome = outcome
                self.servicer._count_end(outcome)

    def before_yield(self, tokens: int) -> bool:
        """False (and finished as cancelled) if the caller went away; else count tokens."""
        with self.lock:
            if self.event.is_set():
                self.finish("cancelled")
            if self.outcome is not None:
                return False
            self.busy = False
            with self.servicer._lock:
                self.servicer._tokens += tokens
            return True

    def after_yield(self) -> bool:
        with self.lock:
            self.busy = True
            return self.outcome is None

    def rpc_done(self) -> None:
        self.event.set()
        with self.lock:
            if not self.busy:
                self.finish("cancelled")


def _load_response(info: LoadInfo, message: str, load_s: float) -> pb.LoadModelResponse:
    return pb.LoadModelResponse(ok=True, message=message, load_s=load_s, memory_mb=info.memory_mb,
                                device=info.device, dim=info.dim)


class BackendServicer(pb_grpc.BackendServicer):
    """The ``Backend`` service over one :class:`BackendModel`, for one model identity."""

    def __init__(self, model: BackendModel, name: str, instance: str) -> None:
        self.model, self.name, self.instance = model, name, instance
        self._lock = threading.Lock()
        self._state = "empty"  # "empty" -> "loading" -> "ready" (-> "empty" on Free)
        self._info = LoadInfo(memory_mb=0, device="")
        self._active = self._started = self._completed = self._cancelled = self._tokens = 0

    # -- helpers ---------------------------------------------------------------------
    def _check(self, ref: pb.ModelRef, context: grpc.ServicerContext, ready: bool = False) -> None:
        if ref.name != self.name or ref.instance != self.instance:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"wrong model: the request is for {ref.name!r} instance {ref.instance!r}, "
                          f"this backend serves {self.name!r} instance {self.instance!r}")
        if ready and self._state != "ready":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model not loaded (state {self._state})")

    @staticmethod
    def _json(text: str, context: grpc.ServicerContext, field: str) -> dict[str, Any]:
        if not text.strip():
            return {}
        try:
            value = json.loads(text)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is not valid JSON: {exc}")
        if not isinstance(value, dict):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be a JSON object")
        return value

    @staticmethod
    def _abort_for(context: grpc.ServicerContext, exc: BaseException, what: str) -> NoReturn:
        """The one place a model's exception becomes a gRPC status; the supervisor maps the
        status to the job's code (``GRPC_ERROR_CODES`` in workers/supervisor/calls.py)."""
        message = str(exc) or type(exc).__name__
        if isinstance(exc, Unsupported):
            code = grpc.StatusCode.UNIMPLEMENTED
        elif isinstance(exc, InvalidParams):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            code = grpc.StatusCode.INTERNAL
            log.error("%s failed: %s: %s", what, type(exc).__name__, message)
        context.abort(code, f"{what} failed: {message}")

    def _begin(self, generation: bool) -> None:
        with self._lock:
            self._active, self._started = self._active + 1, self._started + int(generation)

    def _count_end(self, outcome: str) -> None:
        with self._lock:
            self._active -= 1
            self._completed += int(outcome == "completed")
            self._cancelled += int(outcome == "cancelled")
        if outcome == "cancelled":
            log.info("generation cancelled")

    def _start_run(self, context: grpc.ServicerContext) -> tuple[_Run, Callable[[], bool]]:
        self._begin(generation=True)
        run = _Run(self)
        if not context.add_callback(run.rpc_done):
            run.rpc_done()

        def cancelled() -> bool:
            return run.event.is_set() or self.model.stopping.is_set() or not context.is_active()

        return run, cancelled

    # -- RPCs ------------------------------------------------------------------------
    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.LoadModelResponse:
        self._check(request.model, context)
        options = self._json(request.options_json, context, "options_json")
        with self._lock:
            state, info = self._state, self._info
            if state == "empty":
                self._state = "loading"
        if state == "loading":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a load is already in progress")
        if state == "ready":  # idempotent: the options of the first load stay in force
            return _load_response(info, "already loaded", 0.0)
        log.info("loading %d file(s) from %r on device %r", len(request.files), request.model_dir, request.device)
        t0 = time.monotonic()
        try:
            info = self.model.load(list(request.files), request.model_dir, options, request.device)
        except Exception as exc:  # any model failure becomes an error status
            with self._lock:
                self._state = "empty"
            self._abort_for(context, exc, "load")
        log.info("loaded in %.3fs; warming up", time.monotonic() - t0)
        try:
            self.model.warmup()
        except Exception as exc:  # the model loaded but cannot run: the load fails
            log.exception("warm-up failed")
            self.model.free()
            with self._lock:
                self._state = "empty"
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"warm-up failed: the model loaded but cannot run: {type(exc).__name__}: {exc}"[:2000])
        load_s = time.monotonic() - t0
        with self._lock:
            self._state, self._info = "ready", info
        log.info("loaded in %.3fs: %d MiB on %s, dim %d", load_s, info.memory_mb, info.device, info.dim)
        return _load_response(info, "loaded", load_s)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        self._check(request.model, context)
        with self._lock:
            return pb.StatusResponse(model=pb.ModelRef(name=self.name, instance=self.instance),
                                     state=self._state, active_calls=self._active,
                                     generations_started=self._started, generations_completed=self._completed,
                                     generations_cancelled=self._cancelled, tokens_generated=self._tokens,
                                     device=self._info.device, pid=os.getpid(),
                                     stats_json=json.dumps(self.model.stats()))

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self._check(request.model, context, ready=True)
        params = self._json(request.params_json, context, "params_json")
        texts = list(request.texts)
        self._begin(generation=False)
        try:
            vectors, text_tokens = self.model.embed_with_usage(texts, params, lambda: not context.is_active())
        except Exception as exc:  # any model failure becomes an error status
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "embed cancelled by the caller")
            self._abort_for(context, exc, "embed")
        finally:
            self._count_end("embed")
        if len(vectors) != len(texts) or len(text_tokens) != len(texts):
            context.abort(grpc.StatusCode.INTERNAL, f"embed returned {len(vectors)} vectors and {len(text_tokens)} "
                                                    f"token counts for {len(texts)} texts")
        return pb.EmbedResponse(embeddings=[pb.Vector(values=v) for v in vectors],
                                dim=len(vectors[0]) if vectors else self._info.dim,
                                prompt_tokens=sum(text_tokens), text_tokens=text_tokens)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self._check(request.model, context, ready=True)
        params = self._json(request.params_json, context, "params_json")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        run, cancelled = self._start_run(context)
        n = prompt_tokens = 0
        held: list[str] = []  # pieces made since the last message (request.flush_ms)
        flush_s, last = request.flush_ms / 1000, time.monotonic()
        pieces: Iterator[str] | None = None
        try:
            prompt_tokens = self.model.prompt_tokens(request.prompt, messages)
            pieces = self.model.generate(request.prompt, messages, params, cancelled)
            while True:
                try:
                    held.append(next(pieces))
                except StopIteration as stop:
                    reason = stop.value
                    break
                n += 1
                if flush_s > 0 and time.monotonic() - last < flush_s:
                    continue
                if not run.before_yield(len(held)):
                    return
                yield pb.GenerateResponse(text="".join(held), index=n - len(held), pieces=len(held))
                held, last = [], time.monotonic()
                if not run.after_yield():
                    return
            if cancelled() or (held and not run.before_yield(len(held))):
                run.finish("cancelled")
                return
            if reason not in ("stop", "length"):
                max_tokens = params.get("max_tokens")
                reason = "length" if isinstance(max_tokens, int) and n >= max_tokens else "stop"
            run.finish("completed")
            yield pb.GenerateResponse(text="".join(held), index=n - len(held), pieces=len(held), done=True,
                                      finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=n)
        except Exception as exc:  # any model failure becomes an error status
            if cancelled():  # the model gave up because the caller went away
                run.finish("cancelled")
                return
            run.finish("failed")
            self._abort_for(context, exc, "generate")
        finally:
            run.finish("cancelled")  # no-op unless gRPC abandoned us at a yield
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    def GenerateImage(
        self, request: pb.GenerateImageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateImageResponse]:
        self._check(request.model, context, ready=True)
        params = self._json(request.params_json, context, "params_json")
        # The model runs in its own thread (progress is a callback); that thread finishes
        # the run (never "suspended at a yield"), so active_calls drops when it really stopped.
        run, cancelled = self._start_run(context)
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        def work() -> None:
            try:
                image = self.model.generate_image(request.prompt, params, cancelled,
                                                  lambda step, steps: events.put(("progress", (step, steps))))
            except Exception as exc:  # handed to the streaming thread
                run.finish("cancelled" if cancelled() else "failed")
                events.put(("error", exc))
                return
            run.finish("cancelled" if cancelled() else "completed")
            events.put(("image", image))

        threading.Thread(target=work, name="generate-image", daemon=True).start()
        while True:
            kind, value = events.get()
            if kind == "progress" and not run.event.is_set():
                yield pb.GenerateImageResponse(progress=pb.ImageProgress(step=value[0], steps=value[1]))
            elif kind == "image" and run.outcome == "completed":
                yield pb.GenerateImageResponse(image=pb.Image(png=value.png, width=value.width,
                                                              height=value.height, seed=value.seed))
                return
            elif kind == "error" and run.outcome == "failed":
                self._abort_for(context, value, "generate_image")
            elif kind != "progress":
                return

    def Free(self, request: pb.FreeRequest, context: grpc.ServicerContext) -> pb.FreeResponse:
        self._check(request.model, context)
        with self._lock:
            state, active = self._state, self._active
            if state == "ready" and not active:
                self._state = "empty"
        if state == "loading" or active:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"busy: {state}, {active} call(s) in progress")
        if state == "ready":
            try:
                self.model.free()
            except Exception as exc:  # any model failure becomes an error status
                self._abort_for(context, exc, "free")
            log.info("freed")
        return pb.FreeResponse(ok=True)
