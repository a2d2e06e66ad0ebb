"""Latency of an echo job through the whole stack vs a raw Celery round trip.

modelbay: ``POST /v1/jobs`` on gunicorn, then ``GET /v1/jobs/{id}?wait=30`` until the job
is terminal: HTTP → Valkey → Celery worker (threads) → gRPC echo backend → Valkey → HTTP.
Baseline: ``send_task("bench.noop").get()`` against a bare Celery threads worker with a
Redis result backend, on the same Valkey, in the same run.

Run from the repo root: ``python -m bench.bench_jobs [--jobs 200] [--clients 8]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench.stack import running_stack


def summarize(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"median_ms": statistics.median(ordered) * 1000, "p99_ms": p99 * 1000,
            "mean_ms": statistics.fmean(ordered) * 1000}


def timed(fn, n: int, clients: int) -> tuple[list[float], float]:
    """Run ``fn`` ``n`` times on ``clients`` threads; per-call seconds and the wall time."""
    def one(_: int) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(one, range(n)))
    return samples, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with running_stack(concurrency=8) as stack:
        raw_env = {"BENCH_REDIS_URL": stack.local.env["MODELBAY_REDIS_URL"].rsplit("/", 1)[0] + "/2",
                   "PYTHONPATH": os.getcwd()}
        stack.local.spawn("raw", [sys.executable, "-m", "celery", "-A", "bench.raw_celery", "worker", "-P",
                                  "threads", "-c", "8", "--without-gossip", "--without-mingle", "-l", "WARNING"],
                          raw_env)
        stack.register("echo", {"backend": "echo", "options": {"dim": 8}})
        stack.load("echo")

        def modelbay_job() -> None:
            stack.job({"model": "echo", "task": "generate", "input": "a b c d"})

        sys.path.insert(0, os.getcwd())
        os.environ["BENCH_REDIS_URL"] = raw_env["BENCH_REDIS_URL"]
        from bench.raw_celery import app as raw_app

        def celery_job() -> None:
            raw_app.send_task("bench.noop").get(timeout=30)

        celery_job()  # warm up: the raw worker is up and connected
        for fn in (modelbay_job, celery_job):
            timed(fn, 20, 1)
        rows = []
        for clients in (1, args.clients):
            mb, mb_wall = timed(modelbay_job, args.jobs, clients)
            raw, raw_wall = timed(celery_job, args.jobs, clients)
            m, r = summarize(mb), summarize(raw)
            rows.append((clients, m, r, args.jobs / mb_wall, args.jobs / raw_wall))
        print(f"{args.jobs} jobs each; modelbay = HTTP submit + long-poll to completion (echo via gRPC); "
              f"baseline = raw Celery send_task().get() of a no-op (threads pool, same Valkey)")
        print(f"{'clients':>7} | {'modelbay median':>15} {'p99':>8} {'jobs/s':>7} | "
              f"{'celery median':>13} {'p99':>8} {'jobs/s':>7} | {'ratio (median)':>14}")
        for clients, m, r, mb_rate, raw_rate in rows:
            print(f"{clients:>7} | {m['median_ms']:>12.2f} ms {m['p99_ms']:>5.1f} ms {mb_rate:>7.0f} | "
                  f"{r['median_ms']:>10.2f} ms {r['p99_ms']:>5.1f} ms {raw_rate:>7.0f} | "
                  f"{m['median_ms'] / r['median_ms']:>13.2f}x")
        return 0


if __name__ == "__main__":
    sys.exit(main())
