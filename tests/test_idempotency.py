"""Idempotency-Key over real processes: three gunicorn replicas on one Valkey, first uses of
one key fired at once from threads, replays, a key reused with another body, tenants (API
keys) that never share keys, the synchronous routes (a retry attaches to the running job) and
the openai SDK retrying after its client timed out."""
from __future__ import annotations

import contextlib
import json
import threading
import uuid
from pathlib import Path

import openai
import pytest
import requests

from helpers import gunicorn, poll, unique
from tasks.store import Store

KEYS = ("tenant-a-key", "tenant-b-key")


@pytest.fixture(scope="module")
def replicas(stack_env: dict[str, str], artifacts: Path, worker: object) -> list[str]:
    env = {**stack_env, "MODELBAY_API_KEYS": ",".join(KEYS)}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(gunicorn(env, artifacts / f"idem-web-{i}.log", threads=8)) for i in range(3)]


def _h(tenant: int = 0, key: str | None = None) -> dict[str, str]:
    out = {"Authorization": f"Bearer {KEYS[tenant]}"}
    if key is not None:
        out["Idempotency-Key"] = key
    return out


def _model(url: str, options: dict | None = None) -> str:
    name = unique("idem")
    resp = requests.put(f"{url}/v1/models/{name}", json={"backend": "echo", "options": options or {}},
                        headers=_h(), timeout=30)
    assert resp.status_code == 201, resp.text
    return name


def _inference(store: Store, model: str) -> int:
    return sum(j.kind == "inference" for j in store.list_jobs(model=model, limit=50))


def _fire(urls: list[str], n: int, path: str, body: dict, headers: dict[str, str]) -> list[requests.Response]:
    """``n`` requests at once, spread over the replicas (a barrier releases them together)."""
    barrier = threading.Barrier(n)
    out: list[requests.Response | None] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        out[i] = requests.post(urls[i % len(urls)] + path, json=body, headers=headers, timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


def test_concurrent_first_uses_over_three_replicas_create_one_job(replicas: list[str], store: Store) -> None:
    name = _model(replicas[0])
    key = uuid.uuid4().hex
    body = {"model": name, "task": "generate", "input": "one two three"}
    answers = _fire(replicas, 9, "/v1/jobs", body, _h(0, key))
    assert {r.status_code for r in answers} <= {200, 202}, [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1, ids
    assert sorted(r.status_code for r in answers).count(202) == 1
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in answers if r.status_code == 200)
    assert _inference(store, name) == 1  # one job, whatever answered
    # later: the same job, 200, replayed, on any replica
    again = requests.post(f"{replicas[2]}/v1/jobs", json=body, headers=_h(0, key), timeout=30)
    assert again.status_code == 200 and again.json()["id"] in ids and again.headers["Idempotent-Replayed"] == "true"
    # the same key with another body: 422, nothing created
    other = requests.post(f"{replicas[1]}/v1/jobs", json={**body, "input": "four"}, headers=_h(0, key), timeout=30)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert _inference(store, name) == 1
    # another tenant with the same key: its own job
    theirs = requests.post(f"{replicas[0]}/v1/jobs", json=body, headers=_h(1, key), timeout=30)
    assert theirs.status_code == 202 and theirs.json()["id"] not in ids
    # no key: a new job each time
    fresh = requests.post(f"{replicas[0]}/v1/jobs", json=body, headers=_h(0), timeout=30)
    assert fresh.status_code == 202 and "Idempotent-Replayed" not in fresh.headers
    assert _inference(store, name) == 3


def test_a_bad_request_does_not_take_the_key(replicas: list[str]) -> None:
    key = uuid.uuid4().hex
    bad = requests.post(f"{replicas[0]}/v1/jobs", json={"model": "no-such-model-x", "task": "generate", "input": "x"},
                        headers=_h(0, key), timeout=30)
    assert bad.status_code == 404
    name = _model(replicas[0])
    good = requests.post(f"{replicas[1]}/v1/jobs", json={"model": name, "task": "generate", "input": "x"},
                         headers=_h(0, key), timeout=30)
    assert good.status_code == 202, good.text  # the 404 left the key free (and its body differs)
    long_key = requests.post(f"{replicas[1]}/v1/jobs", json={"model": name, "task": "generate", "input": "x"},
                             headers=_h(0, "k" * 300), timeout=30)
    assert long_key.status_code == 400 and long_key.json()["error"]["param"] == "Idempotency-Key"


def test_synchronous_retry_attaches_to_the_running_job(replicas: list[str], store: Store) -> None:
    name = _model(replicas[0], {"token_delay_s": 0.3})
    key = uuid.uuid4().hex
    body = {"model": name, "messages": [{"role": "user", "content": "a b c d e f"}]}
    answers = _fire(replicas, 3, "/v1/chat/completions", body, _h(0, key))
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    assert {r.headers["X-Modelbay-Job"] for r in answers} == {answers[0].headers["X-Modelbay-Job"]}
    assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {"a b c d e f"}
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in answers) == 2
    assert _inference(store, name) == 1
    later = requests.post(f"{replicas[1]}/v1/chat/completions", json=body, headers=_h(0, key), timeout=30)
    assert later.status_code == 200 and later.json()["choices"][0]["message"]["content"] == "a b c d e f"
    reused = requests.post(f"{replicas[1]}/v1/chat/completions", json={**body, "max_tokens": 2},
                           headers=_h(0, key), timeout=30)
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"


def test_sdk_retry_after_a_client_timeout_runs_the_inference_once(replicas: list[str], store: Store) -> None:
    """The openai SDK keeps one Idempotency-Key across its retries, but OpenAI's client sends it
    only when asked (its ``_idempotency_header`` is None): here through ``extra_headers``."""
    name = _model(replicas[0], {"token_delay_s": 0.5})
    client = openai.OpenAI(base_url=f"{replicas[0]}/v1", api_key=KEYS[0], timeout=1.5, max_retries=4)
    words = "w1 w2 w3 w4 w5 w6 w7 w8"  # about 4 s: the first tries time out
    done = client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": words}], extra_headers={"Idempotency-Key": uuid.uuid4().hex})
    assert done.parse().choices[0].message.content == words
    assert done.headers.get("idempotent-replayed") == "true"  # the answer came to a retry
    jobs = [j for j in store.list_jobs(model=name, limit=50) if j.kind == "inference"]
    assert len(jobs) == 1 and jobs[0].status == "succeeded" and jobs[0].attempts == 1


def test_batch_and_file_replays(replicas: list[str]) -> None:
    key = uuid.uuid4().hex
    line = b'{"custom_id": "1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}\n'

    def upload(content: bytes, k: str) -> requests.Response:
        return requests.post(f"{replicas[0]}/v1/files", files={"file": ("in.jsonl", content)},
                             data={"purpose": "batch"}, headers=_h(0, k), timeout=30)

    first, second = upload(line, key), upload(line, key)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["id"] == second.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
    changed = upload(line.replace(b'"x"', b'"y"'), key)
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"
    body = {"input_file_id": first.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
    bkey = uuid.uuid4().hex
    b1 = requests.post(f"{replicas[1]}/v1/batches", json=body, headers=_h(0, bkey), timeout=30)
    b2 = requests.post(f"{replicas[2]}/v1/batches", json=body, headers=_h(0, bkey), timeout=30)
    assert b1.status_code == b2.status_code == 200 and b1.json()["id"] == b2.json()["id"]
    assert b2.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in b1.headers
    poll(lambda: requests.get(f"{replicas[0]}/v1/batches/{b1.json()['id']}", headers=_h(), timeout=10).ok, 10,
         "the batch readable")


def test_claims_on_one_store_unit() -> None:
    """The key's life on fakeredis: pending, waited for (409 past the wait), done, reused, released."""
    import fakeredis

    from tasks.errors import ModelbayError
    from tasks.settings import Settings

    store = Store(fakeredis.FakeRedis(decode_responses=True), Settings(idempotency_wait_s=0.2))
    first = store.idem_claim("t", "k", "h1")
    assert first.first
    with pytest.raises(ModelbayError) as busy:
        store.idem_claim("t", "k", "h1")  # still pending past the wait
    assert busy.value.code.value == "idempotency_key_in_use" and busy.value.status == 409
    with pytest.raises(ModelbayError) as reused:
        store.idem_claim("t", "k", "h2")
    assert reused.value.code.value == "idempotency_key_reused" and reused.value.status == 422
    assert store.idem_claim("other-tenant", "k", "h2").first  # scopes never meet
    store.idem_done(first, "job-1")
    again = store.idem_claim("t", "k", "h1")
    assert not again.first and again.id == "job-1"
    store.idem_release(again)  # not the first: the id stays
    assert store.idem_claim("t", "k", "h1").id == "job-1"
    failed = store.idem_claim("t", "k2", "h1")
    store.idem_release(failed)  # the first request failed: the key is free
    assert store.idem_claim("t", "k2", "h3").first


def test_a_keyed_stream_outlives_its_client_and_its_retry_reads_it_all(replicas: list[str], store: Store) -> None:
    name = _model(replicas[0], {"token_delay_s": 0.2})
    words = "s1 s2 s3 s4 s5 s6 s7 s8"
    body = {"model": name, "messages": [{"role": "user", "content": words}], "stream": True}
    headers = _h(0, uuid.uuid4().hex)
    with requests.post(f"{replicas[0]}/v1/chat/completions", json=body, headers=headers, stream=True,
                       timeout=30) as first:
        assert first.status_code == 200
        job_id = first.headers["X-Modelbay-Job"]
        next(first.iter_lines())  # the role chunk, then the client goes
    retry = requests.post(f"{replicas[1]}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert retry.status_code == 200 and retry.headers["X-Modelbay-Job"] == job_id
    assert retry.headers["Idempotent-Replayed"] == "true"
    chunks = [json.loads(line[6:]) for line in retry.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == words
    job = poll(lambda: (r := store.get_job(job_id)) is not None and r.terminal and r, 30, "the job to end")
    assert job.status == "succeeded" and _inference(store, name) == 1
