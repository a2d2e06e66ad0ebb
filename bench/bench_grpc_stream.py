"""A Generate call's cost between the worker and a real echo backend process, three ways, same run.

- ``per-token``: a message per token, read through gRPC's default unary-stream call (a
  channel thread hands each message to the reading thread) — how every job ran before;
- ``flush``: the tokens made within ``flush_ms`` of the last message in one message
  (``GenerateRequest.flush_ms``, what a job nobody streams asks for), same channel;
- ``flush+1thread``: the same, on a channel with ``SingleThreadedUnaryStream`` (the stream
  read in the calling thread), which is what the worker runs now.

CPU per call of this process (the worker's side) and of the backend process, from
``getrusage`` and ``/proc/<pid>/stat``, serial and at ``--threads`` threads; the ratio is
against ``per-token`` in the same run. Run from the repo root:
``python -m bench.bench_grpc_stream [--calls 3000] [--threads 8] [--tokens 4]``.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import workers.supervisor.process as process
from workers.supervisor.process import BackendProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")
FLUSH_MS = 250


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pid_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def backend(single_thread: bool, socket_dir: Path) -> BackendProcess:
    """An echo backend whose channel reads streams in a channel thread or in the caller's."""
    saved = process._CHANNEL_OPTIONS
    if not single_thread:
        process._CHANNEL_OPTIONS = [o for o in saved if "SingleThreaded" not in o[0]]
    try:
        bp = BackendProcess("echo", "bench", socket_dir)
        bp.start()
    finally:
        process._CHANNEL_OPTIONS = saved
    bp.load([], "", {"dim": 4}, "", timeout_s=30)
    return bp


def measure(bp: BackendProcess, flush_ms: int, calls: int, threads: int, prompt: str) -> tuple[float, float, float]:
    """(this process's CPU ms per call, the backend's CPU ms per call, calls/s)."""
    def one() -> None:
        text = "".join(c.text for c in bp.generate(prompt, [], {}, 10, flush_ms=flush_ms))
        if text != prompt:
            raise RuntimeError(f"echo answered {text!r}")

    for _ in range(100):  # warm up
        one()
    pid = bp.pid if bp.pid is not None else 0
    mine, theirs, t0 = own_cpu_s(), pid_cpu_s(pid), time.monotonic()
    workers = [threading.Thread(target=lambda: [one() for _ in range(calls // threads)]) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall, n = time.monotonic() - t0, (calls // threads) * threads
    return 1000 * (own_cpu_s() - mine) / n, 1000 * (pid_cpu_s(pid) - theirs) / n, n / wall


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4, help="tokens per generation")
    args = parser.parse_args()
    prompt = " ".join(f"w{i}" for i in range(args.tokens))
    with tempfile.TemporaryDirectory(prefix="mb-grpc-") as tmp:
        multi, single = backend(False, Path(tmp)), backend(True, Path(tmp))
        try:
            ways = {"per-token": (multi, 0), "flush": (multi, FLUSH_MS), "flush+1thread": (single, FLUSH_MS)}
            print(f"{os.cpu_count()} CPUs; {args.calls} Generate calls of {args.tokens} tokens on echo")
            print(f"{'way':>14} {'threads':>7} {'worker ms':>10} {'backend ms':>11} {'calls/s':>8} {'CPU x per-token':>16}")
            for threads in (1, args.threads):
                base = 0.0
                for name, (bp, flush_ms) in ways.items():
                    mine, theirs, rate = measure(bp, flush_ms, args.calls, threads, prompt)
                    base = base or mine + theirs
                    print(f"{name:>14} {threads:>7} {mine:>10.3f} {theirs:>11.3f} {rate:>8.0f} {(mine + theirs) / base:>16.2f}")
        finally:
            multi.stop()
            single.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
