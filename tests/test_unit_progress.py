"""The debouncer's output for scripted tick streams (no servers, scripted clock and timer)."""
from __future__ import annotations

from typing import Any

import fakeredis

from tasks.schemas import JobRecord
from tasks.settings import load_settings
from tasks.store import Store, new_job_id
from workers.progress.debounce import Debouncer, human_bytes, job_progress_sink, to_job_progress


class Script:
    """A clock the test moves, and a timer queue it fires by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Any]] = []
        self.out: list[tuple[float, str, int]] = []

    def clock(self) -> float:
        return self.now

    def schedule(self, delay_s: float, fn: Any) -> None:
        self.timers.append((self.now + delay_s, fn))

    def advance(self, to: float) -> None:
        """Move time to ``to``, firing due timers in order."""
        while True:
            due = sorted((t for t in self.timers if t[0] <= to), key=lambda t: t[0])
            if not due:
                break
            when, fn = due[0]
            self.timers.remove(due[0])
            self.now = when
            fn()
        self.now = to

    def debouncer(self, interval_s: float = 1.0) -> Debouncer:
        return Debouncer(lambda e, s: self.out.append((self.now, e, s["bytes_done"])), interval_s,
                         clock=self.clock, schedule=self.schedule)


def test_leading_edge_then_trailing_flush_of_the_latest_tick():
    s = Script()
    d = s.debouncer()
    for t, done in [(0.0, 1), (0.1, 2), (0.5, 3), (0.9, 4)]:
        s.advance(t)
        d.submit("progress", {"bytes_done": done})
    s.advance(5.0)
    assert s.out == [(0.0, "progress", 1), (1.0, "progress", 4)]


def test_a_stall_never_hides_the_last_bytes():
    s = Script()
    d = s.debouncer()
    d.submit("progress", {"bytes_done": 10})
    s.advance(0.2)
    d.submit("progress", {"bytes_done": 20})  # then nothing more arrives for a long time
    s.advance(60.0)
    assert s.out[-1] == (1.0, "progress", 20)


def test_steady_ticks_are_bounded_to_one_per_interval():
    s = Script()
    d = s.debouncer(interval_s=1.0)
    for i in range(1000):  # a tick every 10 ms for 10 s
        s.advance(i * 0.01)
        d.submit("progress", {"bytes_done": i})
    s.advance(20.0)
    times = [t for t, _, _ in s.out]
    assert 10 <= len(times) <= 12
    assert all(b - a >= 0.999 for a, b in zip(times, times[1:]))
    assert s.out[-1][2] == 999


def test_transitions_are_never_dropped_or_delayed_and_cancel_a_stale_flush():
    s = Script()
    d = s.debouncer()
    d.submit("start", {"bytes_done": 0})
    d.submit("progress", {"bytes_done": 1})
    s.advance(0.1)
    d.submit("progress", {"bytes_done": 2})
    d.submit("file_complete", {"bytes_done": 3})
    d.submit("complete", {"bytes_done": 3})
    d.submit("loading", {"bytes_done": 3})
    s.advance(10.0)
    # The tick right after "start" falls in start's interval and is held; the transition
    # that follows replaces it, and no stale flush comes after the transitions.
    assert [(e, b) for _, e, b in s.out] == [("start", 0), ("file_complete", 3), ("complete", 3), ("loading", 3)]
    assert all(t == 0.0 or t == 0.1 for t, _, _ in s.out)


def test_an_emit_that_raises_never_reaches_the_caller():
    """Every emit raises; the caller sees no exception, and a failed emit costs nothing
    else: each later transition and the trailing flush are still attempted, in order."""
    s = Script()
    attempts: list[tuple[float, str, int]] = []

    def boom(event: str, state: dict) -> None:
        attempts.append((s.now, event, state["bytes_done"]))
        raise ConnectionError("store down")

    d = Debouncer(boom, 1.0, clock=s.clock, schedule=s.schedule)
    d.submit("start", {"bytes_done": 0})  # no exception
    s.advance(0.2)
    d.submit("progress", {"bytes_done": 5})  # inside start's interval: held for the flush
    s.advance(5.0)  # the trailing flush fires, and raises inside the timer
    d.submit("progress", {"bytes_done": 7})  # a leading-edge tick after the failures
    d.submit("complete", {"bytes_done": 10})
    assert attempts == [(0.0, "start", 0), (1.0, "progress", 5), (5.0, "progress", 7), (5.0, "complete", 10)]


def test_progress_message_and_job_record():
    p = to_job_progress("progress", {"file": "model.gguf", "file_index": 1, "files_total": 2,
                                     "bytes_done": 300_000_000, "bytes_total": 1_200_000_000})
    assert p.progress == 25.0 and p.phase == "staging"
    assert p.message == "processing file: model.gguf. Total: 1.2 GB. Current: 300.0 MB"
    assert human_bytes(512) == "512 B" and human_bytes(None) == "?"
    store = Store(fakeredis.FakeRedis(decode_responses=True), load_settings({}))
    job = store.create_job(JobRecord(id=new_job_id(), kind="load", model="m"))
    sink = job_progress_sink(store, job.id, interval_s=60)
    sink("start", {"bytes_done": 0, "bytes_total": 10, "files_total": 1, "file_index": 0})
    sink("progress", {"bytes_done": 5, "bytes_total": 10})  # inside the interval: held back
    assert store.get_job(job.id).progress.bytes_done == 0
    sink("complete", {"bytes_done": 10, "bytes_total": 10})
    assert store.get_job(job.id).progress.progress == 100.0


def test_the_loading_phase_has_no_percentage():
    p = to_job_progress("loading", {"message": "loading m on n1", "bytes_done": 10, "bytes_total": 10})
    assert p.phase == "loading" and p.progress is None and p.message == "loading m on n1"


def test_the_cli_shows_loading_without_a_percentage(capsys):
    from modelbay.commands import _Lines, describe

    staging = {"phase": "staging", "file": "w.bin", "file_index": 1, "files_total": 1, "bytes_done": 5_000_000,
               "bytes_total": 10_000_000, "progress": 50.0}
    assert describe(staging) == "staging 1/1 w.bin 5.0/10.0 MB 50.0%"
    loading = {**staging, "phase": "loading", "kind": "loading", "bytes_done": 10_000_000, "progress": None}
    assert describe(loading) == "loading…"
    lines = _Lines()
    lines.update(staging)
    lines.update(loading)
    assert capsys.readouterr().out.splitlines() == ["staging 1/1 w.bin 5.0/10.0 MB 50.0%", "loading…"]


class _Bus:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def publish(self, subject: str, data: bytes) -> None:
        import json

        self.sent.append(json.loads(data))


def test_a_quiet_inference_operation_publishes_nothing_unless_it_outlives_its_quiet_time(monkeypatch):
    """A job that ends inside ``quiet_s`` sends no NATS event at all; one that runs longer
    shows up with its latest details, then ends with a ``complete``."""
    import workers.progress.live as live

    now = [1000.0]
    monkeypatch.setattr(live.time, "monotonic", lambda: now[0])
    bus = _Bus()
    publisher = live.LivePublisher(load_settings({"MODELBAY_PROGRESS_INTERVAL_S": "0"}), bus)  # type: ignore[arg-type]
    short = publisher.operation("j1", "inference", "m", "j1", quiet_s=1.0)
    short.update("start", {"message": "generating"})
    short.update("progress", {"message": "generated 1 token(s)", "progress": 50.0})
    short.done()
    short.keepalive()
    assert bus.sent == []
    slow = publisher.operation("j2", "inference", "m", "j2", quiet_s=1.0)
    slow.update("start", {"message": "generating"})
    now[0] += 1.5
    slow.update("progress", {"message": "generated 3 token(s)", "progress": 30.0})
    slow.done()
    assert [(e["op"], e["status"]) for e in bus.sent] == [("j2", "progress"), ("j2", "complete")]
    assert bus.sent[0]["message"] == "generated 3 token(s)" and bus.sent[0]["progress"] == 30.0
    loud = publisher.operation("j3", "staging", "m", "j3")  # a load's operation is never quiet
    loud.update("start", {"message": "staging"})
    assert bus.sent[-1]["op"] == "j3" and bus.sent[-1]["status"] == "start"


def test_celery_events_follow_the_setting():
    from tasks.celery_app import make_celery

    assert make_celery(load_settings({})).conf.worker_send_task_events is False
    on = make_celery(load_settings({"MODELBAY_CELERY_EVENTS": "1"})).conf
    assert on.worker_send_task_events is True and on.task_send_sent_event is True
