"""OpenAI's Batch API end to end: the official SDK against gunicorn, the session's worker, real
Valkey and NATS, files on local disk. Bodies in the output are the synchronous routes' own;
every ``custom_id`` is in the output or the error file exactly once; a bad input file is
refused line by line; cancel and expiry end with what was done.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import requests

from helpers import poll, unique
from tasks.batches import CHUNK_PRIORITY
from tasks.names import model_queue
from workers.node.stranded import parse_message

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("worker")

FINAL = {"completed", "failed", "expired", "cancelled"}
FINAL_JOB = {"succeeded", "failed", "cancelled"}


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def register(url: str, options: dict | None = None, backend: str = "echo", **extra: object) -> str:
    name = unique("batch")
    requests.put(f"{url}/v1/models/{name}", json={"backend": backend, "options": options or {}, **extra},
                 timeout=10).raise_for_status()
    return name


def jsonl(lines: list[dict | str]) -> bytes:
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)


def line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def run_batch(client: openai.OpenAI, data: bytes, endpoint: str, timeout_s: float = 180) -> object:
    upload = client.files.create(file=("requests.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h",
                                  metadata={"test": "yes"})
    assert batch.status == "validating" and batch.id.startswith("batch_")
    return poll(lambda: (b := client.batches.retrieve(batch.id)).status in FINAL and b, timeout_s,
                f"batch {batch.id} to end")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(raw) for raw in client.files.content(file_id).content.splitlines() if raw.strip()]


def every_id_once(client: openai.OpenAI, batch: object, ids: list[str]) -> tuple[list[dict], list[dict]]:
    out, err = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    seen = Counter(x["custom_id"] for x in out + err)
    assert seen == Counter(ids), (seen - Counter(ids), Counter(ids) - seen)
    return out, err


def test_sdk_embeddings_batch_on_echo_answers_as_the_route(web_url: str) -> None:
    client = sdk(web_url)
    name = register(web_url, {"dim": 16})
    bodies = [{"model": name, "input": f"text number {i}"} for i in range(150)]
    bodies[7] = {"model": name, "input": ["a", "b"], "encoding_format": "base64"}
    lines = [line(f"req-{i}", "/v1/embeddings", b) for i, b in enumerate(bodies)]
    lines.append(line("bad-body", "/v1/embeddings", {"model": name, "input": []}))
    lines.append(line("too-many", "/v1/embeddings", {"model": name, "input": ["x"] * 2049}))  # MODELBAY_MAX_INPUTS
    batch = run_batch(client, jsonl(lines), "/v1/embeddings")
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 152 and batch.request_counts.completed == 150
    assert batch.request_counts.failed == 2 and batch.metadata == {"test": "yes"}
    assert batch.usage.input_tokens > 0 and batch.completed_at and batch.in_progress_at and batch.finalizing_at
    out, err = every_id_once(client, batch, [x["custom_id"] for x in lines])
    errors = {e["custom_id"]: e for e in err}
    assert sorted(errors) == ["bad-body", "too-many"] and errors["bad-body"]["response"] is None
    assert errors["bad-body"]["error"]["code"] == "invalid_request" and "input" in errors["bad-body"]["error"]["message"]
    assert errors["too-many"]["error"]["code"] == "limit_exceeded", errors["too-many"]
    by_id = {x["custom_id"]: x for x in out}
    for i in (0, 7, 149):
        got = by_id[f"req-{i}"]
        assert got["error"] is None and got["response"]["status_code"] == 200 and got["id"].startswith("batch_req_")
        sync = requests.post(f"{web_url}/v1/embeddings", json=bodies[i], timeout=30)
        assert got["response"]["body"] == sync.json()  # no id or created in an embeddings body
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_sdk_chat_and_completions_batches_on_echo(web_url: str) -> None:
    client = sdk(web_url)
    name = register(web_url)
    for endpoint, body in (("/v1/chat/completions", lambda i: {"model": name, "max_tokens": 3,
                                                               "messages": [{"role": "user", "content": f"say {i} a b c d"}]}),
                           ("/v1/completions", lambda i: {"model": name, "prompt": f"one {i} two three"})):
        lines = [line(f"c{i}", endpoint, body(i)) for i in range(20)]
        batch = run_batch(client, jsonl(lines), endpoint)
        assert batch.status == "completed" and batch.request_counts.completed == 20, batch
        assert batch.usage.output_tokens > 0 and batch.usage.total_tokens == (batch.usage.input_tokens
                                                                                + batch.usage.output_tokens)
        out, err = every_id_once(client, batch, [x["custom_id"] for x in lines])
        assert not err and batch.error_file_id is None
        got = next(x for x in out if x["custom_id"] == "c4")["response"]["body"]
        sync = requests.post(f"{web_url}{endpoint}", json=body(4), timeout=30).json()
        for key in ("id", "created"):
            got.pop(key), sync.pop(key)
        assert got == sync


def test_a_bad_input_file_fails_the_batch_naming_each_line(web_url: str) -> None:
    client = sdk(web_url)
    name = register(web_url)
    good = {"model": name, "input": "x"}
    lines = [line("a", "/v1/embeddings", good), "{not json", line("a", "/v1/embeddings", good),
             line("b", "/v1/chat/completions", good), line("c", "/v1/embeddings", {"model": "no-such-model", "input": "x"}),
             {**line("d", "/v1/embeddings", good), "method": "GET"}, line("e", "/v1/embeddings", good)]
    batch = run_batch(client, jsonl(lines), "/v1/embeddings")
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None, batch
    found = [(e.line, e.code) for e in batch.errors.data]
    assert found == [(2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "invalid_url"),
                     (5, "model_not_found"), (6, "invalid_method")], found
    assert all(e.message for e in batch.errors.data)


def test_create_refuses_a_missing_file_a_wrong_endpoint_and_a_file_of_another_purpose(web_url: str) -> None:
    client = sdk(web_url)
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.create(input_file_id="file-" + "0" * 32, endpoint="/v1/embeddings", completion_window="24h")
    assert missing.value.body["code"] == "not_found" and missing.value.body["param"] == "input_file_id"
    upload = client.files.create(file=("r.jsonl", b"{}\n"), purpose="batch")
    resp = requests.post(f"{web_url}/v1/batches", json={"input_file_id": upload.id, "endpoint": "/v1/images/generations",
                                                        "completion_window": "24h"}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "endpoint", resp.text
    resp = requests.post(f"{web_url}/v1/batches", json={"input_file_id": upload.id, "endpoint": "/v1/embeddings",
                                                        "completion_window": "1h"}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "completion_window", resp.text
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_" + "f" * 32)
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("nope")
    assert requests.get(f"{web_url}/healthz", timeout=5).status_code == 200


def test_list_pages_newest_first_and_cancel_of_a_finished_batch_is_409(web_url: str) -> None:
    client = sdk(web_url)
    name = register(web_url)
    ids = []
    for i in range(3):
        upload = client.files.create(file=("r.jsonl", jsonl([line(f"x{i}", "/v1/embeddings",
                                                                  {"model": name, "input": "hi"})])), purpose="batch")
        ids.append(client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                         completion_window="24h").id)
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    done = poll(lambda: (b := client.batches.retrieve(ids[0])).status in FINAL and b, 60, "the batch to end")
    assert done.status == "completed"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(ids[0])


def _slow_chat_lines(name: str, n: int) -> list[dict]:
    return [line(f"s{i}", "/v1/chat/completions",
                 {"model": name, "messages": [{"role": "user", "content": " ".join(["w"] * 10)}]}) for i in range(n)]


def test_cancel_stops_the_batch_with_a_partial_output(web_url: str, worker_metrics_port: int) -> None:
    client = sdk(web_url)
    name = register(web_url, {"token_delay_s": 0.05})
    lines = _slow_chat_lines(name, 400)
    upload = client.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    poll(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4, 120, "some lines to complete")
    rows = requests.get(f"{web_url}/api/operations", timeout=10).json()["operations"]
    row = next(r for r in rows if r["id"] == batch.id)
    assert row["kind"] == "batch" and row["lines_total"] == 400 and 4 <= row["lines_done"] < 400, row
    assert row["rate_lps"] > 0 and row["eta_s"] > 0 and row["model"] == name
    scraped = requests.get(f"{web_url}/metrics", timeout=10).text
    assert 'modelbay_batches{status="in_progress"}' in scraped
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    ended = poll(lambda: (b := client.batches.retrieve(batch.id)).status in FINAL and b, 30, "the batch to cancel")
    assert ended.status == "cancelled" and ended.cancelled_at, ended
    out, err = every_id_once(client, ended, [x["custom_id"] for x in lines])
    assert len(out) == ended.request_counts.completed and 4 <= len(out) < 400
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
    jobs = requests.get(f"{web_url}/v1/jobs", params={"model": name, "limit": 100}, timeout=10).json()["data"]
    assert jobs and all(j["status"] in ("succeeded", "cancelled") for j in jobs)
    rows = requests.get(f"{web_url}/api/operations", timeout=10).json()["operations"]
    assert batch.id not in {r["id"] for r in rows}
    worker_side = requests.get(f"http://127.0.0.1:{worker_metrics_port}/metrics", timeout=10).text
    assert 'modelbay_batches_total{status="cancelled"}' in worker_side
    assert 'modelbay_batch_lines_total{outcome="completed"}' in worker_side
    assert 'modelbay_batch_lines_total{outcome="cancelled"}' in worker_side


@pytest.fixture(scope="module")
def short_web(local_stack, stack_env: dict[str, str]) -> Iterator[str]:
    """A second gunicorn whose batches expire after 4 s and take at most 5 lines."""
    env = {**stack_env, "MODELBAY_BATCH_COMPLETION_WINDOW_S": "4", "MODELBAY_BATCH_MAX_LINES": "5"}
    web = local_stack.start_web(env=env, log_name="web-batches-short.log")
    try:
        yield web.url
    finally:
        local_stack.stop(web)


def test_a_batch_past_its_window_expires_with_the_rest_in_the_error_file(short_web: str) -> None:
    client = sdk(short_web)
    name = register(short_web, {"token_delay_s": 0.5})
    lines = _slow_chat_lines(name, 5)
    batch = run_batch(client, jsonl(lines), "/v1/chat/completions", timeout_s=60)
    assert batch.status == "expired" and batch.expired_at, batch
    out, err = every_id_once(client, batch, [x["custom_id"] for x in lines])
    assert err and {e["error"]["code"] for e in err} == {"batch_expired"}
    assert batch.request_counts.completed == len(out)


def test_too_many_lines_is_a_400(short_web: str) -> None:
    client = sdk(short_web)
    upload = client.files.create(file=("r.jsonl", io.BytesIO(jsonl([{"n": i} for i in range(6)]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert exc.value.body["code"] == "limit_exceeded"


def test_an_interactive_job_goes_before_chunks_already_waiting(web_url: str, store) -> None:
    client = sdk(web_url)
    name = register(web_url, {"token_delay_s": 0.05})
    lines = [line(f"p{i}", "/v1/completions", {"model": name, "prompt": "word"}) for i in range(3000)]
    upload = client.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")

    def chunks() -> dict:
        return store.jobs(list(store.batches.chunk_jobs(batch.id).values()))

    def waiting() -> set[str]:
        found = chunks()
        running = any(j.status == "running" for j in found.values())
        queued = {j.id for j in found.values() if j.status == "queued"}
        return queued if running and queued else set()

    poll(waiting, 120, "chunks running and chunks waiting")
    submitted = requests.post(f"{web_url}/v1/jobs", json={"model": name, "task": "generate", "input": "hi"},
                              timeout=30)
    assert submitted.status_code == 202, submitted.text
    # The chunk messages still in the queue once the job's is there (kombu keeps priority 9 in
    # a list of its own): none of them may start before the job.
    raws = store.queues.messages(model_queue(name) + "\x06\x16" + str(CHUNK_PRIORITY))
    behind = {m.job_id for raw in raws if (m := parse_message(raw)) is not None}
    assert behind
    job = poll(lambda: (j := requests.get(f"{web_url}/v1/jobs/{submitted.json()['id']}?wait=5",
                                          timeout=30).json())["status"] in FINAL_JOB and j, 90, "the job")
    assert job["status"] == "succeeded", job
    client.batches.cancel(batch.id)
    poll(lambda: client.batches.retrieve(batch.id).status == "cancelled", 60, "the batch to cancel")
    started = [j.started_at for j in chunks().values() if j.id in behind and j.started_at]
    # The queue hands the job out first; a chunk another thread took right after it may still
    # mark itself running a few ms sooner (two threads racing to their first write), so the
    # order is checked to the scheduling jitter, not to the millisecond.
    jitter = timedelta(milliseconds=250)
    first = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
    early = [s for s in started if datetime.fromisoformat(s.replace("Z", "+00:00")) + jitter < first]
    assert not early, (job["started_at"], sorted(started)[:3])


def test_a_chunk_whose_backend_keeps_crashing_answers_its_lines_in_the_error_file(web_url: str) -> None:
    client = sdk(web_url)
    name = register(web_url, {"crash_at": "generate"})
    lines = [line(f"x{i}", "/v1/completions", {"model": name, "prompt": "a b c"}) for i in range(5)]
    batch = run_batch(client, jsonl(lines), "/v1/completions")
    assert batch.status == "completed" and batch.output_file_id is None, batch
    assert batch.request_counts.failed == 5 and batch.request_counts.completed == 0
    _, err = every_id_once(client, batch, [x["custom_id"] for x in lines])
    assert {e["error"]["code"] for e in err} == {"backend_crashed"}, err[0]
    assert all(e["response"] is None and e["error"]["message"] for e in err)


def test_an_embeddings_chunk_the_backend_refuses_fails_only_the_line_at_fault(web_url: str) -> None:
    """An embeddings chunk is one Embed call; when the backend refuses it (one text it cannot
    take), each line runs alone: the others are answered as the synchronous route answers them."""
    client = sdk(web_url)
    name = register(web_url, {"dim": 4, "refuse_text": "poison"})
    inputs = {"a": "alpha", "b": ["beta", "poison"], "c": ["gamma", "delta"], "d": "epsilon words here"}
    lines = [line(cid, "/v1/embeddings", {"model": name, "input": text}) for cid, text in inputs.items()]
    batch = run_batch(client, jsonl(lines), "/v1/embeddings")
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    out, err = every_id_once(client, batch, list(inputs))
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [("b", "invalid_params")], err
    for got in out:
        sync = client.embeddings.create(model=name, input=inputs[got["custom_id"]])
        body = got["response"]["body"]
        assert [d["embedding"] for d in body["data"]] == [d.embedding for d in sync.data]
        assert body["usage"] == {"prompt_tokens": sync.usage.prompt_tokens, "total_tokens": sync.usage.total_tokens}
