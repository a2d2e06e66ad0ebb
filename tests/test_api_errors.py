"""What a user sends wrong gets a clear 4xx in the error envelope, and the server stays up.
Runs against real Valkey; no worker is needed for any of these."""
from __future__ import annotations

import pytest

from helpers import unique

GOOD_MANIFEST = {"backend": "echo", "options": {"dim": 4}}


def assert_envelope(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert resp.mimetype == "application/json"
    err = resp.get_json()["error"]
    assert set(err) >= {"type", "code", "message", "param"} and err["message"]
    assert "Traceback" not in err["message"] and "<html" not in resp.get_data(as_text=True).lower()
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def model(app) -> str:
    name = unique()
    assert app.test_client().put(f"/v1/models/{name}", json=GOOD_MANIFEST).status_code == 201
    return name


def test_malformed_json_is_400(client, model):
    for path, method in [("/v1/jobs", "post"), (f"/v1/models/{model}", "put"), (f"/v1/models/{model}/load", "post")]:
        resp = getattr(client, method)(path, data='{"model": ', content_type="application/json")
        assert_envelope(resp, 400, "invalid_request")


def test_a_body_that_is_not_json_is_415(client):
    resp = client.post("/v1/jobs", data="model=x", content_type="application/x-www-form-urlencoded")
    assert_envelope(resp, 415, "unsupported_media_type")


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "task": "generate", "input": "x", "surprise": 1}, "surprise"),
    ({"model": "m", "task": "dance", "input": "x"}, "task"),
    ({"model": "m", "task": "generate"}, "input"),
    ({"model": 5, "task": "generate", "input": "x"}, "model"),
    ({"model": "m", "task": "generate", "input": "x", "params": []}, "params"),
    ({"model": "m", "task": "chat", "input": "not messages"}, None),
    ({"model": "m", "task": "embed", "input": []}, None),
    ({"model": "m", "task": "chat", "input": [{"role": "wizard", "content": "x"}]}, None),
    ({"model": "m", "task": "generate", "input": "x", "node": "../etc"}, "node"),
])
def test_wrong_fields_and_types_are_422(client, body, param):
    err = assert_envelope(client.post("/v1/jobs", json=body), 422, "validation_error")
    if param:
        assert err["param"].split(".")[0] == param


def test_a_json_body_that_is_not_an_object_is_422(client):
    assert_envelope(client.post("/v1/jobs", json=["a"]), 422)


@pytest.mark.parametrize("manifest,param", [
    ({"backend": "Echo!"}, "backend"),
    ({"backend": "echo", "files": [{"uri": ""}]}, "files.0.uri"),
    ({"backend": "echo", "files": [{"uri": "x", "sha256": "nothex"}]}, "files.0.sha256"),
    ({"backend": "echo", "memory_mb": -1}, "memory_mb"),
    ({"backend": "echo", "typo": True}, "typo"),
    ({}, "backend"),
])
def test_bad_manifests_are_422(client, manifest, param):
    assert_envelope(client.put(f"/v1/models/{unique()}", json=manifest), 422, "validation_error", param)


@pytest.mark.parametrize("name", ["a/../b", "..", "a//b", ".hidden", "x" * 129, "m/load", "a%20b"])
def test_disallowed_model_names_are_400(client, name):
    assert_envelope(client.put(f"/v1/models/{name}", json=GOOD_MANIFEST), 400, "invalid_model_name", "name")


def test_a_job_for_a_disallowed_model_name_is_400(client):
    body = {"model": "a/../b", "task": "generate", "input": "x"}
    assert_envelope(client.post("/v1/jobs", json=body), 400, "invalid_model_name")


def test_unknown_model_is_404_everywhere(client):
    ghost = unique("ghost")
    assert_envelope(client.get(f"/v1/models/{ghost}"), 404, "model_not_found")
    assert_envelope(client.delete(f"/v1/models/{ghost}"), 404, "model_not_found")
    assert_envelope(client.post(f"/v1/models/{ghost}/load"), 404, "model_not_found")
    assert_envelope(client.post(f"/v1/models/{ghost}/unload"), 404, "model_not_found")
    body = {"model": ghost, "task": "generate", "input": "x"}
    assert_envelope(client.post("/v1/jobs", json=body), 404, "model_not_found", "model")


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job", "../../etc/passwd"])
def test_unknown_job_is_404(client, job_id):
    assert_envelope(client.get(f"/v1/jobs/{job_id}"), 404)
    assert_envelope(client.delete(f"/v1/jobs/{job_id}"), 404)


def test_cancelling_a_finished_job_is_409(client, model, store):
    job = client.post("/v1/jobs", json={"model": model, "task": "generate", "input": "x",
                                        "node": "n-ghost"})
    assert_envelope(job, 404, "node_not_found", "node")  # pin to a node that is not live
    # A job that has already ended (written straight to the store: no worker needed here).
    from tasks.schemas import JobRecord
    from tasks.store import new_job_id

    rec = store.create_job(JobRecord(id=new_job_id(), kind="inference", model=model, task="generate"))
    store.finish(rec.id, "succeeded", result={"text": "done"})
    err = assert_envelope(client.delete(f"/v1/jobs/{rec.id}"), 409, "job_finished")
    assert "succeeded" in err["message"]
    assert client.get(f"/v1/jobs/{rec.id}").get_json()["status"] == "succeeded"


def test_body_over_the_limit_is_413(stack_env):
    from web import create_app

    small = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_MAX_BODY_MB": "0.001"}})
    body = {"model": "m", "task": "generate", "input": "x" * 4096}
    assert_envelope(small.test_client().post("/v1/jobs", json=body), 413, "payload_too_large")


@pytest.mark.parametrize("query", ["wait=abc", "wait=-1", "wait=100000"])
def test_bad_wait_is_400(client, store, model, query):
    from tasks.schemas import JobRecord
    from tasks.store import new_job_id

    rec = store.create_job(JobRecord(id=new_job_id(), kind="inference", model=model, task="generate"))
    assert_envelope(client.get(f"/v1/jobs/{rec.id}?{query}"), 400, param="wait")


@pytest.mark.parametrize("query", ["wait=abc", "wait=-1", "wait=100000"])
def test_bad_wait_on_submit_is_400_and_queues_nothing(client, model, query):
    before = client.get(f"/v1/jobs?model={model}").get_json()["data"]
    body = {"model": model, "task": "generate", "input": "hi"}
    assert_envelope(client.post(f"/v1/jobs?{query}", json=body), 400, param="wait")
    assert client.get(f"/v1/jobs?model={model}").get_json()["data"] == before


def test_bad_list_filters_are_400(client):
    assert_envelope(client.get("/v1/jobs?status=done"), 400, param="status")
    assert_envelope(client.get("/v1/jobs?limit=0"), 400, param="limit")
    assert_envelope(client.get("/v1/jobs?limit=lots"), 400, param="limit")


def test_bad_pin_header_is_400(client, model):
    resp = client.post(f"/v1/models/{model}/load", headers={"X-Modelbay-Node": "no spaces"})
    assert_envelope(resp, 400, param="X-Modelbay-Node")


def test_unknown_routes_and_methods_use_the_envelope(client):
    assert_envelope(client.get("/v1/nothing"), 404, "not_found")
    assert_envelope(client.patch("/v1/jobs"), 405, "method_not_allowed")


def test_api_keys_guard_every_route_but_the_probes(stack_env):
    from web import create_app

    guarded = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_API_KEYS": "k1,k2"}}).test_client()
    assert guarded.get("/healthz").status_code == 200
    assert_envelope(guarded.get("/v1/models"), 401, "unauthorized")
    assert_envelope(guarded.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert guarded.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200


def test_replacing_a_manifest_is_200_and_the_server_stays_up(client, model):
    resp = client.put(f"/v1/models/{model}", json={**GOOD_MANIFEST, "memory_mb": 3})
    assert resp.status_code == 200 and resp.get_json()["manifest"]["memory_mb"] == 3
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("files,param", [
    ([{"uri": "https://h.example/m.bin", "path": "../escape.bin"}], "files.0.path"),
    ([{"uri": "https://h.example/m.bin", "path": "/etc/cron.d/x"}], "files.0.path"),
    ([{"uri": "https://h.example/m.bin", "path": "a//b"}], "files.0.path"),
    ([{"uri": "ftp://h.example/m.bin"}], "files.0.uri"),
    ([{"uri": "gopher://h.example/m.bin"}], "files.0.uri"),
    ([{"uri": "data:text/plain,hello"}], "files.0.uri"),
    ([{"uri": "relative/m.bin"}], "files.0.uri"),
    ([{"uri": "file:///etc/passwd"}], "files.0.uri"),
    ([{"uri": "/etc/passwd"}], "files.0.uri"),
    ([{"uri": "pkg://../etc/passwd"}], "files.0.uri"),
    ([{"uri": "pkg://tasks/../../x"}], "files.0.uri"),
    ([{"uri": "https:///no-host"}], "files.0.uri"),
    ([{"uri": "https://h.example/a/m.bin"}, {"uri": "https://h.example/b/m.bin"}], "files.1.path"),
])
def test_hostile_sources_are_rejected_at_registration(client, files, param):
    resp = client.put(f"/v1/models/{unique()}", json={"backend": "echo", "files": files})
    err = assert_envelope(resp, 400, "invalid_source")
    assert err["param"] in (param, param.replace(".path", ".uri"))


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1/f", "http://[::1]/f", "http://169.254.169.254/latest",
                                 "http://localhost/f"])
def test_private_sources_are_refused_at_registration_unless_allowed(stack_env, uri):
    """The session's stack allows private sources (its model files come from 127.0.0.1);
    with the setting off, loopback, link-local and localhost hosts are refused (no DNS)."""
    from web import create_app

    strict = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_ALLOW_PRIVATE_SOURCES": "0"}})
    body = {"backend": "echo", "files": [{"uri": uri}]}
    err = assert_envelope(strict.test_client().put(f"/v1/models/{unique()}", json=body), 400, "invalid_source",
                          "files.0.uri")
    assert "MODELBAY_ALLOW_PRIVATE_SOURCES" in err["message"]
    allowed = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_ALLOW_PRIVATE_SOURCES": "1"}})
    assert allowed.test_client().put(f"/v1/models/{unique()}", json=body).status_code == 201


def test_local_files_must_be_under_an_allowed_root(stack_env, tmp_path):
    from web import create_app

    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.bin").write_bytes(b"x")
    (tmp_path / "outside.bin").write_bytes(b"x")
    (root / "link.bin").symlink_to(tmp_path / "outside.bin")
    app = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_FILE_ROOTS": str(root)}})
    c = app.test_client()
    ok = c.put(f"/v1/models/{unique()}", json={"backend": "echo", "files": [{"uri": f"file://{root}/ok.bin"}]})
    assert ok.status_code == 201
    for uri in (f"file://{tmp_path}/outside.bin", f"{root}/../outside.bin", f"file://{root}/link.bin"):
        resp = c.put(f"/v1/models/{unique()}", json={"backend": "echo", "files": [{"uri": uri}]})
        assert_envelope(resp, 400, "invalid_source", "files.0.uri")
