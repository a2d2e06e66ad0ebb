"""The job path's cost against the queue it rides on: CPU per job in each process, throughput
and serial latency, modelbay and raw Celery measured in the same run on the same Valkey.

Paths:
- ``raw``: ``send_task("bench.noop").get()`` on a bare Celery threads worker (Redis result
  backend) — the baseline, nothing of modelbay;
- ``jobs``: ``POST /v1/jobs`` (generate on echo) then ``GET /v1/jobs/{id}?wait=10`` until done;
- ``jobs1``: the same job in one request, ``POST /v1/jobs?wait=10`` (polling on only if it
  outlives the wait);
- ``embed``: ``POST /v1/embeddings`` on echo (one text, one call; under load a web process's
  calls share jobs, web/openai/coalesce.py: the calls per job are printed).

CPU is read from ``/proc/<pid>/stat`` (utime + stime) of every process of each part (a
part's children included: gunicorn's workers, the worker's backend) before and after each
run; the client is this process. Each client thread keeps one HTTP connection (a
``requests.Session``, as a real client does; ``--client http``: an ``http.client``
connection, a load generator that takes less of the cores it shares with the server).

Serial latency is sampled in rounds: one call of each path in turn, ``--serial`` rounds, so a
drift of this machine's speed during the run (raw Celery's own p50 moved 2-4.5 ms between runs
here) falls on every path alike. Besides each path's p50, the median of its per-round
difference to raw's call is printed. Raw Celery's loaded run is made before and after the
modelbay paths; the ratios are to the mean of the two, and both are printed.

Run from the repo root: ``python -m bench.bench_job_path [--jobs 400] [--clients 16] [--client requests|http]``.
Targets (issue 16) are printed next to the figures; nothing here asserts them.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import requests

from bench.bench_jobs import timed as run
from modelbay.services import Started, descendants
from modelbay.stack import LocalStack

CLK_TCK = os.sysconf("SC_CLK_TCK")
NODE = "bench"
TERMINAL = ("succeeded", "failed", "cancelled")


def cpu_s(pids: set[int]) -> float:
    """utime + stime of ``pids`` in seconds (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """CPU seconds of each named part (its process and all below it)."""

    def __init__(self, parts: dict[str, Started]) -> None:
        self.parts = parts

    def snapshot(self) -> dict[str, float]:
        """The worker's backend processes count apart (``backend``) from the worker itself."""
        out = {name: cpu_s({p.proc.pid} | descendants(p.proc.pid)) for name, p in self.parts.items()
               if name != "worker"}
        worker = self.parts["worker"].proc.pid
        out["worker"] = cpu_s({worker})
        out["backend"] = cpu_s(descendants(worker))
        out["client"] = self_cpu_s()
        return out


class Lean:
    """A keep-alive ``http.client`` connection with ``requests.Session``'s few methods used here:
    the ``--client http`` client, for a load generator that takes less of the cores it shares
    with the server (``requests`` costs about 0.5 ms of CPU per call more on 2 cores)."""

    def __init__(self, base: str) -> None:
        host, _, port = base.split("//", 1)[1].partition(":")
        self.conn = http.client.HTTPConnection(host, int(port or 80), timeout=30)

    def _call(self, method: str, url: str, json_body: object = None, params: dict[str, object] | None = None,
              timeout: float = 30) -> LeanResponse:
        """``timeout`` is taken as ``requests`` takes it; the connection's own is 30 s."""
        path = "/" + url.split("//", 1)[1].partition("/")[2]
        if params:
            path += "?" + urllib.parse.urlencode(params)
        body = json.dumps(json_body).encode() if json_body is not None else None
        self.conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = self.conn.getresponse()
        return LeanResponse(r.status, r.read(), dict(r.getheaders()))

    def post(self, url: str, json: object = None, params: dict[str, object] | None = None,
             timeout: float = 30) -> LeanResponse:
        return self._call("POST", url, json, params, timeout)

    def get(self, url: str, params: dict[str, object] | None = None, timeout: float = 30) -> LeanResponse:
        return self._call("GET", url, None, params, timeout)


class LeanResponse:
    """The few parts of a ``requests.Response`` read here."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status_code, self.content, self.headers = status, body, headers

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> dict[str, object]:
        return json.loads(self.content)


class Http:
    """One connection per client thread: a ``requests.Session`` (``--client requests``, the
    default) or an ``http.client`` connection (``--client http``)."""

    def __init__(self, base: str, client: str = "requests") -> None:
        self.base = base
        self.client = client
        self._local = threading.local()
        self.embed_jobs: list[str] = []  # X-Modelbay-Job of each embeddings call (calls may share a job)

    def session(self) -> requests.Session | Lean:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session() if self.client == "requests" else Lean(self.base)
        return s

    def job(self, wait_on_submit: bool = False) -> None:
        s = self.session()
        job = s.post(f"{self.base}/v1/jobs", json={"model": "echo", "task": "generate", "input": "a b c d"},
                     params={"wait": 10} if wait_on_submit else None, timeout=30).json()
        while job["status"] not in TERMINAL:
            job = s.get(f"{self.base}/v1/jobs/{job['id']}", params={"wait": 10}, timeout=30).json()
        if job["status"] != "succeeded":
            raise RuntimeError(job)

    def embed(self) -> None:
        r = self.session().post(f"{self.base}/v1/embeddings", json={"model": "echo", "input": "hello there"},
                                timeout=30)
        if r.status_code != 200:
            raise RuntimeError(r.text)
        self.embed_jobs.append(r.headers["X-Modelbay-Job"])


def measure(meter: Meter, fn: Callable[[], None], jobs: int, clients: int, http: Http) -> dict[str, object]:
    before = meter.snapshot()
    http.embed_jobs.clear()
    samples, wall = run(fn, jobs, clients)
    after = meter.snapshot()
    cpu_ms = {k: 1000 * (after[k] - before[k]) / jobs for k in after}
    per_job = len(http.embed_jobs) / len(set(http.embed_jobs)) if http.embed_jobs else 1.0
    return {"p50_ms": 1000 * statistics.median(samples), "rate": jobs / wall, "cpu_ms": cpu_ms, "per_job": per_job}


def serial(paths: dict[str, Callable[[], None]], rounds: int, http: Http) -> dict[str, dict[str, float]]:
    """One call of each path in turn, ``rounds`` times: each path's p50 (ms), and the median of
    its per-round difference to raw's call (``gap_ms``); ``per_job``: embed calls per job."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    http.embed_jobs.clear()
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    per_job = len(http.embed_jobs) / len(set(http.embed_jobs)) if http.embed_jobs else 1.0
    raw = samples["raw"]
    return {name: {"p50_ms": 1000 * statistics.median(s), "per_job": per_job if name == "embed" else 1.0,
                   "gap_ms": 1000 * statistics.median(a - b for a, b in zip(s, raw))}
            for name, s in samples.items()}


def start(local: LocalStack, clients: int) -> tuple[dict[str, Started], str]:
    valkey = local.start_valkey(appendonly=False)
    local.start_nats()
    worker = local.start_worker(NODE, concurrency=clients)
    web = local.start_web(workers=2, threads=clients)
    local.wait_http(f"{web.url}/readyz", 60, "modelbay (a worker node is live)")
    raw_url = local.env["MODELBAY_REDIS_URL"].rsplit("/", 1)[0] + "/2"
    raw = local.spawn("raw", [sys.executable, "-m", "celery", "-A", "bench.raw_celery", "worker", "-P", "threads",
                              "-c", str(clients), "--without-gossip", "--without-mingle", "-l", "WARNING"],
                      {"BENCH_REDIS_URL": raw_url, "PYTHONPATH": os.getcwd()})
    os.environ["BENCH_REDIS_URL"] = raw_url
    return {"valkey": valkey, "web": web, "worker": worker, "raw": raw}, web.url


TARGETS = {"jobs": ("server CPU <= 5 ms/job", 5.0), "jobs1": ("server CPU <= 5 ms/job", 5.0),
           "embed": ("server CPU <= 4 ms/job", 4.0)}


def report(serials: dict[str, dict[str, float]], loaded: dict[str, dict[str, object]],
           raw_after: dict[str, object], clients: int) -> None:
    raw_serial = serials["raw"]["p50_ms"]
    raw_rate = (loaded["raw"]["rate"] + raw_after["rate"]) / 2
    raw_server = 0.0
    print(f"{'path':>6} {'p50 1 client':>13} {'jobs/s':>7} {'x raw':>6} | CPU ms per job at {clients} clients:"
          f" {'valkey':>7} {'web':>6} {'worker':>7} {'backend':>8} {'client':>7} {'server':>7} {'x raw':>6}")
    for path, run_ in loaded.items():
        ser = serials[path]
        cpu = run_["cpu_ms"]
        server = cpu["valkey"] + cpu["raw"] if path == "raw" else cpu["valkey"] + cpu["web"] + cpu["worker"] + cpu["backend"]
        raw_server = server if path == "raw" else raw_server
        worker = cpu["raw"] if path == "raw" else cpu["worker"]
        web, backend = (0.0, 0.0) if path == "raw" else (cpu["web"], cpu["backend"])
        print(f"{path:>6} {ser['p50_ms']:>10.2f} ms {run_['rate']:>7.0f} {run_['rate'] / raw_rate:>6.2f} |"
              f"{'':>34} {cpu['valkey']:>7.2f} {web:>6.2f} {worker:>7.2f} {backend:>8.2f} "
              f"{cpu['client']:>7.2f} {server:>7.2f} {server / raw_server:>6.2f}")
        if path == "raw":
            print(f"{'':>6} raw's loaded run before and after the others: {run_['rate']:.0f} and "
                  f"{raw_after['rate']:.0f} jobs/s (the ratios are to their mean, {raw_rate:.0f})")
        if path == "embed":
            print(f"{'':>6} calls per job: {run_['per_job']:.2f} at {clients} clients (calls share jobs under load), "
                  f"{ser['per_job']:.2f} at 1 client")
        if path in TARGETS:
            text, limit = TARGETS[path]
            print(f"{'':>6} targets: {text} ({'met' if server <= limit else 'NOT met'}: {server:.2f}); "
                  f"throughput >= 0.6x raw ({run_['rate'] / raw_rate:.2f}x); "
                  f"serial p50 <= raw + 2 ms ({ser['p50_ms'] - raw_serial:+.2f} ms; "
                  f"per round {ser['gap_ms']:+.2f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=400, help="jobs per loaded run")
    parser.add_argument("--serial", type=int, default=100, help="rounds of the one-client run (one call of each path)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--client", choices=("requests", "http"), default="requests",
                        help="the load generator's HTTP client: requests.Session, or a lean http.client connection")
    parser.add_argument("--paths", default="jobs,jobs1,embed", help="which paths besides raw (comma-separated)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mb-bench-"))
    with LocalStack(tmp, env={"MODELBAY_RUN_DIR": str(tmp / "run"), "MODELBAY_MODELS_DIR": str(tmp / "models"),
                              "MODELBAY_WORKER_METRICS_PORT": "0"}) as local:
        parts, url = start(local, args.clients)
        sys.path.insert(0, os.getcwd())
        from bench.raw_celery import app as raw_app

        http = Http(url, args.client)
        requests.put(f"{url}/v1/models/echo", json={"backend": "echo", "options": {"dim": 8}},
                     timeout=30).raise_for_status()
        paths: dict[str, Callable[[], None]] = {
            "raw": lambda: raw_app.send_task("bench.noop").get(timeout=30), "jobs": http.job,
            "jobs1": lambda: http.job(wait_on_submit=True), "embed": http.embed}
        paths = {k: v for k, v in paths.items() if k == "raw" or k in args.paths.split(",")}
        meter = Meter(parts)
        for fn in paths.values():  # warm up: model loaded, connections open, code paths hot
            run(fn, 4 * args.clients, args.clients)
        serials = serial(paths, args.serial, http)
        loaded = {name: measure(meter, fn, args.jobs, args.clients, http) for name, fn in paths.items()}
        raw_after = measure(meter, paths["raw"], args.jobs, args.clients, http)
        print(f"{os.cpu_count()} CPUs; {args.jobs} jobs at {args.clients} clients, {args.serial} serial; "
              f"web: gunicorn 2 procs x {args.clients} threads; worker: threads x {args.clients}; client: {args.client}")
        report(serials, loaded, raw_after, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
