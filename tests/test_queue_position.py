"""Where am I in the line: the per-model queue counters (``queue_seq``, ``queue_position``,
``eta_s``) and the throughput reports the heartbeat flushes (:mod:`tasks.modelstats`); unit
tests on fakeredis first, then a real worker with one thread and a slow echo model."""
from __future__ import annotations


import fakeredis
import pytest

from tasks.modelstats import Recorder, Slot, percentile, position, queue_count
from tasks.nodestore import QueueFull
from tasks.schemas import JobRecord
from tasks.settings import Settings
from tasks.store import Store


def _store() -> Store:
    return Store(fakeredis.FakeRedis(decode_responses=True), Settings())


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile(sorted(float(i) for i in range(1, 101)), 0.95) == 95.0


def test_throughput_sums_holders_and_history_steps() -> None:
    store = _store()
    rec = Recorder()
    for ms in (10.0, 20.0, 30.0):
        rec.note("m", ms)
    store.flush_model_stats("n1", rec.drain(), 5.0)
    assert rec.drain() == {}
    store.flush_model_stats("n2", {"m": [40.0, 40.0]}, 5.0)
    got = store.model_throughput("m")
    assert got["holders"] == 2 and got["jobs_per_s"] == pytest.approx(3 / 5 + 2 / 5, rel=0.01)
    assert got["p50_ms"] == pytest.approx((20 * 3 + 40 * 2) / 5)
    history = store.model_history("m", bucket_s=10, span_s=60)
    assert sum(h["jobs"] for h in history) == 5 and history == sorted(history, key=lambda h: h["t"])
    assert store.model_throughput("other") == {"jobs_per_s": 0.0, "p50_ms": None, "p95_ms": None, "holders": 0}
    assert store.eta_s("other", 3) is None and store.eta_s("m", 0) == pytest.approx(1.0, abs=0.1)


def test_slots_count_and_refuse_at_the_cap() -> None:
    store = _store()
    slots = [Slot(cap=2), Slot(cap=2)]
    for slot in slots:
        store.placement_view("m", slot)
    assert [s.seq for s in slots] == [1, 2] and [s.queued for s in slots] == [0, 1]
    with pytest.raises(QueueFull) as err:
        store.placement_view("m", Slot(cap=2))
    assert err.value.status == 429 and err.value.headers["Retry-After"].isdigit()
    assert store.queue_counts("m")["enq"] == "2"  # the refused one took no number
    store.placement_view("m", Slot(cap=0))  # no cap
    store.release_slot("m")
    assert position(2, store.queue_counts("m")) == (1, 2)


def test_transitions_move_the_counters() -> None:
    queued = JobRecord(id="a" * 32, kind="inference", model="m", queue_seq=3)
    running = queued.model_copy(update={"status": "running", "attempts": 1})
    assert queue_count(queued, running) == "started"
    assert queue_count(queued, queued.model_copy(update={"status": "cancelled"})) == "gone"
    assert queue_count(running, running.model_copy(update={"status": "succeeded"})) == ""
    requeued = running.model_copy(update={"status": "queued"})
    assert queue_count(requeued, requeued.model_copy(update={"status": "running", "attempts": 2})) == ""
    assert queue_count(requeued, requeued.model_copy(update={"status": "failed"})) == ""
    unnumbered = queued.model_copy(update={"queue_seq": 0})
    assert queue_count(unnumbered, unnumbered.model_copy(update={"status": "running"})) == ""


def test_cas_moves_counters_atomically() -> None:
    store = _store()
    for _ in range(3):
        store.placement_view("m", Slot(cap=0))
    ids = []
    for seq in (1, 2, 3):
        rec = JobRecord(id=f"{seq:032x}", kind="inference", model="m", queue_seq=seq)
        store.create_job(rec)
        ids.append(rec.id)
    store.transition(ids[0], "running", allowed_from=("queued",), attempts=1)
    store.cancel(ids[1])
    counts = store.queue_counts("m")
    assert (counts["started"], counts["gone"]) == ("1", "1")
    assert position(3, counts) == (0, 1)
    store.finish(ids[0], "succeeded")
    assert store.queue_counts("m") == counts  # ending after a start moves nothing

