"""A batch survives a worker SIGKILLed in the middle: two worker nodes on their own Valkey, both
holding the model; one is killed while chunks run on it. The reaper requeues its running chunk
jobs (and the messages it had taken), a chunk that runs again overwrites its own part, and
every ``custom_id`` is in the output exactly once, with exact counts."""
from __future__ import annotations

import io
import json
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Worker, poll, start_worker, unique, wait_job
from modelbay.services import Service, free_port, start_valkey
from tasks.settings import load_settings
from tasks.store import Store

LINES = 2000


@pytest.fixture(scope="module")
def pair(nats: Service, artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-batch-")), free_port(), appendonly=False)
    run = tmp_path_factory.mktemp("batchfaults")
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(run),
           "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_FILES_URL": str(run / "files"),
           "MODELBAY_NODE_TTL_S": "2", "MODELBAY_REAPER_INTERVAL_S": "0.5", "MODELBAY_STRANDED_S": "3",
           "MODELBAY_WORKER_STOP_GRACE_S": "3", "MODELBAY_BACKEND_STOP_GRACE_S": "2",
           "MODELBAY_CANCEL_POLL_S": "0.05", "MODELBAY_BATCH_CHUNK_LINES": "50"}
    store = Store.from_settings(load_settings(env), outage_s=30)
    workers: dict[str, Worker] = {}
    try:
        for node in (f"ba{os.getpid()}", f"bb{os.getpid()}"):
            workers[node] = start_worker(env, node, artifacts, store, concurrency=4)
        from web import create_app

        client = create_app({"TESTING": True, "MODELBAY_ENV": env}).test_client()
        yield {"client": client, "store": store, "workers": workers}
    finally:
        for w in workers.values():
            w.stop(10)
        valkey.stop()


def test_a_worker_killed_mid_batch_loses_no_line_and_doubles_none(pair: dict) -> None:
    client, store, workers = pair["client"], pair["store"], pair["workers"]
    name = unique("bk")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo", "options": {"token_delay_s": 0.01}}).status_code == 201
    for node in workers:  # both hold it, so both take chunks
        resp = client.post(f"/v1/models/{name}/load", headers={"X-Modelbay-Node": node})
        if resp.status_code == 202:
            assert wait_job(client, resp.get_json()["id"], 60)["status"] == "succeeded"
    lines = [{"custom_id": f"k{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": name, "messages": [{"role": "user", "content": "a b c d e"}]}} for i in range(LINES)]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(data), "in.jsonl")},
                         content_type="multipart/form-data")
    assert upload.status_code == 200, upload.get_json()
    created = client.post("/v1/batches", json={"input_file_id": upload.get_json()["id"],
                                               "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert created.status_code == 200, created.get_json()
    batch_id = created.get_json()["id"]

    def progress() -> dict:
        return client.get(f"/v1/batches/{batch_id}").get_json()

    poll(lambda: progress()["request_counts"]["completed"] >= LINES // 5, 180, "a fifth of the lines")
    running = store.jobs(list(store.batches.chunk_jobs(batch_id).values()))
    nodes = Counter(j.node for j in running.values() if j.status == "running")
    victim = max(workers, key=lambda n: nodes.get(n, 0))
    assert nodes.get(victim, 0) > 0, nodes  # it dies with chunks in flight
    workers[victim].proc.send_signal(signal.SIGKILL)
    try:
        ended = poll(lambda: (b := progress())["status"] in ("completed", "failed", "expired", "cancelled") and b,
                     150, "the batch to end")
    except AssertionError as exc:  # say what is stuck: the unfinished chunk jobs and the queues
        jobs = store.jobs(list(store.batches.chunk_jobs(batch_id).values())).values()
        stuck = Counter((j.status, j.node, j.attempts, j.routed) for j in jobs if not j.terminal)
        raise AssertionError(f"{exc}; batch {progress()}; unfinished chunk jobs (status, node, attempts, routed): "
                             f"{dict(stuck)}; keys: {sorted(store._r.keys('*bk*'))}; "
                             f"unacked: {store._r.hlen('unacked')}") from None
    assert ended["status"] == "completed", ended
    assert ended["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}, ended
    out = client.get(f"/v1/files/{ended['output_file_id']}/content").get_data().splitlines()
    seen = Counter(json.loads(raw)["custom_id"] for raw in out if raw.strip())
    assert seen == Counter(x["custom_id"] for x in lines), (len(seen), [k for k, v in seen.items() if v > 1][:5])
    assert ended["error_file_id"] is None
    chunks = store.jobs(list(store.batches.chunk_jobs(batch_id).values())).values()
    assert any(j.attempts >= 2 for j in chunks)  # the reaper sent the killed node's chunks again
    assert all(j.status == "succeeded" for j in chunks)
