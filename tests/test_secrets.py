"""Credentials come from the Redis and NATS URLs and are never logged or returned: a stack
whose Valkey requires a password and whose NATS requires a user and password serves a job,
and neither secret shows up in the worker's log, the web's log or any API answer."""
from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

import pytest

from helpers import start_worker, unique, wait_job
from modelbay.services import start_nats, start_valkey
from tasks.settings import load_settings
from tasks.store import Store


def test_credentials_stay_secret(artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    redis_pw, nats_pw = f"rp-{secrets.token_hex(8)}", f"np-{secrets.token_hex(8)}"
    valkey = start_valkey(Path(tempfile.mkdtemp(prefix="mb-valkey-")), appendonly=False, password=redis_pw)
    nats = start_nats(user="modelbay", password=nats_pw)
    env = {"MODELBAY_REDIS_URL": valkey.url, "MODELBAY_NATS_URL": nats.url, "MODELBAY_RUN_DIR": str(tmp_path),
           "MODELBAY_MODELS_DIR": str(tmp_path / "models"), "MODELBAY_NODE_TTL_S": "3"}
    assert redis_pw in valkey.url and nats_pw in nats.url
    worker = None
    try:
        store = Store.from_settings(load_settings(env))
        worker = start_worker(env, f"s{os.getpid()}", artifacts, store, concurrency=2)
        from web import create_app

        caplog.set_level(logging.DEBUG)
        client = create_app({"TESTING": True, "MODELBAY_ENV": env}).test_client()
        name = unique("secret")
        assert client.put(f"/v1/models/{name}", json={"backend": "echo"}).status_code == 201
        job = client.post("/v1/jobs", json={"model": name, "task": "generate", "input": "kept secret"}).get_json()
        done = wait_job(client, job["id"], 30)
        assert done["status"] == "succeeded" and done["result"]["text"] == "kept secret"
        answers = [client.get(path).get_data(as_text=True) for path in
                   ("/v1/nodes", f"/v1/models/{name}", f"/v1/jobs/{job['id']}", "/v1/jobs", "/api/operations",
                    "/readyz", "/no/such/route")]
        worker.stop()
        logs = worker.log() + caplog.text
        assert "Connected to" in worker.log()  # Celery did log its broker URL, masked
        for secret in (redis_pw, nats_pw):
            assert secret not in logs
            assert not any(secret in body for body in answers)
    finally:
        if worker is not None:
            worker.stop()
        nats.stop()
        valkey.stop()
