"""The coalescer's lanes (web/openai/coalesce.py) with threads and a recording ``submit``: who
shares a job, in what order, within which limits, and when a lane's place comes back. The
same through the routes, a real worker and real HTTP is tests/test_openai_coalesce.py."""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from helpers import poll
from tasks.errors import ErrorCode, Unavailable
from tasks.schemas import JobRecord
from web.openai.coalesce import Coalescer, LeftWaiting, Part


class Jobs:
    """A ``submit`` that records the texts of each job it makes (status ``queued``)."""

    def __init__(self, status: str = "queued", fail: BaseException | None = None) -> None:
        self.made: list[list[str]] = []
        self.status = status
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> JobRecord:
        with self.lock:
            self.made.append(list(texts))
            n = len(self.made)
        if self.fail is not None:
            raise self.fail
        return JobRecord(id=f"job{n}", kind="inference", model="m", task="embed", input=texts, status=self.status)


def never() -> bool:
    return False


def joining(co: Coalescer, key: str, texts: list[str], jobs: Callable[[list[str]], JobRecord],
            gone: Callable[[], bool] = never) -> tuple[threading.Thread, dict[str, object]]:
    """``co.join`` in a thread of its own; the dict gets its ``part`` or ``error``."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["part"] = co.join(key, texts, jobs, gone)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def pending(co: Coalescer, key: str) -> int:
    with co._cond:
        lane = co._lanes.get(key)
        return len(lane.pending) if lane else 0


def test_an_idle_lane_sends_a_call_at_once_alone() -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000), Jobs()
    part = co.join("k", ["a"], jobs, never)
    assert jobs.made == [["a"]] and part.start == 0 and part.batch is not None
    assert part.batch.record is not None and part.batch.record.id == "job1"


def test_calls_behind_a_busy_lane_go_as_one_job_in_arrival_order() -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000), Jobs()
    first = co.join("k", ["a"], jobs, never)
    threads = []
    for i, texts in enumerate((["b"], ["c", "d"], ["e"])):
        threads.append(joining(co, "k", texts, jobs))
        poll(lambda: pending(co, "k") == i + 1, 5, "the call to wait for a place")
    assert jobs.made == [["a"]]  # nothing sent while the lane's one job is on its way
    assert first.batch is not None
    co.release(first.batch)
    parts = []
    for t, out in threads:
        t.join(5)
        parts.append(out["part"])
    assert jobs.made == [["a"], ["b", "c", "d", "e"]]
    assert [(p.start, p.texts) for p in parts] == [(0, ["b"]), (1, ["c", "d"]), (3, ["e"])]
    assert len({id(p.batch) for p in parts}) == 1


def test_a_job_holds_at_most_max_texts_and_max_chars() -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=3, max_chars=10), Jobs()
    first = co.join("k", ["x"], jobs, never)
    threads = []
    for i, texts in enumerate((["a", "b"], ["c", "d"], ["eeeeeeeeee"], ["f"])):
        threads.append(joining(co, "k", texts, jobs))
        poll(lambda: pending(co, "k") == i + 1, 5, "the call to wait for a place")
    assert first.batch is not None
    co.release(first.batch)
    for expect in (["a", "b"], ["c", "d"], ["eeeeeeeeee"], ["f"]):  # each job's place comes back in turn
        batch = poll(lambda: next((o["part"].batch for _, o in threads if "part" in o and o["part"].texts == expect),
                                  None), 5, f"the job of {expect}")
        co.release(batch)
    assert jobs.made == [["x"], ["a", "b"], ["c", "d"], ["eeeeeeeeee"], ["f"]]  # 3 texts, 10 chars per job


def test_one_call_larger_than_a_job_still_goes_alone() -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=2, max_chars=4), Jobs()
    part = co.join("k", ["aaaa", "bbbb", "cccc"], jobs, never)
    assert jobs.made == [["aaaa", "bbbb", "cccc"]] and part.start == 0


def test_lanes_are_apart_by_key() -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000), Jobs()
    co.join(("scope1", "m", None), ["a"], jobs, never)
    other = co.join(("scope2", "m", None), ["b"], jobs, never)  # its lane is idle: at once
    assert jobs.made == [["a"], ["b"]] and other.start == 0 and co.lanes() == 2


def test_a_failed_submit_is_every_call_s_error_and_gives_the_place_back() -> None:
    co, ok = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000), Jobs()
    first = co.join("k", ["a"], ok, never)
    failing = Jobs(fail=Unavailable("no live node", code=ErrorCode.NO_NODE))
    threads = [joining(co, "k", [t], failing) for t in ("b", "c")]
    poll(lambda: pending(co, "k") == 2, 5, "both calls to wait")
    assert first.batch is not None
    co.release(first.batch)
    for t, out in threads:
        t.join(5)
        assert isinstance(out.get("error"), Unavailable)
    assert failing.made == [["b", "c"]]
    assert co.join("k", ["d"], ok, never).start == 0  # the lane's place is free again


def test_a_job_that_waits_for_a_load_gives_its_place_back_at_once() -> None:
    co, loading = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000), Jobs(status="loading")
    co.join("k", ["a"], loading, never)
    co.join("k", ["b"], loading, never)  # not held back by the first: it waits for the load, not the lane
    assert loading.made == [["a"], ["b"]] and co.lanes() == 0


def test_a_call_whose_client_goes_while_waiting_leaves_the_lane() -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000, slice_s=0.02), Jobs()
    first = co.join("k", ["a"], jobs, never)
    went = threading.Event()
    t, out = joining(co, "k", ["b"], jobs, gone=went.is_set)
    poll(lambda: pending(co, "k") == 1, 5, "the call to wait")
    went.set()
    t.join(5)
    assert isinstance(out.get("error"), LeftWaiting) and pending(co, "k") == 0
    assert first.batch is not None
    co.release(first.batch)
    assert jobs.made == [["a"]] and co.lanes() == 0  # its texts were never sent


def test_release_is_once_per_batch() -> None:
    co, jobs = Coalescer(max_jobs=2, max_texts=64, max_chars=10_000), Jobs()
    a = co.join("k", ["a"], jobs, never)
    co.join("k", ["b"], jobs, never)
    assert a.batch is not None
    co.release(a.batch)
    co.release(a.batch)  # a second release must not free the other job's place
    t, out = joining(co, "k", ["c"], jobs)
    t.join(5)
    assert "part" in out
    t2, out2 = joining(co, "k", ["d"], jobs)
    poll(lambda: pending(co, "k") == 1, 5, "the fourth call to wait: two jobs are on their way")
    assert jobs.made == [["a"], ["b"], ["c"]]
    co.release(out["part"].batch)  # type: ignore[union-attr]
    t2.join(5)
    assert jobs.made[-1] == ["d"]


@pytest.mark.parametrize("ended", [False, True])
def test_the_last_call_to_leave_cancels_only_a_job_that_has_not_ended(ended: bool) -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000), Jobs()
    first = co.join("k", ["a"], jobs, never)
    threads = [joining(co, "k", [t], jobs) for t in ("b", "c")]
    poll(lambda: pending(co, "k") == 2, 5, "both calls to wait")
    assert first.batch is not None
    co.release(first.batch)
    parts: list[Part] = []
    for t, out in threads:
        t.join(5)
        parts.append(out["part"])  # type: ignore[arg-type]
    batch = parts[0].batch
    assert batch is not None and batch.record is not None
    if ended:
        done = batch.record.model_copy(update={"status": "succeeded"})
        assert batch.watch(lambda: done, 0.01).status == "succeeded"
    assert batch.leave() is False  # one call still reads it
    assert batch.leave() is (not ended)


def test_one_call_reads_the_job_and_the_others_get_what_it_read() -> None:
    co, jobs = Coalescer(max_jobs=1, max_texts=64, max_chars=10_000), Jobs()
    part = co.join("k", ["a"], jobs, never)
    batch = part.batch
    assert batch is not None and batch.record is not None
    reading, release = threading.Event(), threading.Event()
    reads = []
    done = batch.record.model_copy(update={"status": "succeeded", "result": {"embeddings": [[1.0]]}})

    def slow_read() -> JobRecord:
        reads.append(1)
        reading.set()
        release.wait(5)
        return done

    t = threading.Thread(target=lambda: batch.watch(slow_read, 5), daemon=True)
    t.start()
    reading.wait(5)
    other: list[JobRecord] = []
    t2 = threading.Thread(target=lambda: other.append(batch.watch(lambda: reads.append(2) or done, 5)), daemon=True)
    t2.start()
    release.set()
    t.join(5)
    t2.join(5)
    assert reads == [1] and other[0].status == "succeeded"  # the second call did not read the store
