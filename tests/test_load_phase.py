"""The ``loading`` phase of a load (the backend's LoadModel, after staging) through the whole
stack: it has no percentage anywhere (the job record, the jobs waiting on it, the operations
rows of every replica), and a load cancelled by an unload leaves Live operations as soon as
its record ends, beside the next load of the same model. Two replicas: gunicorn
(``web_url``) and the in-process app (``client``), each with its own NATS subscriber."""
from __future__ import annotations

from typing import Any

import pytest
import requests

from conftest import NODE
from helpers import poll, unique
from tasks.schemas import TERMINAL

pytestmark = pytest.mark.usefixtures("worker")


def register(url: str, manifest: dict[str, Any]) -> str:
    name = unique("phase")
    assert requests.put(f"{url}/v1/models/{name}", json=manifest, timeout=10).status_code == 201
    return name


def job(url: str, job_id: str) -> dict[str, Any]:
    return requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()


def rows(url: str, client: Any) -> list[list[dict[str, Any]]]:
    """The operations rows of both replicas."""
    return [requests.get(f"{url}/api/operations", timeout=10).json()["operations"],
            client.get("/api/operations").get_json()["operations"]]


def row(replica: list[dict[str, Any]], job_id: str) -> dict[str, Any] | None:
    return next((r for r in replica if r["id"] == job_id), None)


def test_the_loading_phase_has_no_percentage_in_jobs_or_rows(web_url: str, client: Any) -> None:
    name = register(web_url, {"backend": "echo", "options": {"load_delay_s": 3},
                              "files": [{"uri": "pkg://modelbay/demo_catalog.json", "path": "catalog.json"}]})
    load = requests.post(f"{web_url}/v1/models/{name}/load", headers={"X-Modelbay-Node": NODE}, timeout=10).json()
    waiting = requests.post(f"{web_url}/v1/jobs", json={"model": name, "task": "generate", "input": "hi"},
                            timeout=10).json()
    assert waiting["load_job"] == load["id"], waiting
    seen: list[tuple[Any, ...]] = []

    def check() -> dict[str, Any] | None:
        record = job(web_url, load["id"])
        if record["status"] in TERMINAL:
            return record
        progress = record.get("progress") or {}
        if progress.get("phase") == "loading":
            waiter = job(web_url, waiting["id"])
            both = [row(replica, load["id"]) for replica in rows(web_url, client)]
            seen.append((progress.get("progress"), (waiter.get("progress") or {}).get("progress"),
                         *[(r or {}).get("kind") for r in both], *[(r or {}).get("progress") for r in both]))
        return None

    done = poll(check, 60, "the load", interval_s=0.1)
    assert done["status"] == "succeeded", done
    assert len([s for s in seen if s[2] == s[3] == "loading"]) >= 5, seen  # ~3 s of loading, every ~0.1 s
    assert all(s[0] is None and s[1] is None for s in seen), seen  # the load job and the job waiting on it
    assert all(pct is None for s in seen for kind, pct in ((s[2], s[4]), (s[3], s[5])) if kind == "loading"), seen
    finished = poll(lambda: (r := job(web_url, waiting["id"]))["status"] in TERMINAL and r, 30, "the waiting job")
    assert finished["status"] == "succeeded", finished
    requests.post(f"{web_url}/v1/models/{name}/unload", timeout=10)


def test_a_load_cancelled_by_an_unload_leaves_live_operations_at_once(web_url: str, client: Any) -> None:
    name = register(web_url, {"backend": "echo", "options": {"load_delay_s": 4}})
    path = f"{web_url}/v1/models/{name}"
    first = requests.post(f"{path}/load", headers={"X-Modelbay-Node": NODE}, timeout=10).json()
    poll(lambda: all((row(replica, first["id"]) or {}).get("kind") == "loading" for replica in rows(web_url, client)),
         20, "the first load's row, loading, on both replicas")
    unloads = requests.post(f"{path}/unload", timeout=10).json()["data"]
    assert unloads, "the unload found the model loading nowhere"
    for unload in unloads:
        poll(lambda u=unload: job(web_url, u["id"])["status"] in TERMINAL, 30, f"unload {unload['id']}")
    poll(lambda: job(web_url, first["id"])["status"] in TERMINAL, 10, "the cancelled load's record")
    assert job(web_url, first["id"])["status"] == "cancelled"
    second = requests.post(f"{path}/load", headers={"X-Modelbay-Node": NODE}, timeout=10).json()
    assert second["id"] != first["id"], second

    def only_the_new_row() -> bool:
        return all(row(replica, first["id"]) is None and row(replica, second["id"]) is not None
                   for replica in rows(web_url, client))

    # Well within MODELBAY_OPS_TTL_S and the error grace (10 s): a cancel is not an error to show.
    poll(only_the_new_row, 3, "the cancelled load's row to go while the new load's row is there")
    poll(lambda: job(web_url, second["id"])["status"] in TERMINAL, 30, "the second load")
    requests.post(f"{path}/unload", timeout=10)
