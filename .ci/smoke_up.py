"""CI smoke test of the README's first command, run as a new user runs it.

It copies the checkout (tracked and untracked, not ignored, files) into a scratch folder, so
the command's fresh ``.venv`` holds only what the README installs (the ``demo`` extra), runs
that command as written plus ``--port`` (a free one) and ``--data-dir``, and then over HTTP:
echo generates, minilm embeds (384 floats) and smollm2 chats. Then Ctrl-C (SIGINT to the
command's process group, as a terminal sends it) must stop everything it started.

Standard library only (``modelbay.services`` is too): it runs before any venv exists. Exit status 0 = the first run works.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modelbay.services import descendants, free_port  # noqa: E402  (standard library only)

INSTALL_AND_START_S = 45 * 60  # a fresh machine compiles llama.cpp (about 10 minutes on 2 cores)
JOB_S = 300                    # a demo model's first job loads it
STOP_S = 90


def readme_first_command() -> str:
    fences = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    command = fences[0].strip()
    if "modelbay up" not in command or "\n" in command:
        raise SystemExit(f"smoke: the README's first command is not one `modelbay up` line: {command!r}")
    return command


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def call(method: str, url: str, body: dict | None = None, timeout_s: float = 30) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def run_job(base: str, body: dict) -> dict:
    job = call("POST", f"{base}/v1/jobs", body)
    deadline = time.monotonic() + JOB_S
    while time.monotonic() < deadline:
        job = call("GET", f"{base}/v1/jobs/{job['id']}?wait=20", timeout_s=40)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
    if job["status"] != "succeeded":
        raise AssertionError(f"{body['model']} {body['task']}: {json.dumps(job)[:2000]}")
    return job["result"]


def check(base: str) -> None:
    echo = run_job(base, {"model": "echo", "task": "generate", "input": "hello from modelbay"})
    if echo["text"] != "hello from modelbay":
        raise AssertionError(f"echo: {echo}")
    print("smoke: echo generates", flush=True)
    emb = run_job(base, {"model": "minilm", "task": "embed", "input": ["A cat sat on the mat."]})
    if emb["dim"] != 384 or len(emb["embeddings"][0]) != 384:
        raise AssertionError(f"minilm: dim {emb.get('dim')}")
    print("smoke: minilm embeds (384 floats)", flush=True)
    chat = run_job(base, {"model": "smollm2", "task": "chat", "input": [{"role": "user", "content": "What is 2 + 2?"}],
                          "params": {"max_tokens": 16, "temperature": 0}})
    if not chat["text"].strip() or chat["usage"]["completion_tokens"] < 1:
        raise AssertionError(f"smollm2: {chat}")
    print(f"smoke: smollm2 chats: {chat['text'][:80]!r}", flush=True)


def main() -> int:
    command = readme_first_command()
    scratch = Path(tempfile.mkdtemp(prefix="modelbay-smoke-"))
    copy_checkout(scratch)
    port = free_port()
    full = f"{command} --port {port} --data-dir {scratch / 'data'}"
    print(f"smoke: in {scratch}: {full}", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBAY_")}
    log_path = scratch / "smoke.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", full], cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    started: set[int] = set()
    ok = False
    try:
        deadline = time.monotonic() + INSTALL_AND_START_S
        while "modelbay is up at" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("modelbay up did not come up")
            time.sleep(2)
        print("smoke: modelbay is up", flush=True)
        check(f"http://127.0.0.1:{port}")
        started = descendants(proc.pid)
        ok = True
    except (AssertionError, OSError) as exc:
        print(f"smoke: FAILED: {exc}", flush=True)
    finally:
        started |= descendants(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            ok = False
            print(f"smoke: FAILED: still running {STOP_S}s after Ctrl-C", flush=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 15
    while (left := sorted(p for p in started if alive(p))) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        ok = False
        print(f"smoke: FAILED: processes left running after Ctrl-C: {left}", flush=True)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    if ok and proc.returncode != 0:
        ok = False
        print(f"smoke: FAILED: modelbay up exited with {proc.returncode} after Ctrl-C", flush=True)
    if not ok:
        print("smoke: the command's output (last 60 lines):\n" +
              "\n".join(log_path.read_text(errors="replace").splitlines()[-60:]), flush=True)
        for worker_log in sorted((scratch / "data/logs").glob("*.log")):
            print(f"--- {worker_log.name} (last 20 lines)\n" +
                  "\n".join(worker_log.read_text(errors="replace").splitlines()[-20:]), flush=True)
        return 1
    print(f"smoke: ok; {len(started)} processes started and all stopped on Ctrl-C", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
