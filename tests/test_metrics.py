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


def test_web_metrics_sum_over_gunicorn_processes(two_process_web: str) -> None:
    url = two_process_web
    name = unique("metrics")
    requests.put(f"{url}/v1/models/{name}", json={"backend": "echo"}, timeout=10).raise_for_status()
    before = sample(requests.get(f"{url}/metrics", timeout=10).text, "modelbay_jobs_submitted_total",
                    kind="inference", task="generate")
    for i in range(12):  # spread over both processes by the kernel's accept
        requests.post(f"{url}/v1/jobs", json={"model": name, "task": "generate", "input": f"m {i}"},
                      timeout=10).raise_for_status()
    scrapes = [requests.get(f"{url}/metrics", timeout=10) for _ in range(6)]
    assert all(s.headers["Content-Type"].startswith("text/plain") for s in scrapes)
    totals = {sample(s.text, "modelbay_jobs_submitted_total", kind="inference", task="generate") for s in scrapes}
    assert totals == {before + 12}  # every scrape sums both processes
    text = scrapes[-1].text
    assert sample(text, "modelbay_nodes_up", draining="false") >= 1
    assert f'modelbay_queue_depth{{queue="{node_queue(NODE)}"}}' in text
    assert f'modelbay_queue_depth{{queue="{model_queue(name)}"}}' in text
    assert "modelbay_web_nats_connected" in text


def test_a_worker_serves_its_own_metrics(client, worker_metrics_port: int) -> None:
    base = f"http://127.0.0.1:{worker_metrics_port}/metrics"
    before = requests.get(base, timeout=10).text
    name = unique("metrics")
    assert client.put(f"/v1/models/{name}", json={"backend": "echo"}).status_code == 201
    job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "count me"}).get_json()
    poll(lambda: client.get(f"/v1/jobs/{job['id']}?wait=1").get_json()["status"] == "succeeded", 30, "the job")
    after = poll(lambda: (t := requests.get(base, timeout=10).text) and
                 sample(t, "modelbay_jobs_total", kind="inference", task="generate", status="succeeded") >
                 sample(before, "modelbay_jobs_total", kind="inference", task="generate", status="succeeded") and t,
                 10, "the job counted")
    assert sample(after, "modelbay_loads_total", status="succeeded") > sample(before, "modelbay_loads_total",
                                                                              status="succeeded")
    assert sample(after, "modelbay_job_queue_wait_seconds_count", kind="inference") > 0
    assert sample(after, "modelbay_job_run_seconds_count", kind="inference", task="generate") > 0
    assert sample(after, "modelbay_load_seconds_count") > 0
    assert 'modelbay_inflight{model="%s"}' % name in after
    poll(lambda: sample(requests.get(base, timeout=10).text, "modelbay_inflight", model=name) == 0, 10,
         "the model's in-flight count back to 0 once the job is released")
    assert sample(after, "modelbay_worker_nats_connected") == 1
    assert "modelbay_staging_bytes_total" in after and "modelbay_evictions_total" in after
