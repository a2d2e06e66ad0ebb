"""The OpenAI-compatible routes through the Flask app (test client) and the session's real
worker: response shapes, SSE chunks, error mapping, and the 503 of a load past
``MODELBAY_LOAD_WAIT_S``. The SDK and socket-level tests are in ``test_openai_live.py``."""
from __future__ import annotations

import base64
import json
import struct

import pytest

from helpers import a_roomier_node, unique, unpinned_load_goes_to, wait_job
from workers.backends.echo import embed_text

pytestmark = pytest.mark.usefixtures("worker")


def echo_model(client, **options) -> str:
    name = unique("oai")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo", "options": options}).status_code == 201
    return name


def sse_events(resp) -> list:
    body = resp.get_data(as_text=True)
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    return [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]


def test_chat_completion_shape_and_headers(client) -> None:
    name = echo_model(client)
    resp = client.post("/v1/chat/completions", json={
        "model": name, "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": [{"type": "text", "text": "one two three"}]}],
        "max_tokens": 2, "user": "ignored"})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    job = resp.headers["X-Modelbay-Job"]
    assert body["id"] == f"chatcmpl-{job}" and body["object"] == "chat.completion" and body["model"] == name
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "one two "} and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 2
    record = client.get(f"/v1/jobs/{job}").get_json()
    assert record["status"] == "succeeded" and resp.headers["X-Modelbay-Node"] == record["node"]


def test_chat_stream_chunks_end_with_done(client) -> None:
    name = echo_model(client, token_delay_s=0.01)
    resp = client.post("/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "alpha beta gamma delta"}], "stream": True,
        "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    assert resp.headers["X-Modelbay-Job"] and resp.headers["Cache-Control"] == "no-cache"
    events = sse_events(resp)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "alpha beta gamma delta"
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_completions_plain_and_streamed(client) -> None:
    name = echo_model(client)
    plain = client.post("/v1/completions", json={"model": name, "prompt": "to be or not", "max_tokens": 3}).get_json()
    assert plain["object"] == "text_completion" and plain["choices"][0]["text"] == "to be or "
    assert plain["choices"][0]["finish_reason"] == "length" and plain["usage"]["completion_tokens"] == 3
    streamed = client.post("/v1/completions", json={"model": name, "prompt": ["to be or not"], "stream": True})
    events = sse_events(streamed)
    assert "".join(e["choices"][0]["text"] for e in events) == "to be or not"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_embeddings_float_and_base64(client) -> None:
    name = echo_model(client, dim=6)
    resp = client.post("/v1/embeddings", json={"model": name, "input": ["a", "b c"]})
    body = resp.get_json()
    assert resp.status_code == 200 and body["object"] == "list" and body["model"] == name
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["prompt_tokens"] == 3
    assert body["data"][1]["embedding"] == pytest.approx(embed_text("b c", 6), abs=1e-6)
    packed = client.post("/v1/embeddings", json={"model": name, "input": "a", "encoding_format": "base64"}).get_json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack("<6f", raw)) == pytest.approx(embed_text("a", 6), abs=1e-6)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 1_000_001}]}, "messages"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "a", "logprobs": 3}, None),
    ("/v1/embeddings", {"input": [1, 2, 3]}, "input.0"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": "a", "dimensions": 3}, None),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, "response_format"),
])
def test_bad_requests_are_400_in_the_envelope(client, path: str, body: dict, param: str | None) -> None:
    name = echo_model(client)
    resp = client.post(path, json={"model": name, **body})
    assert resp.status_code == 400, resp.get_json()
    error = resp.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param


def test_unknown_model_is_404_and_backend_refusals_are_400(client) -> None:
    missing = client.post("/v1/chat/completions", json={"model": "no-such-model",
                                                        "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "model_not_found"
    name = echo_model(client)
    bad = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1, "stop": 5})
    assert bad.status_code == 400  # stop must be a string or a list of strings
    image = client.post("/v1/images/generations", json={"model": name, "prompt": "a cat"})
    assert image.status_code == 400 and image.get_json()["error"]["code"] == "unsupported_task"
    assert client.get("/healthz").status_code == 200  # the server stays up


def test_a_load_past_the_wait_answers_503_with_progress_and_goes_on(stack_env) -> None:
    from web import create_app

    client = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_LOAD_WAIT_S": "0.5"}}).test_client()
    name = echo_model(client, load_delay_s=3)
    body = {"model": name, "messages": [{"role": "user", "content": "hello there"}]}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 503, resp.get_json()
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    payload = resp.get_json()
    assert payload["error"]["code"] == "model_loading" and payload["error"]["type"] == "service_unavailable"
    loading = payload["loading"]
    assert loading["model"] == name and loading["job"] and loading["phase"] in ("queued", "loading")
    assert set(loading) >= {"progress", "bytes_done", "bytes_total", "file_index", "files_total", "eta_s"}
    # The call's job is cancelled; its load goes on and succeeds; a retry is served from it.
    assert client.get(f"/v1/jobs/{resp.headers['X-Modelbay-Job']}").get_json()["status"] == "cancelled"
    assert wait_job(client, loading["job"], 30)["status"] == "succeeded"
    again = client.post("/v1/chat/completions", json=body)
    assert again.status_code == 200 and again.get_json()["choices"][0]["message"]["content"] == "hello there"
    loads = [j for j in client.get(f"/v1/jobs?model={name}").get_json()["data"] if j["kind"] == "load"]
    assert [j["id"] for j in loads] == [loading["job"]]


def test_models_list_is_openai_shaped(client) -> None:
    name = echo_model(client)
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    entry = next(m for m in body["data"] if m["id"] == name)
    assert entry["object"] == "model" and entry["owned_by"] == "modelbay" and isinstance(entry["created"], int)


def test_a_pin_header_places_the_load_the_call_triggers(client, stack_env, artifacts, store) -> None:
    from conftest import NODE

    name = echo_model(client)
    body = {"model": name, "messages": [{"role": "user", "content": "pinned"}]}
    with a_roomier_node(stack_env, artifacts, store, "oaibig") as roomier:
        unpinned_load_goes_to(client, roomier)
        resp = client.post("/v1/chat/completions", json=body, headers={"X-Modelbay-Node": NODE})
        assert resp.status_code == 200 and resp.headers["X-Modelbay-Node"] == NODE
        assert resp.get_json()["choices"][0]["message"]["content"] == "pinned"
        jobs = client.get(f"/v1/jobs?model={name}").get_json()["data"]
        loads = [j for j in jobs if j["kind"] == "load"]
        assert len(loads) == 1 and loads[0]["node"] == NODE
        # The model is ready (and serves) a moment before its load's record is written as ended.
        assert wait_job(client, loads[0]["id"])["status"] == "succeeded"
        assert [j["node"] for j in jobs if j["kind"] == "inference"] == [NODE]
    other = client.post("/v1/chat/completions", json=body, headers={"X-Modelbay-Node": "no-such-node"})
    assert other.status_code == 404 and other.get_json()["error"]["param"] == "node"
