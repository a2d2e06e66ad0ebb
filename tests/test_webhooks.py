"""Webhooks for real: gunicorn, Celery workers, Valkey (a database of its own, so the session's
worker, which has no webhook settings, never takes these events) and local HTTP receivers.
Signatures are checked with standardwebhooks and with openai's SDK; retries, a refusal, an
operator URL, a refused private callback_url, a batch's event, and a worker SIGKILLed between a
job's end and its webhook."""
from __future__ import annotations

import base64
import json
import os
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import requests
import standardwebhooks

from helpers import gunicorn, poll, start_worker, unique
from tasks.settings import load_settings
from tasks.store import Store

SECRET = "whsec_" + base64.b64encode(b"modelbay webhook test secret!!!!").decode()


class Receiver:
    """An HTTP server on 127.0.0.1 recording every POST (path, headers, body); a path's answers
    are scripted (``script[path]``: status codes, the last one repeating; default 200)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.script: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    answers = receiver.script.get(self.path, [200])
                    status = answers.pop(0) if len(answers) > 1 else answers[0]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def to(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return [(h, b) for p, h, b in self.posts if p == path]


@pytest.fixture(scope="module")
def hooks(stack_env: dict[str, str], artifacts: Path) -> Iterator[dict]:
    receiver = Receiver()
    db = f"{stack_env['MODELBAY_REDIS_URL'].rsplit('/', 1)[0]}/11"
    env = {**stack_env, "MODELBAY_REDIS_URL": db, "MODELBAY_WEBHOOK_SECRET": SECRET,
           "MODELBAY_WEBHOOK_URLS": f"{receiver.url}/operator", "MODELBAY_ALLOW_PRIVATE_WEBHOOKS": "1",
           "MODELBAY_WEBHOOK_BACKOFF_BASE_S": "0.2", "MODELBAY_WEBHOOK_RETRY_S": "120",
           "MODELBAY_WEBHOOK_POLL_S": "0.1", "MODELBAY_WEBHOOK_RECHECK_S": "1", "MODELBAY_REAPER_INTERVAL_S": "0.5"}
    store = Store.from_settings(load_settings(env))
    store._r.flushdb()  # a database of this module's own
    node = f"wh{os.getpid()}"
    worker = start_worker(env, node, artifacts, store, concurrency=4)
    try:
        with gunicorn(env, artifacts / "web-webhooks.log") as url:
            yield {"receiver": receiver, "env": env, "store": store, "url": url, "node": node}
    finally:
        worker.stop(20)
        receiver.server.shutdown()


def _model(url: str, **options: object) -> str:
    name = unique("wh")
    requests.put(f"{url}/v1/models/{name}", json={"backend": "echo", "options": options}, timeout=10).raise_for_status()
    return name


def _submit(url: str, model: str, callback: str | None, **extra: object) -> dict:
    body: dict[str, object] = {"model": model, "task": "generate", "input": "one two", **extra}
    if callback is not None:
        body["callback_url"] = callback
    resp = requests.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()


def _webhook_settles(url: str, job_id: str, timeout_s: float = 60) -> dict:
    def check() -> dict | None:
        job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        return job if job["webhook"]["status"] != "pending" else None

    return poll(check, timeout_s, f"the webhook of job {job_id} to settle")


def _verified(head: dict[str, str], body: bytes) -> dict:
    """The event, its signature checked by standardwebhooks and by openai's SDK (a job event is
    not one of OpenAI's types, so verify_signature, not unwrap)."""
    event = standardwebhooks.Webhook(SECRET).verify(body, head)
    openai.OpenAI(api_key="x").webhooks.verify_signature(body, head, secret=SECRET)
    return event


def test_a_flaky_receiver_gets_one_event_three_times_with_one_id(hooks: dict) -> None:
    receiver, url = hooks["receiver"], hooks["url"]
    path = f"/flaky-{unique()}"
    receiver.script[path] = [500, 500, 200]
    job = _submit(url, _model(url), receiver.url + path)
    assert job["callback_url"] == receiver.url + path and job["webhook"]["status"] == "pending"
    final = _webhook_settles(url, job["id"])
    assert final["status"] == "succeeded"
    assert final["webhook"] == {"status": "delivered", "attempts": 3,  # the last error stays, for the record
                                "last_error": f"{receiver.url}{path} answered 500 Internal Server Error"}
    posts = receiver.to(path)
    assert len(posts) == 3 and {h["webhook-id"] for h, _ in posts} == {f"evt_{job['id']}"}
    event = _verified(*posts[-1])
    assert event["type"] == "job.succeeded" and event["object"] == "event" and event["id"] == f"evt_{job['id']}"
    assert event["data"] == {"id": job["id"], "object": "job", "status": "succeeded", "error": None}
    # the operator's URL took it at the first try, and got it once
    assert [json.loads(b)["id"] for _, b in receiver.to("/operator")].count(f"evt_{job['id']}") == 1


def test_a_receiver_answering_400_gets_one_attempt_and_the_webhook_fails(hooks: dict) -> None:
    receiver, url = hooks["receiver"], hooks["url"]
    path = f"/refuses-{unique()}"
    receiver.script[path] = [400]
    job = _submit(url, _model(url), receiver.url + path)
    final = _webhook_settles(url, job["id"])
    assert final["webhook"]["status"] == "failed" and final["webhook"]["attempts"] == 1
    assert final["webhook"]["last_error"] == f"{receiver.url}{path} answered 400 Bad Request"
    assert len(receiver.to(path)) == 1


def test_operator_urls_get_every_event_cancelled_and_failed_too(hooks: dict) -> None:
    receiver, url = hooks["receiver"], hooks["url"]
    model = _model(url)
    ok = _submit(url, model, None)
    failed = _submit(url, model, None, params={"max_tokens": "many"})  # echo refuses it: the job fails
    slow = _submit(url, _model(url, token_delay_s=1.0), None, input="word " * 120)
    poll(lambda: requests.get(f"{url}/v1/jobs/{slow['id']}", timeout=10).json()["status"] == "running", 60,
         "the slow job to run")
    assert requests.delete(f"{url}/v1/jobs/{slow['id']}", timeout=10).status_code == 202

    def types() -> dict[str, str] | None:
        events = {e["data"]["id"]: e["type"] for e in (_verified(h, b) for h, b in receiver.to("/operator"))}
        want = (ok["id"], failed["id"], slow["id"])
        return {i: events[i] for i in want} if all(i in events for i in want) else None

    seen = poll(types, 60, "the operator's events")
    sync = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": "one two"}, timeout=60)
    assert sync.status_code == 200, sync.text  # a synchronous OpenAI call: its job is no client's job, no event
    sync_jobs = {j["id"] for j in requests.get(f"{url}/v1/jobs", params={"model": model}, timeout=10).json()["data"]}
    assert sync_jobs - {ok["id"], failed["id"]}
    assert all(j["webhook"] is None for j in requests.get(f"{url}/v1/jobs", params={"model": model}, timeout=10)
               .json()["data"] if j["id"] not in (ok["id"], failed["id"]))
    assert seen == {ok["id"]: "job.succeeded", failed["id"]: "job.failed", slow["id"]: "job.cancelled"}
    failure = next(_verified(h, b) for h, b in receiver.to("/operator") if json.loads(b)["data"]["id"] == failed["id"])
    assert failure["data"]["status"] == "failed" and "max_tokens" in failure["data"]["error"]["message"]
    assert _webhook_settles(url, slow["id"])["webhook"] == {"status": "delivered", "attempts": 1, "last_error": None}


def test_a_private_callback_url_is_a_400_and_nothing_is_queued(hooks: dict, artifacts: Path) -> None:
    env = {k: v for k, v in hooks["env"].items() if k != "MODELBAY_ALLOW_PRIVATE_WEBHOOKS"}
    store: Store = hooks["store"]
    model = _model(hooks["url"])
    with gunicorn(env, artifacts / "web-webhooks-strict.log") as strict:
        before = store._r.zcard("mb:jobs")
        for bad in ("http://127.0.0.1:9/hook", "http://localhost/x", "http://[::1]/x", "ftp://example.com/"):
            resp = requests.post(f"{strict}/v1/jobs", json={"model": model, "task": "generate", "input": "x",
                                                            "callback_url": bad}, timeout=10)
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert error["code"] == "invalid_callback_url" and error["param"] == "callback_url", error
        assert store._r.zcard("mb:jobs") == before
        upload = requests.post(f"{strict}/v1/files", files={"file": ("r.jsonl", b"{}\n")}, data={"purpose": "batch"},
                               timeout=10).json()
        resp = requests.post(f"{strict}/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/embeddings",
                                                           "completion_window": "24h",
                                                           "callback_url": "http://10.0.0.1/x"}, timeout=10)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_callback_url", resp.text
    # the server stays up and takes a public one (no DNS at submit; the worker resolves it)
    assert _submit(hooks["url"], model, "https://hooks.example.invalid/x")["webhook"]["status"] == "pending"


def test_a_batch_event_unwraps_with_the_openai_sdk(hooks: dict) -> None:
    receiver, url = hooks["receiver"], hooks["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    model = _model(url)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": "x"}}
             for i in range(3)]
    path = f"/batch-{unique()}"
    upload = client.files.create(file=("r.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h",
                                  extra_body={"callback_url": receiver.url + path})
    posts = poll(lambda: receiver.to(path), 120, f"batch {batch.id}'s event")
    head, body = posts[0]
    event = client.webhooks.unwrap(body, head, secret=SECRET)
    assert event.type == "batch.completed" and event.data.id == batch.id and event.id == f"evt_{batch.id}"
    assert standardwebhooks.Webhook(SECRET).verify(body, head)["type"] == "batch.completed"
    done = poll(lambda: (b := requests.get(f"{url}/v1/batches/{batch.id}", timeout=10).json())["webhook"]["status"]
                != "pending" and b, 30, "the batch's webhook to settle")
    assert done["status"] == "completed"
    assert done["webhook"] == {"status": "delivered", "attempts": 1, "last_error": None}


def test_a_batch_that_fails_validation_is_a_batch_failed_event_for_the_operator(hooks: dict) -> None:
    receiver, url = hooks["receiver"], hooks["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    upload = client.files.create(file=("r.jsonl", b"{not json\n"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")

    def event() -> object:
        for head, body in receiver.to("/operator"):
            if json.loads(body)["data"]["id"] == batch.id:
                return client.webhooks.unwrap(body, head, secret=SECRET)
        return None

    got = poll(event, 60, f"batch {batch.id}'s event at the operator's URL")
    assert got.type == "batch.failed" and type(got).__name__ == "BatchFailedWebhookEvent"
    assert client.batches.retrieve(batch.id).status == "failed"


def test_a_worker_killed_between_a_jobs_end_and_its_webhook_loses_no_event(hooks: dict, artifacts: Path) -> None:
    """The victim holds each ended job for a minute before announcing it and posts no webhooks
    itself: SIGKILLed in that window, the job's entry from submit time comes due and the other
    worker posts the event."""
    receiver, url, store = hooks["receiver"], hooks["url"], hooks["store"]
    node = f"whk{os.getpid()}"
    victim = start_worker({**hooks["env"], "MODELBAY_WEBHOOK_TEST_HOLD_S": "60", "MODELBAY_WEBHOOK_DELIVERERS": "0"},
                          node, artifacts, store, concurrency=2)
    try:
        path = f"/killed-{unique()}"
        job = _submit(url, _model(url), receiver.url + path, node=node)
        poll(lambda: requests.get(f"{url}/v1/jobs/{job['id']}", timeout=10).json()["status"] == "succeeded", 60,
             "the pinned job to end")
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        posts = poll(lambda: receiver.to(path), 60, "the event of the killed worker's job")
        assert _verified(*posts[0])["data"]["id"] == job["id"]
        assert _webhook_settles(url, job["id"])["webhook"]["status"] == "delivered"
    finally:
        if victim.proc.poll() is None:
            victim.stop(10)
