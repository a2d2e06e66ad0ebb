"""Throughput of ``stage()`` (hashing every byte, fsync, rename) against ``cp`` and ``curl``.

(a) ``file://``: ``cp SRC DST`` vs ``stage()`` of ``file://SRC`` into a fresh models dir.
(b) HTTP: ``curl -s -o DST URL`` vs ``stage()`` of the same URL, served by a child process
    (a ThreadingHTTPServer that answers with ``socket.sendfile``).

The source (random-ish bytes, written once) stays in the page cache, so every run reads from
memory. Each measurement is repeated ``--repeat`` times after one untimed warm-up round, the
cases of a round in a shuffled order (what ran just before matters on a VM); the median
counts. Before each timed run the previous outputs are deleted and ``sync`` flushes dirty
pages, so no run pays for an earlier run's writeback. ``cp`` does not fsync and ``stage()``
does; ``cp+fsync`` (cp, then fsync of its output, both timed) is printed for reference.

Run from the repo root: ``python -m bench.bench_staging [--size-mb 1024] [--repeat 3]``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tasks.schemas import FileSpec, Manifest
from tasks.settings import load_settings
from workers.staging.stage import stage


def make_source(path: Path, size: int) -> str:
    """Write ``size`` bytes of random-ish data (a 16 MiB random block, rotated); its sha256."""
    block = os.urandom(16 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < size:
            chunk = (block[i % len(block):] + block[:i % len(block)])[:size - written]
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            i += 4099
    return digest.hexdigest()


def serve(path: Path) -> None:
    """Serve ``path`` on a free port (printed on stdout) with ``socket.sendfile``, forever."""
    size = path.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.flush()
            with open(path, "rb") as f:
                self.connection.sendfile(f)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    print(httpd.server_port, flush=True)
    httpd.serve_forever()


def clean(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    os.sync()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the child: serve this file
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    size = args.size_mb << 20
    work = Path(tempfile.mkdtemp(prefix="mb-bench-staging-", dir="/tmp"))
    server: subprocess.Popen[str] | None = None
    try:
        src, dst, models = work / "src.bin", work / "dst.bin", work / "models"
        digest = make_source(src, size)
        settings = load_settings({}, models_dir=str(models), file_roots=str(work))
        server = subprocess.Popen([sys.executable, "-m", "bench.bench_staging", "--serve", str(src)],
                                  stdout=subprocess.PIPE, text=True)
        port = server.stdout.readline() if server.stdout is not None else ""
        url = f"http://127.0.0.1:{int(port)}/src.bin"

        def run_stage(uri: str) -> None:
            spec = FileSpec(uri=uri, sha256=digest, size=size, path="w.bin")
            staged = stage("bench", Manifest(backend="echo", files=[spec]), settings, lambda p: None)
            if staged.bytes_copied != size:
                raise RuntimeError(f"stage copied {staged.bytes_copied} bytes, not {size}")

        def cp() -> None:
            subprocess.run(["cp", str(src), str(dst)], check=True)

        def cp_fsync() -> None:
            cp()
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        def curl() -> None:
            subprocess.run(["curl", "-s", "-o", str(dst), url], check=True)

        cases: list[tuple[str, Callable[[], object]]] = [
            ("cp", cp), ("cp+fsync", cp_fsync), ("stage file://", lambda: run_stage(src.as_uri())),
            ("curl", curl), ("stage http://", lambda: run_stage(url))]
        times: dict[str, list[float]] = {name: [] for name, _ in cases}
        with open(src, "rb") as f:  # into the page cache
            while f.read(16 << 20):
                pass
        for round_ in range(args.repeat + 1):
            random.Random(round_).shuffle(cases)  # no case always follows the same one
            for name, fn in cases:
                clean(dst, models)
                elapsed = timed(fn)
                if round_:  # round 0 warms up
                    times[name].append(elapsed)
        clean(dst, models)

        mbps = {name: size / statistics.median(ts) / 1e6 for name, ts in times.items()}
        print(f"{args.size_mb} MiB, median of {args.repeat} (after a warm-up), {os.cpu_count()} CPUs")
        for name in ("cp", "cp+fsync", "stage file://", "curl", "stage http://"):
            ts = times[name]
            runs = ", ".join(f"{size / t / 1e6:.0f}" for t in ts)
            print(f"  {name:14s} {mbps[name]:7.0f} MB/s   (runs: {runs})")
        print(f"  ratio file://  stage / cp       = {mbps['stage file://'] / mbps['cp']:.2f}")
        print(f"  ratio file://  stage / cp+fsync = {mbps['stage file://'] / mbps['cp+fsync']:.2f}")
        print(f"  ratio http://  stage / curl     = {mbps['stage http://'] / mbps['curl']:.2f}")
        hash_rate = hash_throughput()
        print(f"  sha256 alone (hashlib, in memory): {hash_rate:.0f} MB/s")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def hash_throughput() -> float:
    """SHA-256 of 256 MiB already in memory, MB/s: the ceiling for any hashing copy."""
    data = os.urandom(256 << 20)
    t = timed(lambda: hashlib.sha256(data).digest())
    return len(data) / t / 1e6


if __name__ == "__main__":
    sys.exit(main())
