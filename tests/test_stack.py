"""The local-stack launcher (:class:`modelbay.stack.LocalStack`, used by ``modelbay up``, these
fixtures and the benchmarks) on its own: one part stops alone, a restarted part comes back as it
was (Valkey on its port with its data, a worker node under its id) and keeps its place in the
stop order, and closing stops every process, the last started first."""
from __future__ import annotations

import os
from pathlib import Path

import redis

from helpers import poll
from modelbay.stack import LocalStack
from tasks.settings import load_settings
from tasks.store import Store


def test_parts_stop_and_restart_alone_and_close_stops_the_rest_in_reverse(tmp_path: Path) -> None:
    node = f"ls{os.getpid()}"
    stopped: list[tuple[str, str]] = []
    with LocalStack(tmp_path / "logs", tmp_path, {"MODELBAY_RUN_DIR": str(tmp_path / "run"),
                                                  "MODELBAY_MODELS_DIR": str(tmp_path / "models")}) as stack:
        valkey = stack.start_valkey(appendonly=True)
        nats = stack.start_nats()
        store = Store.from_settings(load_settings(stack.env), outage_s=30)
        worker = stack.start_worker(node, concurrency=2, ready=lambda: store.get_node(node))
        raw = redis.Redis.from_url(valkey.url)
        raw.set("launcher-test", "kept")

        again = stack.restart(valkey)
        assert valkey.proc.poll() is not None and again.proc.poll() is None
        assert again.url == valkey.url and stack.valkey is again
        assert raw.get("launcher-test") == b"kept"  # same data dir, AOF flushed on SIGTERM

        worker2 = stack.restart(worker)
        assert worker.proc.poll() is not None and worker2.node_id == node
        poll(lambda: (n := store.get_node(node)) is not None and n.pid == worker2.proc.pid, 60, "the new worker")
        assert worker2.log_path == worker.log_path  # it logs where the first one did

        assert stack.stop(nats) == "terminated" and nats.proc.poll() is not None
        assert [p.name for p in stack.parts] == ["valkey", f"worker {node}"]
        stack.close(report=lambda name, how: stopped.append((name, how)))
    assert stopped == [(f"worker {node}", "terminated"), ("valkey", "terminated")]
    assert all(p.proc.poll() is not None for p in (again, worker2))
