"""Coalesced embeddings calls (web/openai/coalesce.py, web/openai/shared.py) through the routes,
the session's real worker and the echo backend: calls that wait behind their lane's job share
one job, each answered with its own rows and usage; callers with other keys, keyed and
respond-async calls never share; a text the model refuses fails only its own call; and over
real HTTP, a shared job is cancelled only when every one of its clients has gone.

The echo model's ``embed_delay_s`` keeps a job on its way long enough for calls to pile up
behind it; each test waits for that (the lane's pending calls, or the job's status), never
for a time."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import requests

from helpers import open_request, poll, unique
from workers.backends.echo import embed_text

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def app1(stack_env: dict[str, str]):
    """An app whose lanes send one job at a time (coalesce_embed_jobs 1), and whose callers
    are told apart by their API keys."""
    from web import create_app

    return create_app({"TESTING": True, "MODELBAY_ENV": stack_env,
                       "MODELBAY": {"coalesce_embed_jobs": 1, "api_keys": "key-one,key-two"}})


def auth(key: str = "key-one") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ready_model(app, **options) -> str:
    client = app.test_client()
    name = unique("coal")
    body = {"backend": "echo", "options": {"dim": 8, **options}}
    assert client.put(f"/v1/models/{name}", json=body, headers=auth()).status_code == 201
    assert client.post(f"/v1/models/{name}/load", headers=auth()).status_code in (200, 202)
    poll(lambda: any(n["state"] == "ready" for n in client.get(f"/v1/models/{name}", headers=auth()).get_json()["nodes"]),
         30, "the model to be ready")
    return name


def waiting(app) -> int:
    """Calls waiting in this app's lanes for a place in a job."""
    co = app.extensions["modelbay"].coalescer
    with co._cond:
        return sum(len(lane.pending) for lane in co._lanes.values())


class Calls:
    """``POST /v1/embeddings`` calls, each in a thread of its own, started in order: each waits
    until the one before it is in its lane (or has its job), so arrival order is known."""

    def __init__(self, app, name: str) -> None:
        self.app, self.name = app, name
        self.threads: list[threading.Thread] = []
        self.answers: dict[str, tuple[int, dict, dict[str, str]]] = {}

    def start(self, text: str, headers: dict[str, str] | None = None, pending: int | None = None) -> None:
        def run() -> None:
            resp = self.app.test_client().post("/v1/embeddings", json={"model": self.name, "input": text},
                                               headers=headers or auth())
            self.answers[text] = (resp.status_code, resp.get_json(), dict(resp.headers))

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)
        if pending is not None:
            poll(lambda: waiting(self.app) == pending or text in self.answers, 10, f"the call {text!r} to arrive")

    def busy(self, text: str = "the first one") -> None:
        """A first call, alone in its job, that holds the lane's one place while it runs."""
        self.start(text)
        poll(lambda: any(j["status"] == "running" for j in self.jobs()), 10, "the first call's job to run")

    def jobs(self) -> list[dict]:
        data = self.app.test_client().get("/v1/jobs", query_string={"model": self.name, "limit": 100},
                                          headers=auth()).get_json()["data"]
        return [j for j in data if j["kind"] == "inference"]

    def wait(self) -> dict[str, tuple[int, dict, dict[str, str]]]:
        for t in self.threads:
            t.join(60)
        return self.answers


def rows_of(answer: tuple[int, dict, dict[str, str]], text: str) -> None:
    status, body, _ = answer
    assert status == 200, body
    assert [d["embedding"] for d in body["data"]] == [pytest.approx(embed_text(text, 8))]
    assert body["usage"] == {"prompt_tokens": len(text.split()), "total_tokens": len(text.split())}


def counted() -> tuple[float, float]:
    """This process's ``modelbay_embeddings_calls_total{shared="true"}`` and embed jobs submitted."""
    from web.metrics import EMBEDDINGS_CALLS, JOBS_SUBMITTED

    return (EMBEDDINGS_CALLS.labels(shared="true")._value.get(),
            JOBS_SUBMITTED.labels(kind="inference", task="embed")._value.get())


def test_calls_behind_a_running_job_share_the_next_one(app1) -> None:
    name = ready_model(app1, embed_delay_s=0.8)
    calls_before, jobs_before = counted()
    calls = Calls(app1, name)
    calls.busy()
    texts = ["alpha", "beta gamma", "delta epsilon zeta"]
    for i, text in enumerate(texts):
        calls.start(text, pending=i + 1)
    answers = calls.wait()
    for text in ["the first one", *texts]:
        rows_of(answers[text], text)
    shared = {answers[t][2]["X-Modelbay-Job"] for t in texts}
    assert len(shared) == 1 and answers["the first one"][2]["X-Modelbay-Job"] not in shared
    record = app1.test_client().get(f"/v1/jobs/{shared.pop()}", headers=auth()).get_json()
    assert record["input"] == texts and record["status"] == "succeeded"
    assert record["result"]["text_tokens"] == [1, 2, 3]  # each text's count: each call its usage
    calls_after, jobs_after = counted()
    assert (calls_after - calls_before, jobs_after - jobs_before) == (4, 2)  # the metrics: 4 calls, 2 jobs
    assert waiting(app1) == 0 and app1.extensions["modelbay"].coalescer.lanes() == 0


def test_callers_with_other_keys_never_share_a_job(app1) -> None:
    name = ready_model(app1, embed_delay_s=0.8)
    calls = Calls(app1, name)
    calls.busy()
    calls.start("one b", pending=1)
    calls.start("two c", headers=auth("key-two"))  # its lane is idle: it goes at once, alone
    calls.start("one d", pending=2)
    answers = calls.wait()
    for text in ("one b", "two c", "one d"):
        rows_of(answers[text], text)
    job = {t: answers[t][2]["X-Modelbay-Job"] for t in answers}
    assert job["one b"] == job["one d"] and len({job["the first one"], job["one b"], job["two c"]}) == 3


@pytest.mark.parametrize("header", [{"Idempotency-Key": "k-{}"}, {"Prefer": "respond-async"}])
def test_keyed_and_async_calls_have_jobs_of_their_own(app1, header: dict[str, str]) -> None:
    name = ready_model(app1, embed_delay_s=0.8)
    calls = Calls(app1, name)
    calls.busy()
    calls.start("shared one", pending=1)
    own = {k: v.format(unique("idem")) for k, v in header.items()}
    resp = app1.test_client().post("/v1/embeddings", json={"model": name, "input": "mine"}, headers={**auth(), **own})
    assert resp.status_code in (200, 202), resp.get_json()
    answers = calls.wait()
    mine = app1.test_client().get(f"/v1/jobs/{resp.headers['X-Modelbay-Job']}?wait=30", headers=auth()).get_json()
    # "shared one" waited in the lane when this call came: had this call joined the lane, the
    # two would have gone as one job
    assert mine["input"] == "mine" and mine["status"] == "succeeded"
    assert resp.headers["X-Modelbay-Job"] not in {a[2]["X-Modelbay-Job"] for a in answers.values()}


def test_a_refused_text_fails_only_its_own_call(app1) -> None:
    name = ready_model(app1, embed_delay_s=0.5, refuse_text="poison")
    calls = Calls(app1, name)
    calls.busy()
    for i, text in enumerate(["good one", "poison", "good two"]):
        calls.start(text, pending=i + 1)
    answers = calls.wait()
    status, body, _ = answers["poison"]
    assert status == 400 and body["error"]["code"] == "invalid_params" and "poison" in body["error"]["message"]
    rows_of(answers["good one"], "good one")
    rows_of(answers["good two"], "good two")
    made = calls.jobs()
    shared = [j for j in made if isinstance(j["input"], list)]
    assert len(shared) == 1 and shared[0]["status"] == "failed"  # the shared try, then one job per call
    alone = {j["input"]: j["status"] for j in made if isinstance(j["input"], str)}
    assert alone == {"the first one": "succeeded", "good one": "succeeded", "poison": "failed",
                     "good two": "succeeded"}


# -- over real HTTP: clients that go -------------------------------------------------------

def response_of(sock) -> tuple[int, dict]:
    """The answer on ``sock``, read to its end; then the socket is closed (see ``held``)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture
def held(web_url: str) -> Iterator[tuple[str, list]]:
    """An echo model on the session's gunicorn (two jobs on the way per lane, the default),
    and both places taken by calls that run for a while; the sockets are closed at the end."""
    name = unique("coalhttp")
    requests.put(f"{web_url}/v1/models/{name}", json={"backend": "echo", "options": {"embed_delay_s": 2}},
                 timeout=10).raise_for_status()
    requests.post(f"{web_url}/v1/models/{name}/load", timeout=10)
    poll(lambda: any(n["state"] == "ready" for n in requests.get(f"{web_url}/v1/models/{name}", timeout=5).json()["nodes"]),
         30, "the model to be ready")
    socks = [open_request(web_url, "/v1/embeddings", {"model": name, "input": f"busy {i}"}) for i in range(2)]
    # Each is read to its end: gunicorn's main thread waits for a client to close after a
    # "Connection: close" answer (gunicorn.util.close_graceful), so one left open stalls it.
    readers = [threading.Thread(target=response_of, args=(s,), daemon=True) for s in socks]
    for r in readers:
        r.start()
    poll(lambda: len([j for j in jobs(web_url, name) if j["status"] == "running"]) == 2, 10, "both places to be taken")
    try:
        yield name, socks
    finally:
        for r in readers:
            r.join(10)
        for s in socks:
            s.close()


def jobs(url: str, name: str) -> list[dict]:
    data = requests.get(f"{url}/v1/jobs", params={"model": name, "limit": 100}, timeout=10).json()["data"]
    return [j for j in data if j["kind"] == "inference"]


def shared_job(url: str, name: str, texts: list[str]) -> dict:
    return poll(lambda: next((j for j in jobs(url, name) if isinstance(j["input"], list)
                              and sorted(j["input"]) == texts and j["status"] == "running"), None),
                15, f"the shared job of {texts} to run")


def test_one_client_going_leaves_the_shared_job_to_the_other(web_url: str, held) -> None:
    name, _ = held
    stay = open_request(web_url, "/v1/embeddings", {"model": name, "input": "stay"})
    go = open_request(web_url, "/v1/embeddings", {"model": name, "input": "go"})
    job = shared_job(web_url, name, ["go", "stay"])
    go.close()
    status, body = response_of(stay)
    assert status == 200 and body["data"][0]["embedding"] == pytest.approx(embed_text("stay", 8))
    assert requests.get(f"{web_url}/v1/jobs/{job['id']}", timeout=5).json()["status"] == "succeeded"


def test_a_shared_job_is_cancelled_when_all_its_clients_go(web_url: str, held) -> None:
    name, _ = held
    socks = [open_request(web_url, "/v1/embeddings", {"model": name, "input": t}) for t in ("first", "second")]
    job = shared_job(web_url, name, ["first", "second"])
    for s in socks:
        s.close()
    poll(lambda: requests.get(f"{web_url}/v1/jobs/{job['id']}", timeout=5).json()["status"] == "cancelled", 10,
         "the shared job to be cancelled")
    after = requests.post(f"{web_url}/v1/embeddings", json={"model": name, "input": "later"}, timeout=30)
    assert after.status_code == 200  # the lane's place came back: the server goes on
