"""Cost of merging live progress events into :class:`web.ops.OpsTable`, and of reading it.

- merge: a scripted stream (default 100k events over 1000 live ops: progress, keepalives,
  ~9% of events delivered after their successor (stale), ~2% duplicates; each op completes
  after 60+ events and a fresh op takes its place) is fed to ``apply``. The floor, in the same run, is a
  plain ``rows[op] = event`` loop over the same stream. The events are built before timing
  (the table takes ownership of each dict, so each pass gets fresh copies).
- snapshot: ``snapshot()`` of a table holding 1000 live ops, p50/p99 over many calls; the floor
  is copying and sorting the same 1000 dicts by hand.

Run from the repo root: ``python -m bench.bench_ops [--events 100000] [--ops 1000]``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from web.ops import OpsTable


def make_stream(n_events: int, n_ops: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    live = [f"op-{i}" for i in range(n_ops)]
    seqs = {op: 0 for op in live}
    started = {op: f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.000Z" for i, op in enumerate(live)}
    fresh = n_ops
    held: dict[str, dict[str, Any]] = {}  # an event held back, delivered after its successor
    out: list[dict[str, Any]] = []
    while len(out) < n_events:
        slot = rng.randrange(n_ops)
        op = live[slot]
        seqs[op] += 1
        seq = seqs[op]
        if seq == 1:
            status = "start"
        elif seq >= 60 and rng.random() < 0.1:
            status = "complete"
        else:
            status = "keepalive" if rng.random() < 0.05 else "progress"
        event = {"v": 1, "op": op, "kind": "staging", "status": status, "seq": seq, "origin": "w1:1:abc",
                 "model": "org/model-7b", "node": "gpu-1", "job": op, "phase": "staging",
                 "file": "model-00001-of-00004.safetensors", "file_index": 1, "files_total": 4,
                 "bytes_done": seq * 1_048_576, "bytes_total": 200 * 1_048_576,
                 "progress": min(100.0, seq / 2), "message": None, "error": None,
                 "started_at": started[op], "ts": 1_790_000_000.0 + len(out) / 1000}
        r = rng.random()
        if r < 0.10 and status == "progress" and op not in held:
            held[op] = event  # out of order: it arrives after the next one, and is stale
            continue
        out.append(event)
        if op in held:
            out.append(held.pop(op))
        if r > 0.98:  # duplicate delivery
            out.append(dict(event))
        if status == "complete":
            new = f"op-{fresh}"
            fresh += 1
            live[slot], seqs[new] = new, 0
            started[new] = started[op]
    return out[:n_events]


def time_apply(stream: list[dict[str, Any]], repeat: int) -> tuple[list[float], int]:
    """Per-event seconds of ``apply`` for each pass (fresh table and dicts), and accepted."""
    per_event, accepted = [], 0
    for _ in range(repeat):
        events = [dict(e) for e in stream]
        table = OpsTable()
        apply = table.apply
        t0 = time.perf_counter()
        accepted = sum(1 for e in events if apply(e))
        per_event.append((time.perf_counter() - t0) / len(events))
    return per_event, accepted


def time_floor(stream: list[dict[str, Any]], repeat: int) -> list[float]:
    """Per-event seconds of the floor: ``rows[op] = event``."""
    per_event = []
    for _ in range(repeat):
        events = [dict(e) for e in stream]
        rows: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        for e in events:
            rows[e["op"]] = e
        per_event.append((time.perf_counter() - t0) / len(events))
    return per_event


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_snapshot(stream: list[dict[str, Any]], n_ops: int, calls: int) -> tuple[list[float], list[float], int]:
    table = OpsTable()
    for e in stream[:n_ops * 3]:
        table.apply(dict(e))
    for i in range(n_ops):  # top up to exactly n_ops live rows
        if len(table.snapshot()) >= n_ops:
            break
        table.apply({**stream[0], "op": f"extra-{i}", "seq": 1, "status": "progress"})
    rows = table.snapshot()
    while len(rows) > n_ops:
        table.apply({**rows.pop(), "status": "complete", "seq": 10**9})
    live = len(table.snapshot())
    snap, floor = [], []
    src = {r["op"]: r for r in rows}
    for _ in range(calls):
        t0 = time.perf_counter()
        table.snapshot()
        snap.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copied = [dict(r) for r in src.values()]
        copied.sort(key=lambda r: (r.get("started_at") or "", r["op"]))
        floor.append(time.perf_counter() - t0)
    return snap, floor, live


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--snapshots", type=int, default=1000)
    args = parser.parse_args()
    stream = make_stream(args.events, args.ops)
    statuses: dict[str, int] = {}
    for e in stream:
        statuses[e["status"]] = statuses.get(e["status"], 0) + 1
    print(f"stream: {len(stream)} events over {args.ops} live ops; " +
          ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))

    time_apply(stream[:10_000], 1)  # warm up
    apply_s, accepted = time_apply(stream, args.repeat)
    floor_s = time_floor(stream, args.repeat)
    a, f = statistics.median(apply_s) * 1e6, statistics.median(floor_s) * 1e6
    print(f"merge  apply(): {a:.2f} µs/event (median of {args.repeat} passes, min {min(apply_s) * 1e6:.2f}); "
          f"accepted {accepted}, ignored {len(stream) - accepted} (stale, duplicate, complete of no row)")
    print(f"floor  rows[op] = event: {f:.3f} µs/event; ratio {a / f:.1f}x; target <= 10 µs: "
          f"{'ok' if a <= 10 else 'MISSED'}")

    raw = [json.dumps(e).encode() for e in stream[:10_000]]
    t0 = time.perf_counter()
    for data in raw:
        json.loads(data)
    print(f"context json.loads of one event (the subscriber's decode): "
          f"{(time.perf_counter() - t0) / len(raw) * 1e6:.2f} µs/event")

    snap, sfloor, live = time_snapshot(stream, args.ops, args.snapshots)
    p50, p99 = percentile(snap, 0.5) * 1e3, percentile(snap, 0.99) * 1e3
    print(f"snapshot() with {live} live ops: p50 {p50:.3f} ms, p99 {p99:.3f} ms over {len(snap)} calls; "
          f"target p50 <= 5 ms: {'ok' if p50 <= 5 else 'MISSED'}")
    print(f"floor  copy+sort of the same rows by hand: p50 {percentile(sfloor, 0.5) * 1e3:.3f} ms, "
          f"p99 {percentile(sfloor, 0.99) * 1e3:.3f} ms; ratio {p50 / (percentile(sfloor, 0.5) * 1e3):.2f}x")
    return 0 if a <= 10 and p50 <= 5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
