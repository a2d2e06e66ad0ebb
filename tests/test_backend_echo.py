"""Real-process tests of the backend scaffolding, the echo backend and the supervisor.

Every test starts real ``python -m workers.backends.echo`` processes on unix sockets; the
``backends`` fixture stops each one, even when the test fails. Waiting is done by polling
a condition with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from helpers import pid_alive, poll
from grpc_health.v1 import health_pb2, health_pb2_grpc

from workers.backends.servicer import BackendServicer
from workers.backends.model import BackendModel, ImageResult, LoadInfo, wait_or_cancel
from workers.backends.echo import IGNORE_SIGTERM_ENV, embed_text
from workers.backends.proto.modelbay.backend.v1 import backend_pb2, backend_pb2_grpc
from workers.supervisor.calls import (
    BackendCallError,
    BackendCancelled,
    BackendError,
    BackendStartError,
    load_deadline_s,
)
from workers.supervisor.process import SERVICE_NAME, BackendProcess

WORDS = "the quick brown fox jumps over the lazy dog"


def f32(x: float) -> float:
    """Round to float32, as the proto's ``repeated float`` does."""
    return struct.unpack("f", struct.pack("f", x))[0]


def started(make: Callable[..., BackendProcess], options: dict[str, Any] | None = None,
            **kwargs: Any) -> BackendProcess:
    bp = make(**kwargs)
    bp.start()
    if options is not None:
        bp.load([], "", options, "", timeout_s=load_deadline_s(0, base_s=10.0))
    return bp


def test_start_health_load_generate_embed(backends: Callable[..., BackendProcess]) -> None:
    bp = started(backends, {"dim": 5, "memory_mb": 3})
    assert bp.alive() and bp.pid is not None and bp.socket_path.exists()

    # The standard health service answers SERVING, overall and for the Backend service.
    with grpc.insecure_channel(f"unix:{bp.socket_path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    status = bp.status()
    assert status["state"] == "ready" and status["pid"] == bp.pid and status["device"] == "cpu"
    assert status["model"] == {"name": "echo-test", "instance": bp.instance}

    chunks = list(bp.generate(WORDS, [], {}, timeout_s=10))
    *tokens, last = chunks
    assert [c.text for c in tokens] == [w + " " for w in WORDS.split()[:-1]] + ["dog"]
    assert [c.index for c in tokens] == list(range(9))
    assert "".join(c.text for c in tokens) == WORDS
    assert (last.done, last.finish_reason, last.prompt_tokens, last.completion_tokens) == (True, "stop", 9, 9)

    call = bp.generate(WORDS, [], {"max_tokens": 4}, timeout_s=10)
    assert "".join(c.text for c in call) == "the quick brown fox "
    assert (call.finish_reason, call.completion_tokens) == ("length", 4)

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    call = bp.generate("", chat, {}, timeout_s=10)
    assert "".join(c.text for c in call) == "hello there"
    assert (call.finish_reason, call.prompt_tokens, call.completion_tokens) == ("stop", 4, 2)

    texts = ["alpha", "beta", "alpha", ""]
    vectors, prompt_tokens = bp.embed(texts, {}, timeout_s=5)
    assert prompt_tokens == 3
    assert all(len(v) == 5 for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    for v in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-6)
    assert vectors[1] == [f32(x) for x in embed_text("beta", 5)]
    # Each text's own token count (several requests' texts in one call split their usage by it).
    each, counts = bp.embed_each(["one two", "three", ""], {}, timeout_s=5)
    assert counts == [2, 1, 0] and len(each) == 3

    # The same text gives the same vector in another process.
    other = started(backends, {"dim": 5})
    assert other.pid != bp.pid
    assert other.embed(texts, {}, timeout_s=5)[0] == vectors

    assert bp.status()["tokens_generated"] == 9 + 4 + 2
    assert bp.stop() == "terminated"


def test_wrong_model_identity_is_refused(backends: Callable[..., BackendProcess],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bp = started(backends)
    with pytest.raises(BackendCallError) as info:
        bp.embed(["x"], {}, timeout_s=5)
    assert info.value.grpc_code == "FAILED_PRECONDITION" and "not loaded" in str(info.value)
    bp.load([], "", {}, "", timeout_s=10)

    real_instance = bp.instance
    monkeypatch.setattr(bp, "instance", "0" * 32)
    with pytest.raises(BackendCallError) as info:
        bp.embed(["x"], {}, timeout_s=5)
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    assert "wrong model" in str(info.value) and real_instance in str(info.value)

    monkeypatch.setattr(bp, "instance", real_instance)
    monkeypatch.setattr(bp, "model", "someone-else")
    with pytest.raises(BackendCallError, match="someone-else"):
        list(bp.generate("a b", [], {}, timeout_s=5))

    # Straight through gRPC: the status code itself, and bad params_json.
    with grpc.insecure_channel(f"unix:{bp.socket_path}") as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        wrong = backend_pb2.ModelRef(name="echo-test", instance="nope")
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Status(backend_pb2.StatusRequest(model=wrong), timeout=5)
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        right = backend_pb2.ModelRef(name="echo-test", instance=real_instance)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Embed(backend_pb2.EmbedRequest(model=right, texts=["x"], params_json="{nope"), timeout=5)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as rpc:
            list(stub.GenerateImage(backend_pb2.GenerateImageRequest(model=right, prompt="x"), timeout=5))
        assert rpc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cancel_reaches_the_backend(backends: Callable[..., BackendProcess]) -> None:
    bp = started(backends, {"token_delay_s": 0.5})
    call = bp.generate(" ".join(f"w{i}" for i in range(40)), [], {}, timeout_s=60)
    assert [next(call).text, next(call).text] == ["w0 ", "w1 "]

    canceller = threading.Thread(target=call.cancel)
    t0 = time.monotonic()
    canceller.start()
    with pytest.raises(BackendCancelled) as info:
        for _ in call:
            pass
    assert time.monotonic() - t0 < 1.0
    assert info.value.code == "cancelled"
    canceller.join(5)

    status = poll(lambda: (s := bp.status())["generations_cancelled"] == 1 and s["active_calls"] == 0 and s, 5)
    assert status["generations_started"] == 1 and status["generations_completed"] == 0
    assert status["tokens_generated"] < 10


def test_flush_ms_sends_the_tokens_made_together(backends: Callable[..., BackendProcess]) -> None:
    """A call with ``flush_ms`` (a job nobody streams): tokens made within the interval of the
    last message go in one message, the done message carries the rest, nothing is lost or
    reordered, the token counts are per token, and a cancel still stops the backend."""
    fast = started(backends, {"dim": 4})
    (only,) = list(fast.generate(WORDS, [], {}, timeout_s=10, flush_ms=10_000))
    assert (only.done, only.text, only.pieces, only.index, only.completion_tokens) == (True, WORDS, 9, 0, 9)
    assert fast.status()["tokens_generated"] == 9

    slow = started(backends, {"dim": 4, "token_delay_s": 0.05})
    chunks = list(slow.generate(WORDS, [], {}, timeout_s=30, flush_ms=120))
    assert "".join(c.text for c in chunks) == WORDS and sum(c.pieces for c in chunks) == 9
    assert [c.index for c in chunks] == [sum(c.pieces for c in chunks[:i]) for i in range(len(chunks))]
    assert len(chunks) >= 2 and chunks[-1].done and not any(c.done for c in chunks[:-1])  # ticks before the end

    call = slow.generate(" ".join(f"w{i}" for i in range(400)), [], {}, timeout_s=60, flush_ms=100)
    assert next(call).pieces >= 1
    call.cancel()
    with pytest.raises(BackendCancelled):
        for _ in call:
            pass
    status = poll(lambda: (s := slow.status())["generations_cancelled"] == 1 and s["active_calls"] == 0 and s, 5)
    assert status["tokens_generated"] < 100


def test_stop_during_slow_load(backends: Callable[..., BackendProcess]) -> None:
    bp = started(backends, stop_grace_s=2.0)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            bp.load([], "", {"load_delay_s": 5}, "", timeout_s=30)
        except BaseException as exc:  # recorded for the assertion below
            errors.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    poll(lambda: bp.status()["state"] == "loading", 5)
    pid = bp.pid
    assert pid is not None
    t0 = time.monotonic()
    result = bp.stop()
    assert time.monotonic() - t0 < bp.stop_grace_s + 2.0
    assert result == "terminated"
    assert not pid_alive(pid) and not bp.alive()
    assert not bp.socket_path.exists()
    loader.join(5)
    assert len(errors) == 1 and isinstance(errors[0], BackendCallError)
    assert bp.stop() == "terminated"  # idempotent


def test_sigterm_ignored_gets_killed(backends: Callable[..., BackendProcess]) -> None:
    bp = started(backends, {}, env={IGNORE_SIGTERM_ENV: "1"}, stop_grace_s=1.0)
    pid = bp.pid
    assert pid is not None
    t0 = time.monotonic()
    assert bp.stop() == "killed"
    assert bp.stop_grace_s <= time.monotonic() - t0 < bp.stop_grace_s + 3.0
    assert bp.returncode == -signal.SIGKILL
    assert not pid_alive(pid) and not bp.socket_path.exists()


def test_unexpected_exit_is_reported(backends: Callable[..., BackendProcess]) -> None:
    exits: list[int] = []
    bp = started(backends, {"token_delay_s": 0.2}, on_exit=exits.append)
    call = bp.generate("a b c d e f g h i j", [], {}, timeout_s=60)
    next(call)
    assert bp.pid is not None
    os.kill(bp.pid, signal.SIGKILL)

    with pytest.raises(BackendCallError, match=r"backend process was killed by SIGKILL \(signal 9\)"):
        for _ in call:
            pass
    assert poll(lambda: exits, 5) == [-signal.SIGKILL]
    assert not bp.alive()
    with pytest.raises(BackendCallError, match=r"was killed by SIGKILL \(signal 9\)"):
        bp.status()
    assert bp.stop() == "exited"
    assert exits == [-signal.SIGKILL]


def test_fail_load_carries_the_message(backends: Callable[..., BackendProcess]) -> None:
    bp = started(backends)
    with pytest.raises(BackendCallError, match="fail_load") as info:
        bp.load([], "", {"fail_load": True}, "", timeout_s=10)
    assert info.value.grpc_code == "INTERNAL" and info.value.code == "backend_call_failed"
    with pytest.raises(BackendCallError) as info:
        bp.load([], "", {"dim": "eight"}, "", timeout_s=10)
    assert info.value.grpc_code == "INVALID_ARGUMENT" and "dim" in str(info.value)
    # The process survives a failed load, and a good load then works.
    assert bp.status()["state"] == "empty"
    assert bp.load([], "", {"dim": 3}, "cpu", timeout_s=10)["dim"] == 3


def test_load_deadline_expires(backends: Callable[..., BackendProcess]) -> None:
    bp = started(backends)
    with pytest.raises(BackendCallError, match="deadline exceeded after 0.3s"):
        bp.load([], "", {"load_delay_s": 5}, "", timeout_s=0.3)


def test_unknown_backend_fails_fast(backends: Callable[..., BackendProcess]) -> None:
    bp = backends("no-such-backend")
    t0 = time.monotonic()
    with pytest.raises(BackendStartError) as info:
        bp.start()
    assert time.monotonic() - t0 < 10
    assert info.value.code == "backend_start_failed"
    assert "no_such_backend" in str(info.value) and "exited with code 1" in str(info.value)
    assert not bp.alive() and bp.pid is not None and not pid_alive(bp.pid)


def test_log_path_tail(backends: Callable[..., BackendProcess], socket_dir: Path) -> None:
    log_path = socket_dir / "backend.log"
    bp = backends("no-such-backend", log_path=log_path)
    with pytest.raises(BackendStartError, match="No module named"):
        bp.start()
    assert "No module named" in log_path.read_text()


def test_bad_names_and_paths(socket_dir: Path) -> None:
    with pytest.raises(BackendStartError, match="invalid backend name"):
        BackendProcess("../evil", "m", socket_dir)
    with pytest.raises(BackendStartError, match="longer than"):
        BackendProcess("echo", "m", socket_dir / ("x" * 120))
    assert issubclass(BackendStartError, BackendError)


def test_load_deadline_scales_with_size() -> None:
    assert load_deadline_s(0) == 60.0
    assert load_deadline_s(50 * 1024 * 1024 * 100) == pytest.approx(160.0)
    assert load_deadline_s(10 * 1024**3, base_s=30.0, min_rate_mb_s=100.0) == pytest.approx(30.0 + 102.4)
    with pytest.raises(ValueError):
        load_deadline_s(-1)


class ImageModel(BackendModel):
    """A stand-in image model for the scaffolding's GenerateImage path (echo has none)."""

    def load(self, files: list[str], model_dir: str, options: dict[str, Any], device: str) -> LoadInfo:
        return LoadInfo(memory_mb=1, device="cpu")

    def generate_image(self, prompt: str, params: dict[str, Any], cancelled: Callable[[], bool],
                       progress: Callable[[int, int], None]) -> ImageResult:
        steps = int(params.get("steps", 3))
        for step in range(1, steps + 1):
            if wait_or_cancel(float(params.get("step_delay_s", 0)), cancelled):
                return ImageResult(b"", 0, 0, 0)
            progress(step, steps)
        if prompt == "boom":
            raise RuntimeError("the image model broke")
        return ImageResult(png=b"\x89PNG" + prompt.encode(), width=64, height=32, seed=7)


@pytest.fixture
def image_stub(socket_dir: Path) -> Iterator[backend_pb2_grpc.BackendStub]:
    """The Backend servicer over ImageModel, served in-process on a unix socket."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    backend_pb2_grpc.add_BackendServicer_to_server(BackendServicer(ImageModel(), "img", "i1"), server)
    server.add_insecure_port(f"unix:{socket_dir}/img.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix:{socket_dir}/img.sock")
    try:
        yield backend_pb2_grpc.BackendStub(channel)
    finally:
        channel.close()
        server.stop(0).wait()


def test_generate_image_streams_progress_and_cancels(image_stub: backend_pb2_grpc.BackendStub) -> None:
    ref = backend_pb2.ModelRef(name="img", instance="i1")
    assert image_stub.LoadModel(backend_pb2.LoadModelRequest(model=ref), timeout=5).ok
    events = list(image_stub.GenerateImage(backend_pb2.GenerateImageRequest(model=ref, prompt="cat"), timeout=5))
    assert [(e.progress.step, e.progress.steps) for e in events[:-1]] == [(1, 3), (2, 3), (3, 3)]
    image = events[-1].image
    assert (image.png, image.width, image.height, image.seed) == (b"\x89PNGcat", 64, 32, 7)

    with pytest.raises(grpc.RpcError) as rpc:
        list(image_stub.GenerateImage(backend_pb2.GenerateImageRequest(model=ref, prompt="boom"), timeout=5))
    assert rpc.value.code() == grpc.StatusCode.INTERNAL and "the image model broke" in rpc.value.details()

    slow = backend_pb2.GenerateImageRequest(model=ref, prompt="x", params_json='{"steps": 40, "step_delay_s": 0.2}')
    call = image_stub.GenerateImage(slow, timeout=30)
    assert next(call).progress.step == 1
    call.cancel()

    def status() -> backend_pb2.StatusResponse:
        return image_stub.Status(backend_pb2.StatusRequest(model=ref), timeout=5)

    done = poll(lambda: (s := status()).generations_cancelled == 1 and s.active_calls == 0 and s, 5)
    assert (done.generations_started, done.generations_completed) == (3, 1)


def test_stop_racing_start_never_crashes(backends: Callable[..., BackendProcess]) -> None:
    """stop() from another thread while start() waits for health: grpcio crashes the whole
    process (SIGSEGV) when a stub is made on a channel closed meanwhile, so start() makes its
    stubs under the lock. A crash here would take the test process down with it."""
    for _ in range(15):
        bp = backends()
        starter = threading.Thread(target=_start_quietly, args=(bp,))
        starter.start()
        bp.stop()
        starter.join(20)
        assert not starter.is_alive()


def _start_quietly(bp: BackendProcess) -> None:
    try:
        bp.start()
    except BackendStartError:
        pass  # stopped while starting: the expected outcome of the race


def test_a_backend_whose_worker_died_before_it_started_stops(socket_dir: Path) -> None:
    """The worker passes its pid: a worker SIGKILLed between spawning a backend and the
    backend's start leaves init as the parent, and the backend must stop all the same (it
    once waited on init forever, an orphan holding its model's memory)."""
    import subprocess
    import sys

    gone = subprocess.Popen(["sleep", "60"])
    gone.kill()
    gone.wait()  # a pid that no longer runs: the worker that spawned the backend
    sock = socket_dir / "orphan.sock"
    backend = subprocess.Popen([sys.executable, "-m", "workers.backends.echo", "--socket", str(sock),
                                "--model", "orphan", "--instance", "i-orphan", "--parent-pid", str(gone.pid)],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert poll(lambda: backend.poll() is not None, 20, "the orphaned backend to stop") is True
        assert backend.returncode == 0
        assert "went away; stopping" in backend.stderr.read()
    finally:
        if backend.poll() is None:
            backend.kill()
            backend.wait()
