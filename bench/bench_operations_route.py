"""``GET /api/operations`` latency with 1,000 live operations.

The route as a web process serves it: the Flask app from its factory, a real Valkey holding
1,000 load jobs in flight on a live node (the baseline: live nodes, the active-ops set and
its records), and an ops table holding the 1,000 mirrored operations laid over them. Baseline in the same run: ``/healthz``
on the same app (the floor of Flask and the test client).

``python -m bench.bench_operations_route [--ops 1000] [--calls 300]``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tasks.schemas import JobRecord, NodeRecord, utcnow
from modelbay.services import free_port, start_valkey


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-bench-")), appendonly=False)
    try:
        from web import create_app

        env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
        app = create_app({"MODELBAY_ENV": env})
        ext = app.extensions["modelbay"]
        live, store = ext.live, ext.store
        store.heartbeat(NodeRecord(id="n1", hostname="h", celery_hostname="modelbay@n1", pid=1, backends=["echo"],
                                   memory_budget_mb=1, started_at=utcnow(), last_heartbeat=utcnow()))
        for i in range(args.ops):  # 1,000 loads in flight, each in Redis and mirrored live
            store.create_job(JobRecord(id=f"{i:032x}", kind="load", model=f"m{i}", node="n1", status="loading"))
        now = time.time()
        for i in range(args.ops):
            live.table.apply({"v": 1, "op": f"{i:032x}", "kind": "staging", "status": "progress", "seq": 1,
                              "origin": "bench", "model": f"m{i}", "node": "n1", "job": f"{i:032x}",
                              "phase": "staging", "file": "w.bin", "file_index": 1, "files_total": 1,
                              "bytes_done": i, "bytes_total": 10**9, "progress": 0.1, "message": "x",
                              "error": None, "started_at": "2026-11-23T00:00:00.000Z", "ts": now})
        client = app.test_client()

        def timed(path: str) -> list[float]:
            out = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                resp = client.get(path)
                out.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    raise RuntimeError(resp.get_data(as_text=True))
            return out

        assert len(client.get("/api/operations").get_json()["operations"]) == args.ops
        timed("/api/operations")  # warm up
        route, floor = timed("/api/operations"), timed("/healthz")
        p50, p99 = statistics.median(route) * 1e3, sorted(route)[int(0.99 * (len(route) - 1))] * 1e3
        f50 = statistics.median(floor) * 1e3
        print(f"GET /api/operations with {args.ops} live ops: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
              f"over {args.calls} calls; target p50 <= 5 ms: {'met' if p50 <= 5 else 'MISSED'}")
        print(f"floor GET /healthz on the same app: p50 {f50:.3f} ms; ratio {p50 / f50:.1f}x")
        return 0
    finally:
        valkey.stop()


if __name__ == "__main__":
    sys.exit(main())
