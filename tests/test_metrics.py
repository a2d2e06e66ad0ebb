"""Prometheus metrics: ``/metrics`` under gunicorn with two worker processes (multiprocess
mode: every scrape, whichever process answers, gives the sum), and a worker's own endpoint."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import NODE
from helpers import gunicorn, poll, unique
from tasks.names import model_queue, node_queue

pytestmark = pytest.mark.usefixtures("worker")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ", 1)[0] if "{" not in line else
                                line[line.index("{"):line.index("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def two_process_web(stack_env: dict[str, str], artifacts: Path) -> Iterator[str]:
    with gunicorn(stack_env, artifacts / "web-metrics.log", workers=2, threads=4) as url:
        yield url


def ended_loads(port: int) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(sample(text, "modelbay_loads_total", status=s) for s in ("succeeded", "failed", "cancelled"))


def test_web_metrics_sum_over_gunicorn_processes(two_process_web: str, client, worker_metrics_port: int) -> None:
    url = two_process_web
    loads_before = ended_loads(worker_metrics_port)
    name = unique("metrics")
    # A load that takes long: the jobs wait on model.<token>, which nobody consumes meanwhile.
    requests.put(f"{url}/v1/models/{name}", json={"backend": "echo", "options": {"load_delay_s": 60}},
                 timeout=10).raise_for_status()
    before = sample(requests.get(f"{url}/metrics", timeout=10).text, "modelbay_jobs_submitted_total",
                    kind="inference", task="generate")
    ids = []
    for i in range(12):  # spread over both processes by the kernel's accept
        resp = requests.post(f"{url}/v1/jobs", json={"model": name, "task": "generate", "input": f"m {i}"},
                             timeout=10)
        resp.raise_for_status()
        ids.append(resp.json()["id"])
    try:
        # Both processes' NATS subscribers connect after fork: every scrape says 1 once they have.
        poll(lambda: all(sample(requests.get(f"{url}/metrics", timeout=10).text, "modelbay_web_nats_connected") == 1
                         for _ in range(6)), 20, "every web process connected to NATS")
        # The load message is taken by the worker (its node queue empties), the 12 jobs wait.
        depths = lambda t: (sample(t, "modelbay_queue_depth", queue=model_queue(name)),  # noqa: E731
                            sample(t, "modelbay_queue_depth", queue=node_queue(NODE)))
        poll(lambda: depths(requests.get(f"{url}/metrics", timeout=10).text) == (12, 0), 20,
             "12 messages on the model's queue and none on the node's")
        scrapes = [requests.get(f"{url}/metrics", timeout=10) for _ in range(6)]
        assert all(s.headers["Content-Type"].startswith("text/plain") for s in scrapes)
        totals = {sample(s.text, "modelbay_jobs_submitted_total", kind="inference", task="generate")
                  for s in scrapes}
        assert totals == {before + 12}  # every scrape sums both processes
        assert {depths(s.text) for s in scrapes} == {(12, 0)}
        assert {sample(s.text, "modelbay_web_nats_connected") for s in scrapes} == {1}
        text = scrapes[-1].text
        assert sample(text, "modelbay_nodes_up", draining="false") >= 1
        assert f'modelbay_queue_depth{{queue="{node_queue(NODE)}"}}' in text
    finally:  # the slow load must not outlive the test: deleting the model stops it
        client.delete(f"/v1/models/{name}")
        for job_id in ids:
            poll(lambda j=job_id: (r := client.get(f"/v1/jobs/{j}").get_json()) and r["status"] in
                 ("failed", "cancelled", "succeeded"), 30, f"job {job_id} to end")
        load = client.get(f"/v1/jobs/{ids[0]}").get_json()["load_job"]
        assert load
        poll(lambda: client.get(f"/v1/jobs/{load}").get_json()["status"] in ("failed", "cancelled", "succeeded"),
             30, "the load to end")
        # ... and counted by the worker, so the next test's counters start from a still state.
        poll(lambda: ended_loads(worker_metrics_port) == loads_before + 1, 10, "the ended load counted")


WORKER_COUNTERS = {  # (metric, labels): what one new model's first job adds on the worker
    ("modelbay_jobs_total", (("kind", "inference"), ("task", "generate"), ("status", "succeeded"))): 1,
    ("modelbay_jobs_total", (("kind", "load"), ("task", ""), ("status", "succeeded"))): 1,
    ("modelbay_loads_total", (("status", "succeeded"),)): 1,
    ("modelbay_job_queue_wait_seconds_count", (("kind", "inference"),)): 1,
    ("modelbay_job_run_seconds_count", (("kind", "inference"), ("task", "generate"))): 1,
    ("modelbay_load_seconds_count", ()): 1,
    ("modelbay_staging_bytes_total", ()): 0,  # echo has no files
    ("modelbay_evictions_total", ()): 0,
}


def counters(text: str) -> dict:
    return {key: sample(text, key[0], **dict(key[1])) for key in WORKER_COUNTERS}


def test_a_worker_serves_its_own_metrics(client, worker_metrics_port: int) -> None:
    base = f"http://127.0.0.1:{worker_metrics_port}/metrics"
    scrape = lambda: requests.get(base, timeout=10).text  # noqa: E731
    before = counters(scrape())
    name = unique("metrics")
    manifest = {"backend": "echo", "options": {"token_delay_s": 0.3}}
    assert client.put(f"/v1/models/{name}", json=manifest).status_code == 201
    job = client.post("/v1/jobs", json={"model": name, "task": "generate",
                                        "input": "count me one two three four five six"}).get_json()
    # While the job runs (about 2.4 s), its model shows one job in flight.
    poll(lambda: sample(scrape(), "modelbay_inflight", model=name) == 1, 20, "the model's in-flight count at 1")
    poll(lambda: client.get(f"/v1/jobs/{job['id']}?wait=1").get_json()["status"] == "succeeded", 30, "the job")
    want = {key: before[key] + delta for key, delta in WORKER_COUNTERS.items()}
    poll(lambda: counters(scrape()) == want, 10, f"the counters to move by exactly {WORKER_COUNTERS}")
    poll(lambda: sample(scrape(), "modelbay_inflight", model=name) == 0, 10,
         "the model's in-flight count back to 0 once the job is released")
    after = scrape()
    assert counters(after) == want  # and nothing more
    assert 'modelbay_inflight{model="%s"}' % name in after
    assert sample(after, "modelbay_worker_nats_connected") == 1
