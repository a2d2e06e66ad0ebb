"""The batcher never runs more than ``max_batch_size`` texts in one forward pass: large requests
are split across passes and each caller gets its own rows back, in order
(:mod:`workers.backends.batching`). No ML library: the encode function echoes its texts."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import poll
from workers.backends.batching import BatchCancelled, Batcher


class Echo:
    """An encode function whose row for a text is the text itself; fails on ``poison`` and
    can be held at a gate (``entered`` counts the calls that reached it)."""

    def __init__(self, poison: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.poison = poison
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[str]:
        with self.lock:
            self.calls.append(list(texts))
        self.entered.release()
        self.gate.wait(10)
        if self.poison in texts:
            raise ValueError(f"cannot encode {self.poison!r}")
        return [f"row:{t}" for t in texts]


def texts(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_one_large_request_is_split_into_passes_of_at_most_the_limit() -> None:
    encode = Echo()
    batcher = Batcher(encode, max_batch_size=4, max_delay_s=0.0)
    try:
        rows = batcher.submit(texts("t", 10))
    finally:
        batcher.close()
    assert rows == [f"row:t{i}" for i in range(10)]
    assert [len(c) for c in encode.calls] == [4, 4, 2]
    assert batcher.stats() == {"forward_passes": 3, "texts_encoded": 10, "requests": 1, "max_batch": 4}


def test_concurrent_large_and_small_requests_never_exceed_the_limit() -> None:
    encode = Echo()
    batcher = Batcher(encode, max_batch_size=8, max_delay_s=0.02)
    sizes = [1, 100, 3, 17, 8, 9, 2, 64, 5, 1] * 3
    try:
        with ThreadPoolExecutor(len(sizes)) as pool:
            futures = [pool.submit(batcher.submit, texts(f"r{i}-", n)) for i, n in enumerate(sizes)]
            results = [f.result(30) for f in futures]
    finally:
        batcher.close()
    for i, (n, rows) in enumerate(zip(sizes, results, strict=True)):
        assert rows == [f"row:r{i}-{j}" for j in range(n)]  # its own rows, in its order
    assert all(1 <= len(c) <= 8 for c in encode.calls)
    assert sum(len(c) for c in encode.calls) == sum(sizes) and batcher.max_batch <= 8
    assert batcher.requests == len(sizes)


def test_a_split_request_fills_the_rest_of_an_open_batch() -> None:
    encode = Echo()
    encode.gate.clear()
    batcher = Batcher(encode, max_batch_size=4, max_delay_s=5.0)
    try:
        with ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(batcher.submit, texts("a", 4))  # fills a batch at once
            assert encode.entered.acquire(timeout=5)
            small = pool.submit(batcher.submit, ["b0"])
            poll(lambda: batcher._queue.qsize() == 1, 5, "the small request to be queued")
            large = pool.submit(batcher.submit, texts("c", 6))
            poll(lambda: batcher._queue.qsize() == 2, 5, "the large request to be queued")
            encode.gate.set()
            assert (blocker.result(10), small.result(10), large.result(10)) == (
                [f"row:a{i}" for i in range(4)], ["row:b0"], [f"row:c{i}" for i in range(6)])
    finally:
        batcher.close()
    # b0 and three texts of c share a pass; the rest of c comes next, before anything later.
    assert encode.calls == [texts("a", 4), ["b0", "c0", "c1", "c2"], ["c3", "c4", "c5"]]


def test_a_failing_split_request_fails_alone_and_skips_its_later_passes() -> None:
    encode = Echo(poison="bad1")
    encode.gate.clear()
    batcher = Batcher(encode, max_batch_size=4, max_delay_s=5.0)
    try:
        with ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(batcher.submit, texts("a", 4))
            assert encode.entered.acquire(timeout=5)
            good = pool.submit(batcher.submit, ["g0", "g1"])
            poll(lambda: batcher._queue.qsize() == 1, 5, "the good request to be queued")
            bad = pool.submit(batcher.submit, texts("bad", 9))  # bad0, bad1 share the good's pass
            poll(lambda: batcher._queue.qsize() == 2, 5, "the bad request to be queued")
            encode.gate.set()
            assert blocker.result(10) == [f"row:a{i}" for i in range(4)]
            assert good.result(10) == ["row:g0", "row:g1"]
            with pytest.raises(ValueError, match="bad1"):
                bad.result(10)
    finally:
        batcher.close()
    # The shared pass failed, each piece went again alone; bad2.. never ran.
    assert encode.calls[1:] == [["g0", "g1", "bad0", "bad1"], ["g0", "g1"], ["bad0", "bad1"]]
    assert not any("bad2" in c for c in encode.calls)


def test_a_request_cancelled_between_its_passes_stops_there() -> None:
    encode = Echo()
    encode.gate.clear()
    batcher = Batcher(encode, max_batch_size=2, max_delay_s=0.0)
    gone = threading.Event()
    outcome: dict[str, BaseException] = {}

    def submit() -> None:
        try:
            batcher.submit(texts("t", 10), gone.is_set)
        except BatchCancelled as exc:
            outcome["cancelled"] = exc

    caller = threading.Thread(target=submit)
    try:
        caller.start()
        assert encode.entered.acquire(timeout=5)  # the first pass runs, held at the gate
        gone.set()
        caller.join(5)
        encode.gate.set()
        assert batcher.submit(["after"]) == ["row:after"]
    finally:
        batcher.close()
    assert "cancelled" in outcome
    assert encode.calls == [["t0", "t1"], ["after"]]


def test_close_fails_the_rest_of_a_split_request() -> None:
    encode = Echo()
    encode.gate.clear()
    batcher = Batcher(encode, max_batch_size=2, max_delay_s=0.0)
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(batcher.submit, texts("t", 6))
        assert encode.entered.acquire(timeout=5)
        closer = threading.Thread(target=batcher.close)
        closer.start()
        poll(lambda: batcher._closed, 5, "the batcher to close")
        encode.gate.set()
        closer.join(10)
        with pytest.raises(RuntimeError, match="closed"):
            large.result(10)


def test_an_interactive_request_goes_before_bulk_texts_queued_earlier() -> None:
    """A batch's chunk (bulk) queued before an interactive call: the interactive texts run in
    the very next pass, ahead of the chunk's rest; bulk requests keep their order."""
    from workers.backends.batching import BULK

    encode = Echo()
    encode.gate.clear()  # hold the first pass
    batcher = Batcher(encode, max_batch_size=4, max_delay_s=0.0)
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(batcher.submit, texts("bulk-a", 10), lambda: False, BULK)
            assert encode.entered.acquire(timeout=10)  # bulk-a's first 4 texts are encoding
            second = pool.submit(batcher.submit, texts("bulk-b", 4), lambda: False, BULK)
            poll(lambda: batcher._queue.qsize() >= 2, 10, "bulk-b queued behind bulk-a's rest")
            urgent = pool.submit(batcher.submit, texts("now", 2))
            poll(lambda: batcher._queue.qsize() >= 3, 10, "the interactive call queued")
            encode.gate.set()
            assert urgent.result(10) == ["row:now0", "row:now1"]
            assert first.result(10) == [f"row:bulk-a{i}" for i in range(10)]
            assert second.result(10) == [f"row:bulk-b{i}" for i in range(4)]
    finally:
        batcher.close()
    # The interactive pass opens with "now" and fills with what is most urgent after it.
    assert encode.calls[1][:2] == ["now0", "now1"], encode.calls
    order = [t for call in encode.calls for t in call]
    assert order.index("bulk-a9") < order.index("bulk-b0"), encode.calls  # bulk: first come first served
    assert all(len(call) <= 4 for call in encode.calls)
