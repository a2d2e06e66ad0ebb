"""The operator commands (``modelbay models|nodes|jobs|run|cancel|load``) as a user runs them:
the real ``modelbay`` entry point in a subprocess against gunicorn on the session's stack."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from conftest import NODE
from fileserver import FileServer, payload, sha
from helpers import poll, unique

pytestmark = pytest.mark.usefixtures("worker")


def modelbay(url: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBAY_")}
    return subprocess.run([sys.executable, "-m", "modelbay.cli", *args, "--url", url], capture_output=True, text=True,
                          timeout=timeout_s, env=env, check=False)


def register(url: str, manifest: dict) -> str:
    name = unique("cli")
    requests.put(f"{url}/v1/models/{name}", json=manifest, timeout=10).raise_for_status()
    return name


def test_models_nodes_run_jobs_and_cancel(web_url: str) -> None:
    name = register(web_url, {"backend": "echo", "options": {"token_delay_s": 0.2}})
    out = modelbay(web_url, "run", name, "--task", "generate", "--input", "one two three")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == "one two three"
    models = modelbay(web_url, "models")
    assert models.returncode == 0
    assert [name, "echo", "ready", f"{NODE}:ready"] in [line.split() for line in models.stdout.splitlines()]
    assert NODE in modelbay(web_url, "nodes").stdout
    listed = modelbay(web_url, "jobs", "--model", name).stdout
    assert "succeeded" in listed and "inference" in listed and "load" in listed
    job = requests.post(f"{web_url}/v1/jobs", json={"model": name, "task": "generate",
                                                    "input": " ".join(["w"] * 50)}, timeout=10).json()
    cancelled = modelbay(web_url, "cancel", job["id"])
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"{job['id']} cancelled"
    again = modelbay(web_url, "cancel", job["id"])
    assert again.returncode == 2 and "409 job_finished" in again.stderr
    missing = modelbay(web_url, "run", "no-such-model", "--task", "generate", "--input", "x")
    assert missing.returncode == 2 and "404 model_not_found" in missing.stderr


def test_load_wait_shows_byte_progress_until_the_load_ends(web_url: str) -> None:
    server = FileServer()
    try:
        data = payload(3 << 20, seed=11)
        server.files["/cli/weights.bin"] = data
        server.rate_bps = 1 << 20  # about 3 s
        name = register(web_url, {"backend": "echo", "files": [{"uri": server.url("/cli/weights.bin"),
                                                                "sha256": sha(data)}]})
        out = modelbay(web_url, "load", name, "--wait", "--node", NODE, timeout_s=120)
    finally:
        server.close()
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("load ") and f"of {name} on {NODE}" in lines[0]
    assert lines[-1].endswith(": succeeded")
    staged = [line for line in lines if line.startswith("staging 1/1 weights.bin")]
    assert len(staged) >= 2, lines  # progress was shown as it went, with the file and bytes
    assert any("MB/s" in line and "ETA" in line for line in staged), staged
    assert modelbay(web_url, "load", name).stdout.strip() == f"{name} is ready"


def test_run_of_a_failed_job_prints_one_error_line(web_url: str) -> None:
    name = register(web_url, {"backend": "echo", "options": {"fail_load": True}})
    out = modelbay(web_url, "run", name, "--task", "generate", "--input", "x")
    assert out.returncode == 1 and out.stdout == "", out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelbay: ") and "model load failed" in lines[0], out.stderr
    assert "failed)" in lines[0] and "{" not in lines[0]


def test_run_of_a_cancelled_job_prints_one_error_line(web_url: str) -> None:
    name = register(web_url, {"backend": "echo", "options": {"token_delay_s": 0.2}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "modelbay.cli", "run", name, "--task", "generate", "--input",
                             " ".join(["w"] * 300), "--url", web_url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        job = poll(lambda: next(iter(requests.get(f"{web_url}/v1/jobs?model={name}&status=running",
                                                  timeout=10).json()["data"]), None), 30, "the running job")
        assert requests.delete(f"{web_url}/v1/jobs/{job['id']}", timeout=10).status_code == 202
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and stdout == "", stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelbay: ") and f"(job {job['id']} cancelled)" in lines[0], stderr
