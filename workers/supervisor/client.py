"""The calls of the Backend service, as :class:`~workers.supervisor.process.BackendProcess` makes
them: every request carries the model's identity, has a deadline, and a gRPC error becomes
one of :mod:`workers.supervisor.calls`' errors (the process being gone comes first)."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import grpc

from workers.supervisor.calls import BackendCallError, BackendCancelled, BackendError, GenerateCall, ImageCall
from workers.backends.proto.modelbay.backend.v1 import backend_pb2 as pb
from workers.backends.proto.modelbay.backend.v1 import backend_pb2_grpc as pb_grpc


class BackendClient:
    """The RPC half of a backend process. The process half provides the identity
    (``model``, ``instance``), the stub, the exit event and :meth:`_gone_error`."""

    model: str
    instance: str
    _stub: pb_grpc.BackendStub | None
    _exited: threading.Event

    def _gone_error(self) -> BackendCallError | None:
        """The error of a process that is stopped, exited or not started; None when up."""
        raise NotImplementedError

    def _ref(self) -> pb.ModelRef:
        return pb.ModelRef(name=self.model, instance=self.instance)

    def _translate(self, err: grpc.RpcError, what: str, timeout_s: float | None) -> BackendError:
        code: grpc.StatusCode | None = getattr(err, "code", lambda: None)()
        details: str = getattr(err, "details", lambda: None)() or str(err)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self._exited.wait(1.0 if code == grpc.StatusCode.UNAVAILABLE else 0.0)
        gone = self._gone_error()
        if gone is not None:
            gone.status = code
            return gone
        if code == grpc.StatusCode.CANCELLED:
            return BackendCancelled(f"{what} cancelled")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return BackendCallError(f"{what}: deadline exceeded after {timeout_s:g}s", code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return BackendCallError(f"backend unavailable ({what}: {details})", code)
        return BackendCallError(f"{what} failed ({code.name if code is not None else None}): {details}", code)

    def _invoke(self, method: str, request: Any, timeout_s: float, future: bool = False) -> Any:
        """Call ``method``: its response, for a stream the call object, with ``future`` a
        gRPC future; errors translated."""
        gone = self._gone_error()
        if gone is not None or self._stub is None:
            raise gone or BackendCallError("backend process not started")
        try:
            rpc = getattr(self._stub, method)
            return (rpc.future if future else rpc)(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise self._translate(err, method, timeout_s) from None
        except ValueError as exc:  # "Cannot invoke RPC on closed channel!"
            raise self._gone_error() or BackendCallError(str(exc)) from None

    def load(self, files: list[str], model_dir: str, options: dict[str, Any], device: str,
             timeout_s: float) -> dict[str, Any]:
        """LoadModel with a deadline of ``timeout_s`` seconds (see :func:`load_deadline_s`).
        Returns ok, message, load_s (seconds), memory_mb (MiB), device, dim."""
        req = pb.LoadModelRequest(model=self._ref(), files=files, model_dir=model_dir,
                                  options_json=json.dumps(options), device=device)
        resp = self._invoke("LoadModel", req, timeout_s)
        if not resp.ok:
            raise BackendCallError(f"load failed: {resp.message}")
        return {"ok": resp.ok, "message": resp.message, "load_s": resp.load_s,
                "memory_mb": resp.memory_mb, "device": resp.device, "dim": resp.dim}

    def embed(self, texts: list[str], params: dict[str, Any], timeout_s: float,
              on_call: Callable[[Callable[[], None]], None] | None = None) -> tuple[list[list[float]], int]:
        """Embed ``texts`` (deadline ``timeout_s`` seconds); returns (vectors, prompt_tokens).
        ``on_call`` receives the call's cancel function (thread-safe) before it is awaited;
        a cancelled call raises :class:`BackendCancelled`."""
        vectors, counts = self.embed_each(texts, params, timeout_s, on_call)
        return vectors, sum(counts)

    def embed_each(self, texts: list[str], params: dict[str, Any], timeout_s: float,
                   on_call: Callable[[Callable[[], None]], None] | None = None) -> tuple[list[list[float]], list[int]]:
        """:meth:`embed`, with each text's token count instead of their sum: several requests'
        texts embedded in one call, each request's usage its own."""
        req = pb.EmbedRequest(model=self._ref(), texts=texts, params_json=json.dumps(params))
        future = self._invoke("Embed", req, timeout_s, future=True)
        if on_call is not None:
            on_call(future.cancel)
        try:
            resp = future.result()
        except grpc.FutureCancelledError:
            raise BackendCancelled("Embed cancelled by the caller") from None
        except grpc.RpcError as err:
            raise self._translate(err, "Embed", timeout_s) from None
        return [list(v.values) for v in resp.embeddings], list(resp.text_tokens)

    def generate(self, prompt: str, messages: list[dict[str, str]], params: dict[str, Any],
                 timeout_s: float, flush_ms: int = 0) -> GenerateCall:
        """Start a Generate stream whose whole duration is limited to ``timeout_s`` seconds.
        ``flush_ms`` 0: a message per token as it is made; else tokens made within that many
        milliseconds of the last message go together (the proto's ``flush_ms``)."""
        req = pb.GenerateRequest(
            model=self._ref(), prompt=prompt, params_json=json.dumps(params), flush_ms=flush_ms,
            messages=[pb.ChatMessage(role=m.get("role", ""), content=m.get("content", "")) for m in messages],
        )
        call = self._invoke("Generate", req, timeout_s)
        return GenerateCall(call, lambda err: self._translate(err, "Generate", timeout_s))

    def generate_image(self, prompt: str, params: dict[str, Any], timeout_s: float) -> ImageCall:
        """Start a GenerateImage stream (step progress, then the PNG) limited to ``timeout_s``."""
        req = pb.GenerateImageRequest(model=self._ref(), prompt=prompt, params_json=json.dumps(params))
        call = self._invoke("GenerateImage", req, timeout_s)
        return ImageCall(call, lambda err: self._translate(err, "GenerateImage", timeout_s))

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Every StatusResponse field; ``model`` is {"name", "instance"}."""
        r = self._invoke("Status", pb.StatusRequest(model=self._ref()), timeout_s)
        out: dict[str, Any] = {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}
        out["model"] = {"name": r.model.name, "instance": r.model.instance}
        out["stats"] = json.loads(r.stats_json) if r.stats_json else {}
        return out

    def free(self, timeout_s: float = 10.0) -> bool:
        """Ask the backend to release the model (the process keeps running)."""
        return bool(self._invoke("Free", pb.FreeRequest(model=self._ref()), timeout_s).ok)
