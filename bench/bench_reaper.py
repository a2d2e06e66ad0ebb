"""What one reaper round costs in Redis with a large catalog (docs/reliability.md).

A real valkey-server, ``--models`` manifests registered, ``--nodes`` live node records each
holding every model ``ready``, ``--jobs`` inference jobs ``running`` on them. Then
:meth:`workers.node.reaper.Reaper.run_once` is timed over ``--rounds`` rounds, and the commands it
sent are read from ``INFO commandstats`` before and after (so Valkey itself counts them).
Two cases: nothing wrong, and ``--orphans`` model queues due for a sweep each round (each
with a holder: the common case of an unload on one node of a model that another holds).

Run from the repo root: ``python -m bench.bench_reaper [--models 1000] [--rounds 200]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tasks.celery_app import make_celery
from tasks.dispatch import Dispatcher
from tasks.keys import REAPER_LOCK
from workers.node.reaper import Reaper
from tasks.schemas import JobRecord, Manifest, ModelNode, NodeRecord, utcnow
from modelbay.services import start_valkey
from tasks.settings import load_settings
from tasks.store import Store
from workers.node.stranded import mark_orphaned

# ``store._r``: the store's private Redis client, for the keys and command counts this bench reads directly.


def commands(store: Store) -> dict[str, int]:
    stats = store._r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def measure(store: Store, reaper: Reaper, rounds: int, before_round: object = None) -> dict[str, object]:
    times_s: list[float] = []
    start = commands(store)
    for _ in range(rounds):
        store._r.delete(REAPER_LOCK)
        if callable(before_round):
            before_round()
        began = time.perf_counter()
        reaper.run_once()
        times_s.append(time.perf_counter() - began)
    end = commands(store)
    per_round = {k: round((end.get(k, 0) - start.get(k, 0)) / rounds, 2) for k in end
                 if end.get(k, 0) != start.get(k, 0) and k not in ("info", "del", "zadd")}  # the bench's own
    return {"ms_per_round_median": round(statistics.median(times_s) * 1000, 3),
            "commands_per_round": per_round, "commands_per_round_total": round(sum(per_round.values()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--orphans", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-bench-reaper-")), appendonly=False)
    try:
        settings = load_settings({"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NODE_ID": "bench",
                                  "MODELBAY_NODE_TTL_S": "600", "MODELBAY_STRANDED_S": "0"})
        store = Store.from_settings(settings)
        names = [f"m{i:04d}" for i in range(args.models)]
        for name in names:
            store.put_manifest(name, Manifest(backend="echo"))
        for n in range(args.nodes):
            node = f"n{n}"
            store.heartbeat(NodeRecord(id=node, hostname=node, celery_hostname=node, pid=n, backends=["echo"],
                                       memory_budget_mb=1, started_at=utcnow(), last_heartbeat=utcnow(),
                                       instance=f"i{n}"))
            for name in names:
                store.set_model_state(ModelNode(model=name, node=node, state="ready"))
        for j in range(args.jobs):
            job = JobRecord(id=f"j{j}", kind="inference", model=names[j % len(names)], node=f"n{j % args.nodes}",
                            runner=f"i{j % args.nodes}", routed=1)
            store.create_job(job)
            store.transition(job.id, "running")
        reaper = Reaper(store, Dispatcher(store, make_celery(settings)), settings, "bench")
        quiet = measure(store, reaper, args.rounds)
        swept = measure(store, reaper, args.rounds,
                        lambda: mark_orphaned(store, names[:args.orphans], time.time() - 1))
        interval_s = load_settings({}).reaper_interval_s
        print(json.dumps({"models": args.models, "nodes": args.nodes, "running_jobs": args.jobs,
                          "reaper_interval_s": interval_s, "rounds_per_minute": 60 / interval_s,
                          "nothing_wrong": quiet, f"{args.orphans}_orphans_each_round": swept}, indent=1))
    finally:
        valkey.stop()


if __name__ == "__main__":
    main()
