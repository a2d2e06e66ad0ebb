"""Webhook events, signatures, the SSRF check, the retry schedule and the outbox
(tasks/webhooks.py) on fakeredis; the signatures checked by standardwebhooks and by openai's SDK."""
from __future__ import annotations

import base64
import json
import time

import fakeredis
import pytest
import standardwebhooks
from openai import OpenAI
from openai._exceptions import InvalidWebhookSignatureError

from tasks.batches import BatchRecord, BatchStore
from tasks.errors import InvalidRequest
from tasks.keys import job_key
from tasks.schemas import JobErrorInfo, JobRecord, WebhookState
from tasks.settings import load_settings
from tasks.webhooks import (LEASES, Outbox, advance, backoff_s, batch_event, body_of, check_callback_url, headers,
                            job_event, job_member, pending, retryable, targets, url_problem)

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes.......").decode()


def _job(status: str = "succeeded", **fields: object) -> JobRecord:
    return JobRecord(id="a" * 32, kind="inference", model="m", status=status,  # type: ignore[arg-type]
                     finished_at="2026-12-02T10:00:00.000Z", **fields)


def test_a_job_event_is_signed_as_standardwebhooks_and_openai_verify_it():
    job = _job("failed", error=JobErrorInfo(type="backend_crashed", message="boom"))
    event = job_event(job)
    assert event["id"] == f"evt_{job.id}" and event["object"] == "event" and event["type"] == "job.failed"
    assert event["data"] == {"id": job.id, "object": "job", "status": "failed",
                             "error": {"type": "backend_crashed", "message": "boom"}}
    body = body_of(event)
    head = headers(event["id"], body, SECRET)
    assert standardwebhooks.Webhook(SECRET).verify(body, head) == event
    OpenAI(api_key="x").webhooks.verify_signature(body, head, secret=SECRET)  # raises when it does not match
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(body.replace(b"failed", b"succeeded"), head)
    with pytest.raises(InvalidWebhookSignatureError):
        OpenAI(api_key="x").webhooks.verify_signature(body + b" ", head, secret=SECRET)


def test_a_batch_event_is_one_openai_unwraps_into_its_type():
    record = BatchRecord(id="batch_" + "b" * 32, endpoint="/v1/embeddings", input_file_id="file-x",
                         created_at=1, status="completed", completed_at=1764669600)
    body = body_of(batch_event(record))
    event = OpenAI(api_key="x").webhooks.unwrap(body, headers(f"evt_{record.id}", body, SECRET), secret=SECRET)
    assert type(event).__name__ == "BatchCompletedWebhookEvent"
    assert event.type == "batch.completed" and event.data.id == record.id and event.created_at == 1764669600


def test_without_a_secret_no_signature_is_sent():
    head = headers("evt_x", b"{}", "")
    assert "webhook-signature" not in head and head["webhook-id"] == "evt_x"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost/x", "https://[::1]/x",
                                 "http://10.1.2.3/x", "http://169.254.169.254/latest", "http://2130706433/"])
def test_private_callback_urls_are_refused_unless_allowed(url):
    assert "refused unless MODELBAY_ALLOW_PRIVATE_WEBHOOKS" in (url_problem(url, False) or "")
    assert url_problem(url, True) is None
    with pytest.raises(InvalidRequest) as err:
        check_callback_url(url, load_settings({}))
    assert err.value.code == "invalid_callback_url" and err.value.param == "callback_url" and err.value.status == 400


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/x", "http:///x", "http://example.com:99999/"])
def test_malformed_callback_urls_are_refused_even_when_private_ones_are_allowed(url):
    assert url_problem(url, True)


def test_who_hears_of_a_job():
    plain = load_settings({})
    operator = load_settings({"MODELBAY_WEBHOOK_URLS": "https://a.example/h, https://b.example/h"})
    assert pending(None, plain) is None  # no webhook: nothing in the record, no round trip
    assert pending("https://c.example/", plain) == WebhookState()
    assert pending(None, operator) == WebhookState()
    assert targets("https://c.example/", operator) == ["https://c.example/", "https://a.example/h",
                                                       "https://b.example/h"]


def test_what_is_retried():
    assert all(retryable(s) for s in (500, 502, 503, 504, 408, 429))
    assert not any(retryable(s) for s in (400, 401, 403, 404, 410, 422, 301))


def test_backoff_doubles_is_capped_and_jittered_within_half_to_all():
    assert [backoff_s(n, 1.0, 8.0, lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff_s(3, 1.0, 8.0, lambda: 0.0) == 2.0


def test_a_round_advances_the_state():
    settings = load_settings({"MODELBAY_WEBHOOK_RETRY_S": "100", "MODELBAY_WEBHOOK_BACKOFF_BASE_S": "1"})
    now = 1000.0
    one = lambda: 1.0  # noqa: E731 - the jitter's draw
    state, nxt = advance(WebhookState(), {0: (True, "x answered 500"), 1: (False, None)}, now, now, settings, one)
    assert (state.status, state.attempts, state.done, state.last_error, nxt) == ("pending", 1, [1], "x answered 500",
                                                                                 1001.0)
    state, nxt = advance(state, {0: (False, None)}, now, now + 1, settings, lambda: 1.0)
    assert (state.status, state.attempts, nxt) == ("delivered", 2, None)
    refused, nxt = advance(WebhookState(), {0: (False, "x answered 400 Bad Request")}, now, now, settings, lambda: 1.0)
    assert (refused.status, refused.attempts, refused.last_error, nxt) == ("failed", 1, "x answered 400 Bad Request",
                                                                          None)
    mixed, nxt = advance(WebhookState(), {0: (False, "x answered 404"), 1: (True, "y answered 503")}, now, now,
                         settings, one)
    assert (mixed.status, mixed.refused, mixed.done, nxt) == ("pending", [0], [], 1001.0)  # y is still tried
    mixed, nxt = advance(mixed, {1: (False, None)}, now, now + 1, settings, one)
    assert (mixed.status, mixed.done, mixed.last_error, nxt) == ("failed", [1], "y answered 503", None)
    late, nxt = advance(WebhookState(attempts=6), {0: (True, "timeout")}, now, now + 90, settings, lambda: 1.0)
    assert late.status == "failed" and nxt is None and "gave up after 7 attempt(s)" in (late.last_error or "")


def test_the_outbox_claims_leases_reschedules_and_settles():
    r = fakeredis.FakeRedis(decode_responses=True)
    box = Outbox(r)
    job = _job(webhook=WebhookState())
    r.set(job_key(job.id), job.model_dump_json(), ex=600)
    member = job_member(job.id)
    box.schedule(member, time.time() + 60)
    assert box.claim(time.time(), 30) == []  # the safety net is not due yet
    box.schedule(member, time.time())  # the job ended: due now
    assert box.claim(time.time(), 30) == [member]
    assert box.claim(time.time(), 30) == []  # leased
    box.schedule(member, time.time())  # announcing it again does not take it from its holder
    assert box.claim(time.time(), 30) == [] and r.hexists(LEASES, member)
    assert box.claim(time.time() + 31, 30) == [member]  # a holder that died: its lease ran out
    r.set(job_key(job.id), _job("running", webhook=WebhookState()).model_dump_json(), ex=600)
    box.settle(member, None, time.time() + 60, running=True)  # found running: looked at again later...
    assert box.claim(time.time(), 30) == [] and box.claim(time.time() + 61, 30) == [member]
    r.set(job_key(job.id), job.model_dump_json(), ex=600)  # ...unless it ended meanwhile: due now
    box.settle(member, None, time.time() + 60, running=True)
    assert box.claim(time.time(), 30) == [member]
    box.settle(member, WebhookState(status="delivered", attempts=2), None)
    stored = box.record(member)
    assert isinstance(stored, JobRecord) and stored.webhook == WebhookState(status="delivered", attempts=2)
    assert stored.model_dump(exclude={"webhook"}) == job.model_dump(exclude={"webhook"})
    assert 0 < r.ttl(job_key(job.id)) <= 600 and box.due_count() == 0 and not r.hexists(LEASES, member)
    assert "done" not in json.dumps(stored.public()["webhook"])


def test_a_batch_that_ends_is_due_in_the_same_write():
    r = fakeredis.FakeRedis(decode_responses=True)
    batches, box = BatchStore(r, ttl_s=60), Outbox(r)
    for bid, hook in (("batch_" + "1" * 32, WebhookState()), ("batch_" + "2" * 32, None)):
        batches.create(BatchRecord(id=bid, endpoint="/v1/embeddings", input_file_id="f", created_at=1, webhook=hook))
        batches.move(bid, "failed", allowed_from=("validating",))
    assert box.claim(time.time(), 30) == ["batch:batch_" + "1" * 32]
    record = box.record("batch:batch_" + "1" * 32)
    assert isinstance(record, BatchRecord) and batch_event(record)["type"] == "batch.failed"


def test_a_post_is_guarded_at_connect_time_and_classified():
    """workers/webhooks.post on a local server: a name that resolves to loopback is refused
    without a connection unless private targets are allowed; 2xx, 503, 410 and a closed port."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from workers.webhooks import post

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            if self.path == "/slow":
                time.sleep(2)  # a receiver slower than the post's timeout: the case under test
            self.send_response({"/ok": 204, "/busy": 503}.get(self.path, 410))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        retry, error = post(f"http://localhost:{port}/ok", b"{}", {}, 5, allow_private=False)
        assert not retry and "is a loopback address" in (error or "") and seen == []
        assert post(f"http://localhost:{port}/ok", b"{}", {}, 5, allow_private=True) == (False, None)
        assert post(f"http://127.0.0.1:{port}/busy", b"{}", {}, 5, True) == (
            True, f"http://127.0.0.1:{port}/busy answered 503 Service Unavailable")
        assert post(f"http://127.0.0.1:{port}/gone", b"{}", {}, 5, True)[0] is False
        retry, error = post(f"http://127.0.0.1:{port}/slow", b"{}", {}, 0.5, True)
        assert retry and "timed out" in (error or ""), error
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        retry, error = post(f"http://127.0.0.1:{closed}/x", b"{}", {}, 5, True)
        assert retry and "ConnectionRefusedError" in (error or "")
    finally:
        server.shutdown()


def test_a_job_without_a_webhook_costs_no_round_trip():
    """watch_job (web, at submit) and job_ended (web cancel, worker end) never reach the outbox
    for a job without a webhook: an outbox that is not one would fail the moment they did."""
    from tasks.webhooks import job_ended, watch_job

    no_store = object()
    watch_job(no_store, _job("queued"), load_settings({}))
    job_ended(no_store, _job("succeeded"))
    job_ended(no_store, None)
    with pytest.raises(AttributeError):
        job_ended(no_store, _job("succeeded", webhook=WebhookState()))
