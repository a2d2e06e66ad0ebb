"""Staging through the whole stack: a load job stages files from a local HTTP server (the
test's own, throttled, dropping the connection once) into the worker's models dir, with byte
progress in the job record, before the backend loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import poll, unique, wait_job
from tasks.names import model_token
from fileserver import payload, sha

pytestmark = pytest.mark.usefixtures("worker")


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_a_load_stages_over_http_with_progress_and_resumes_a_dropped_connection(client, server, stack_env):
    data = payload(3 << 20, seed=7)
    server.files["/weights/m.bin"] = data
    server.rate_bps = 1.5 * (1 << 20)
    server.drop_after["/weights/m.bin"] = 1 << 20
    name = unique("staged")
    manifest = {"backend": "echo", "files": [{"uri": server.url("/weights/m.bin"), "sha256": sha(data),
                                              "size": len(data)}]}
    assert client.put(f"/v1/models/{name}", json=manifest).status_code == 201
    job = client.post(f"/v1/models/{name}/load").get_json()

    seen_bytes: list[int] = []
    seen_states: set[str] = set()

    def finished() -> dict | None:
        record = client.get(f"/v1/jobs/{job['id']}").get_json()
        progress = record["progress"]
        if progress and progress["phase"] == "staging" and record["status"] == "loading":
            seen_bytes.append(progress["bytes_done"])
            assert progress["bytes_total"] == len(data) and progress["files_total"] == 1
            assert progress["message"] in ("staging 1 file(s). Total: 3.1 MB", ) or \
                progress["message"].startswith("processing file: m.bin. Total: 3.1 MB. Current: ")
        seen_states.update(s["state"] for s in client.get(f"/v1/models/{name}").get_json()["nodes"])
        return record if record["status"] in ("succeeded", "failed", "cancelled") else None

    done = poll(finished, 60, "the staged load", interval_s=0.1)
    assert done["status"] == "succeeded", done
    assert any(0 < b < len(data) for b in seen_bytes), seen_bytes  # progress was visible midway
    assert seen_bytes == sorted(seen_bytes)
    assert "staging" in seen_states and done["progress"]["phase"] == "loading"
    assert any(rng for rng in server.gets("/weights/m.bin")), "the broken transfer resumed with Range"
    staged = Path(stack_env["MODELBAY_MODELS_DIR"]) / model_token(name) / "m.bin"
    assert sha(staged.read_bytes()) == sha(data)
    # A second model sharing the file: no new transfer.
    other = unique("staged")
    assert client.put(f"/v1/models/{other}", json=manifest).status_code == 201
    before = len(server.gets("/weights/m.bin"))
    assert wait_job(client, client.post(f"/v1/models/{other}/load").get_json()["id"])["status"] == "succeeded"
    assert len(server.gets("/weights/m.bin")) == before
    for n in (name, other):
        client.post(f"/v1/models/{n}/unload")


def test_a_corrupted_file_fails_the_load_and_leaves_nothing(client, server, stack_env):
    server.files["/bad.bin"] = payload(256 << 10, seed=8)
    name = unique("corrupt")
    manifest = {"backend": "echo", "files": [{"uri": server.url("/bad.bin"), "sha256": "0" * 64}]}
    assert client.put(f"/v1/models/{name}", json=manifest).status_code == 201
    done = wait_job(client, client.post(f"/v1/models/{name}/load").get_json()["id"])
    assert done["status"] == "failed" and done["error"]["type"] == "hash_mismatch", done
    assert files_under(Path(stack_env["MODELBAY_MODELS_DIR"]) / model_token(name)) == []
    state = client.get(f"/v1/models/{name}").get_json()["nodes"][0]
    assert state["state"] == "failed" and "sha256" in state["error"].lower()
