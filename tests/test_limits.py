"""Request limits (``web/limits.py``): each is a 400 ``limit_exceeded`` naming the field,
on ``/v1/jobs`` and on the OpenAI-compatible routes, and nothing is queued. A body over
``MODELBAY_MAX_BODY_MB`` is a 413 that reaches clients which send the whole body before
reading (urllib, ``requests``), through real gunicorn."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from helpers import gunicorn, unique

# ``store._r``: the store's private Redis client, for the keys these tests look at directly.

pytestmark = pytest.mark.usefixtures("worker")

LIMITS = {"MODELBAY_MAX_INPUTS": "3", "MODELBAY_MAX_INPUT_CHARS": "50", "MODELBAY_MAX_TOKENS_LIMIT": "10",
          "MODELBAY_MAX_IMAGE_SIDE_PX": "64", "MODELBAY_MAX_IMAGE_STEPS": "5", "MODELBAY_MAX_BODY_MB": "0.01"}


@pytest.fixture(scope="module")
def small(stack_env):
    """The app with small limits, and every task message it sends to the broker (its Celery
    app's ``send_task`` records each call, then sends)."""
    from web import create_app

    app = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, **LIMITS}})
    celery = app.extensions["modelbay"].celery
    sent: list[tuple[str, str | None]] = []
    send = celery.send_task

    def recording_send(name, *args, **kwargs):
        sent.append((name, kwargs.get("queue")))
        return send(name, *args, **kwargs)

    celery.send_task = recording_send
    client = app.test_client()
    name = unique("lim")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo"}).status_code == 201
    return client, name, sent


def broker_state(store, name: str) -> tuple[int, int]:
    """The Redis lists kombu keeps for the model's queue and the session node's queue."""
    from conftest import NODE
    from tasks.names import model_queue, node_queue

    return store._r.llen(model_queue(name)), store._r.llen(node_queue(NODE))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/jobs", {"task": "embed", "input": ["a", "b", "c", "d"]}, "input"),
    ("/v1/jobs", {"task": "embed", "input": "x" * 51}, "input"),
    ("/v1/jobs", {"task": "chat", "input": [user("a")] * 4}, "input"),
    ("/v1/jobs", {"task": "generate", "input": "hi", "params": {"max_tokens": 11}}, "params.max_tokens"),
    ("/v1/jobs", {"task": "image", "input": "a cat", "params": {"width": 128}}, "params.width"),
    ("/v1/jobs", {"task": "image", "input": "a cat", "params": {"steps": 6}}, "params.steps"),
    ("/v1/embeddings", {"input": ["a", "b", "c", "d"]}, "input"),
    ("/v1/chat/completions", {"messages": [user("y" * 51)]}, "messages"),
    ("/v1/chat/completions", {"messages": [user("a")], "max_completion_tokens": 11}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 11}, "max_tokens"),
    ("/v1/images/generations", {"prompt": "a cat", "size": "128x64"}, "size"),
    ("/v1/images/generations", {"prompt": "a cat", "steps": 6}, "steps"),
])
def test_over_a_limit_is_400_and_nothing_is_queued(small, store, path: str, body: dict, param: str) -> None:
    client, name, sent = small
    before = len(client.get(f"/v1/jobs?model={name}").get_json()["data"])
    sent_before, lists_before = len(sent), broker_state(store, name)
    resp = client.post(path, json={"model": name, **body})
    assert resp.status_code == 400, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == "limit_exceeded" and error["param"] == param and "MODELBAY_MAX_" in error["message"]
    assert len(client.get(f"/v1/jobs?model={name}").get_json()["data"]) == before
    # Nothing reached the broker: no task message sent (a worker could take one off its list
    # before we look), and no new message in the model's queue or the node's queue.
    assert sent[sent_before:] == []
    assert broker_state(store, name) == lists_before


def test_at_the_limit_is_fine_and_the_body_size_is_413(small) -> None:
    client, name, sent = small
    sent_before = len(sent)
    ok = client.post("/v1/jobs", json={"model": name, "task": "embed", "input": ["a", "b", "c"]})
    assert ok.status_code == 202
    assert sent[sent_before:], "an accepted job sends a task message (the recorder sees it)"
    big = client.post("/v1/jobs", json={"model": name, "task": "embed", "input": "z" * 20_000})
    assert big.status_code == 413 and big.get_json()["error"]["code"] == "payload_too_large"
    assert client.get("/healthz").status_code == 200


BODY_LIMIT_MB = 1
OVER = (BODY_LIMIT_MB << 20) + (8 << 20)  # far more than the socket buffers hold


@pytest.fixture(scope="module")
def small_body_web(stack_env: dict[str, str], artifacts: Path) -> Iterator[str]:
    with gunicorn({**stack_env, "MODELBAY_MAX_BODY_MB": str(BODY_LIMIT_MB)}, artifacts / "web-limits.log") as url:
        yield url


def assert_413(status: int, body: bytes) -> None:
    assert status == 413, body[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "payload_too_large" and error["type"] == "invalid_request_error", error
    assert f"{BODY_LIMIT_MB} MB" in error["message"] and "MODELBAY_MAX_BODY_MB" in error["message"], error


@pytest.mark.parametrize("path, fields", [
    ("/v1/jobs", {"task": "embed"}),
    ("/v1/embeddings", {}),
])
def test_a_body_over_the_limit_is_413_for_clients_that_send_it_whole(small_body_web: str, path: str,
                                                                     fields: dict) -> None:
    url = small_body_web + path
    body = json.dumps({"model": "echo", **fields, "input": "z" * OVER}).encode()
    headers = {"Content-Type": "application/json"}
    # urllib: Connection: close, no Expect: 100-continue, the whole body before reading.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60)
    assert_413(info.value.code, info.value.read())
    # requests: keep-alive; then chunked (a generator body has no Content-Length).
    resp = requests.post(url, data=body, headers=headers, timeout=60)
    assert_413(resp.status_code, resp.content)
    chunked = requests.post(url, data=(body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)),
                            headers=headers, timeout=60)
    assert_413(chunked.status_code, chunked.content)
    # The server is still up and serves the next request.
    assert requests.get(f"{small_body_web}/healthz", timeout=10).status_code == 200
    small = requests.post(url, json={"model": unique("nobody"), **fields, "input": ["a"]}, timeout=10)
    assert small.status_code == 404, small.text
