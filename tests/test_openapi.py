"""``GET /openapi.json``: generated from the pydantic models, it documents every route of the
URL map, is valid OpenAPI 3.1, and the live server keeps to it: schemathesis fuzzes every
operation (with the API key) and finds no 5xx and no answer outside its documented status
codes, content types and schemas.

The fuzz runs against a stack of its own (valkey, NATS, an echo-only worker, gunicorn with
``MODELBAY_API_KEYS``): what it registers, loads and deletes stays there, it cannot delete
the session's models, and a worker offering only ``echo`` cannot start a real model load
whatever manifest is generated (other backends answer 503 ``no_node``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from flask import Flask

from helpers import Worker, http_ok, poll, start_worker
from modelbay.services import Service, free_port, spawn, start_nats, start_valkey, stop_process, web_command
from tasks.settings import load_settings
from tasks.store import Store
from web.auth import is_open
from web.openapi import (SKIP_METHODS, Ok, Undocumented, build_document, check_documented, documented, get_document,
                         openapi_path)
from web.schemas_http import Operations

KEY = "schemathesis-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NODE = f"oa{os.getpid()}"
FUZZ_BUDGET_S = int(os.environ.get("MODELBAY_FUZZ_BUDGET_S", "90"))  # schemathesis --max-time
MAX_EXAMPLES = int(os.environ.get("MODELBAY_FUZZ_EXAMPLES", "15"))    # per operation and phase
SEED = int(os.environ.get("MODELBAY_FUZZ_SEED", "20261123"))
STREAMING = "/api/operations/stream"  # never ends by itself: checked by hand below
CHECKS = "no_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# 503s the document promises that the models the fuzz registers can really cause: a backend
# the echo-only worker does not run (no_node), a manifest whose memory_mb (or pinned models)
# exceeds the node's 4096 MB (insufficient_memory), files that cannot be staged
# (source_unreachable, staging_failed), the cooldown after such a failed load, a load still
# going after MODELBAY_LOAD_WAIT_S (model_loading), a model deleted or unloaded under a
# job it had (model_unavailable), and a call whose load asked for "device": "cuda" on this
# CPU-only stack (device_unavailable, as LOAD_FAILURES below allows). Not backend_start_failed, and load_failed only for a load
# that raced an unload of the same model (the fuzz loads and unloads the same names; the
# worker reports "the load in flight failed"): an echo backend loads whatever the options
# (bad ones are a 400 invalid_params), so any other load_failed means loading is broken.
RETRYABLE_503 = frozenset({"no_node", "load_cooldown", "model_loading", "insufficient_memory", "model_unavailable",
                           "source_unreachable", "staging_failed", "device_unavailable"})
LOAD_RACED_AN_UNLOAD = "the load in flight failed"  # workers/node/models.py
SEEN_503 = "MODELBAY_FUZZ_503_LOG"  # where the check writes each 503 it saw (JSON lines)


@schemathesis.check
def no_server_error(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                    case: schemathesis.Case) -> bool | None:
    """No 5xx, but for a 503 with a retryable code; never ``no_node`` for ``echo``, which the
    fuzzed stack's worker runs (that 503 means the worker died). schemathesis loads this
    module as its hooks (SCHEMATHESIS_HOOKS) to run this check."""
    if response.status_code < 500:
        return None
    if response.status_code == 503:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {}
        code, message = error.get("code"), str(error.get("message"))
        if os.environ.get(SEEN_503):
            with open(os.environ[SEEN_503], "a", encoding="utf-8") as seen:
                seen.write(json.dumps({"code": code, "message": message[:300],
                                       "operation": getattr(getattr(case, "operation", None), "label", None)}) + "\n")
        if code in RETRYABLE_503 and not (code == "no_node" and "backend 'echo'" in message) \
                and "no live worker node" not in message:
            return None
        if code == "load_failed" and LOAD_RACED_AN_UNLOAD in message:
            return None
    raise AssertionError(f"server error {response.status_code}: {response.text[:1000]}")


@dataclass
class _Answer:
    status_code: int
    body: dict

    def json(self) -> dict:
        return self.body

    @property
    def text(self) -> str:
        return json.dumps(self.body)


@pytest.mark.parametrize("status,code,message,ok", [
    (200, None, "", True), (404, "model_not_found", "", True),
    (503, "no_node", "no live node can run backend 'llama-cpp'", True),
    (503, "load_cooldown", "the last load of 'x' failed", True), (503, "model_loading", "still loading", True),
    (503, "device_unavailable", "model load failed: the manifest asks for device 'cuda' but this node has no usable GPU", True),
    (503, "no_node", "no live node can run backend 'echo'", False),
    (503, "load_failed", "model load failed: the load in flight failed", True),
    (503, "load_failed", "model load failed: echo load failed", False), (503, "backend_start_failed", "", False),
    (503, "no_node", "no live worker node", False), (503, "store_unavailable", "", False),
    (500, "internal_error", "", False), (502, None, "", False),
])
def test_the_server_error_check(status: int, code: str | None, message: str, ok: bool) -> None:
    answer = _Answer(status, {"error": {"type": "x", "code": code, "message": message, "param": None}})
    if ok:
        assert no_server_error(None, answer, None) is None  # type: ignore[arg-type]
    else:
        with pytest.raises(AssertionError):
            no_server_error(None, answer, None)  # type: ignore[arg-type]


# ---- the document ---------------------------------------------------------------------------

def test_every_route_is_documented(app) -> None:
    doc = get_document(app)
    routes = set()
    for rule in app.url_map.iter_rules():
        path, params = openapi_path(rule.rule)
        for method in sorted(set(rule.methods or ()) - SKIP_METHODS):
            routes.add((method.lower(), path))
            operation = doc["paths"].get(path, {}).get(method.lower())
            assert operation is not None, f"{method} {rule.rule} ({rule.endpoint}) has no @documented"
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(params), (rule.rule, declared)
    in_doc = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert in_doc == routes and len(routes) >= 20
    assert ("get", "/openapi.json") in routes
    operations = {op["operationId"]: op for item in doc["paths"].values() for op in item.values()}
    assert len(operations) == len(routes)
    for op in operations.values():  # links name real operations and their parameters
        for response in op["responses"].values():
            for link in response.get("links", {}).values():
                target = operations[link["operationId"]]
                assert set(link["parameters"]) <= {p["name"] for p in target.get("parameters", [])}


def test_an_undocumented_route_fails(app) -> None:
    """Each view carries its declaration (@documented): a route without one fails the
    document's build, and create_app, which runs the same check on its URL map."""
    check_documented(app)
    bare = Flask(__name__)
    bare.add_url_rule("/v1/bare/<name>", "bare.view", lambda name: name)
    with pytest.raises(Undocumented, match=r"/v1/bare/<name> \(bare\.view\)"):
        build_document(bare, app.extensions["modelbay"].settings)
    with pytest.raises(ValueError, match="tag 'nope', error status 418, link 'Nowhere'"):
        documented("nope", "a typo", Ok(200, None, "ok", links=("Nowhere",)), errors=(418,))


def test_security_is_the_auth_rule(app) -> None:
    doc = get_document(app)
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "a key of MODELBAY_API_KEYS"}
    # Written out here, not taken from web.auth: the probes and the operations page's files.
    open_paths = {"/healthz", "/readyz", "/", "/ui/{name}"}
    assert open_paths <= set(doc["paths"]), open_paths - set(doc["paths"])
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            declared_open = operation.get("security") == []
            assert declared_open == (path in open_paths), (method, path)
            assert is_open(path.replace("{name}", "x")) == (path in open_paths), (method, path)
            assert ("401" in operation["responses"]) != declared_open, (method, path)


def test_every_error_is_the_envelope(app) -> None:
    doc = get_document(app)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                schema = response["content"].get("application/json", {}).get("schema", {})
                if int(status) >= 400:
                    want = "UnavailableResponse" if status == "503" else "ErrorResponse"
                    assert schema == {"$ref": f"#/components/schemas/{want}"}, (method, path, status)
                else:
                    assert response["content"], (method, path, status)
    assert doc["components"]["schemas"]["UnavailableResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorBody"}


def test_the_document_is_valid_openapi(client) -> None:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    doc = resp.get_json()
    assert doc["openapi"] == "3.1.0" and doc == json.loads(json.dumps(doc))
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in doc["paths"].values())
    for ref in _refs(doc):  # every $ref resolves
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_limits_come_from_the_settings(stack_env) -> None:
    from web import create_app

    app = create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_MAX_WAIT_S": "7"}})
    wait = next(p for p in get_document(app)["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"]
                if p["name"] == "wait")
    assert wait["schema"]["maximum"] == 7


# ---- the live server against it --------------------------------------------------------------

@dataclass
class Fuzzed:
    url: str
    worker: Worker


@pytest.fixture(scope="module")
def fuzzed(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A stack of its own with an echo-only worker and gunicorn behind an API key, the demo
    catalog's ``echo`` model registered and loaded (the document's examples use it)."""
    run = tmp_path_factory.mktemp("fuzz")
    (run / "sources").mkdir()
    services: list[Service] = []
    procs: list[subprocess.Popen] = []
    worker: Worker | None = None
    try:
        services.append(start_valkey(Path(tempfile.mkdtemp(prefix="mb-fz-")), appendonly=False,
                                     log_path=artifacts / "fuzz-valkey.log"))
        services.append(start_nats(log_path=artifacts / "fuzz-nats.log"))
        env = {"MODELBAY_REDIS_URL": services[0].url, "MODELBAY_NATS_URL": services[1].url,
               "MODELBAY_FILE_ROOTS": str(run / "sources"), "MODELBAY_RUN_DIR": str(run),
               "MODELBAY_MODELS_DIR": str(run / "models"), "MODELBAY_BACKENDS": "echo",
               "MODELBAY_API_KEYS": KEY, "MODELBAY_NODE_TTL_S": "5", "MODELBAY_BACKEND_STOP_GRACE_S": "3",
               "MODELBAY_CANCEL_POLL_S": "0.05", "MODELBAY_LOAD_COOLDOWN_BASE_S": "1",
               "MODELBAY_LOAD_WAIT_S": "5", "MODELBAY_MAX_WAIT_S": "2", "MODELBAY_NODE_MEMORY_MB": "4096"}
        store = Store.from_settings(load_settings(env))
        worker = start_worker(env, NODE, artifacts, store, concurrency=4)
        port = free_port()
        # No request-line limit: gunicorn's own 414 (a line over 4094 bytes, fuzzed query strings)
        # is not modelbay's answer; the app must meet long query strings with a documented one.
        procs.append(spawn([*web_command("127.0.0.1", port, 1), "--limit-request-line", "0"], env,
                           artifacts / "fuzz-web.log"))
        url = f"http://127.0.0.1:{port}"
        poll(lambda: http_ok(f"{url}/readyz"), 30, "gunicorn")
        manifest = json.loads((Path(__file__).parents[1] / "modelbay" / "demo_catalog.json").read_text())["echo"]
        assert requests.put(f"{url}/v1/models/echo", json=manifest, headers=AUTH, timeout=10).status_code == 201
        assert requests.post(f"{url}/v1/models/echo/load", headers=AUTH, timeout=10).status_code == 202
        poll(lambda: requests.get(f"{url}/v1/models/echo", headers=AUTH, timeout=5).json()["status"] == "ready",
             60, "the echo model to load")
        yield Fuzzed(url, worker)
    finally:
        for proc in procs:  # gunicorn's graceful timeout is 10 s: let it end by itself
            stop_process(proc, 20)
        if worker is not None:
            worker.stop()
        for service in reversed(services):
            service.stop()


def test_the_document_needs_the_key(fuzzed: Fuzzed) -> None:
    resp = requests.get(f"{fuzzed.url}/openapi.json", timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{fuzzed.url}/openapi.json", headers=AUTH, timeout=10).json()["openapi"] == "3.1.0"


def test_the_operations_stream_keeps_to_the_document(fuzzed: Fuzzed) -> None:
    """The one route left out of the fuzz (its answer never ends): its first event carries
    the body of ``GET /api/operations``."""
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", headers=AUTH)
    rows = schema["/api/operations"]["GET"]
    listed = requests.get(f"{fuzzed.url}/api/operations", headers=AUTH, timeout=10)
    rows.validate_response(listed)
    with requests.get(f"{fuzzed.url}{STREAMING}", headers=AUTH, stream=True, timeout=10) as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        lines = resp.iter_lines(decode_unicode=True)
        assert next(lines) == "event: snapshot"
        data = next(lines)
    assert data.startswith("data: ")
    Operations.model_validate_json(data[6:])  # the model the document's schema comes from
    assert requests.get(f"{fuzzed.url}{STREAMING}", timeout=10).status_code == 401


# The fuzz must really have run: every operation tested, and at least this many HTTP
# requests (about 4,500 in 90 s on an idle machine; 600 on a 2-core one shared by several
# test runs, where requests that wait for loads took much of the budget).
MIN_REQUESTS = int(os.environ.get("MODELBAY_FUZZ_MIN_REQUESTS", "400"))
# How a load of an echo manifest the fuzz registered may legitimately fail: more memory than
# the node has, files that cannot be staged, options echo refuses, unloaded while loading, a
# load that raced an unload, "device": "cuda" on this stack's CPU-only node. Any other load_failed, a backend_start_failed or a
# backend_crashed means loading itself is broken.
LOAD_FAILURES = frozenset({"insufficient_memory", "source_unreachable", "staging_failed", "invalid_params",
                           "unloaded", "load_failed: raced an unload", "device_unavailable"})
INFERENCE = ("POST /v1/jobs", "POST /v1/embeddings", "POST /v1/chat/completions", "POST /v1/completions")


def load_end(job: dict) -> tuple[str, str | None]:
    """How a load job ended: its status and error type (a load that raced an unload apart)."""
    error = job.get("error") or {}
    why = error.get("type")
    if why == "load_failed" and LOAD_RACED_AN_UNLOAD in str(error.get("message")):
        why = "load_failed: raced an unload"
    return job["status"], why


def fuzz_report(report: Path) -> dict:
    """What the run's reports say: schemathesis's JSON run report, and from its HAR file the
    HTTP requests made, counted by operation and status."""
    run = json.loads((report / "run.json").read_text())
    entries = json.loads((report / "run.har").read_text())["log"]["entries"]
    statuses: Counter[tuple[str, int]] = Counter()
    for entry in entries:
        path = urlsplit(entry["request"]["url"]).path
        statuses[(f"{entry['request']['method']} {path}", entry["response"]["status"])] += 1
    return {"run": run, "requests": len(entries), "statuses": statuses}


@pytest.mark.timeout(FUZZ_BUDGET_S + 240)
def test_schemathesis_finds_nothing(fuzzed: Fuzzed, artifacts: Path) -> None:
    """Every operation but the endless stream: the document's examples, boundary values and
    negative cases, random cases and link-following sequences until the budget is spent
    (some thousands of requests). The worker must survive it."""
    report = artifacts / "schemathesis"
    report.mkdir(parents=True, exist_ok=True)
    for old in ("run.json", "run.har", "503s.jsonl"):
        (report / old).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzzed.url}/openapi.json",
           "--header", f"Authorization: Bearer {KEY}", "--checks", CHECKS,
           "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(MAX_EXAMPLES),
           # One worker thread: CPython 3.11 before 3.11.8 can raise a spurious "SystemError: AST
           # constructor recursion depth mismatch" when threads ast.parse at once (gh-106905), and
           # hypothesis parses lambdas' sources while schemathesis builds its strategies.
           "--max-time", str(FUZZ_BUDGET_S), "--seed", str(SEED), "--workers", "1",
           "--request-timeout", "30", "--exclude-path", STREAMING, "--suppress-health-check", "all",
           "--report", "junit,json,har", "--report-dir", str(report),
           "--report-json-path", str(report / "run.json"), "--report-har-path", str(report / "run.har")]
    started = time.monotonic()
    here = Path(__file__).parent
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false", "SCHEMATHESIS_HOOKS": Path(__file__).stem,
           SEEN_503: str(report / "503s.jsonl"),
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=FUZZ_BUDGET_S + 180, env=env)
    took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    (artifacts / "schemathesis.log").write_text(output)
    print(output[-20000:])
    print(f"schemathesis took {took:.0f}s")
    seen_503 = [json.loads(line) for line in (report / "503s.jsonl").read_text().splitlines()] \
        if (report / "503s.jsonl").exists() else []
    print("503s seen:", dict(Counter(s["code"] for s in seen_503)))
    # The loads the fuzz made (the fixture's own load of "echo" aside): how each ended.
    jobs = requests.get(f"{fuzzed.url}/v1/jobs", params={"limit": 1000}, headers=AUTH, timeout=30).json()["data"]
    loads = [j for j in jobs if j["kind"] == "load" and j["model"] != "echo"]
    ends = Counter(load_end(j) for j in loads)
    print("the fuzz's loads:", dict(ends))
    assert proc.returncode == 0, f"schemathesis found failures (exit {proc.returncode}):\n{output[-20000:]}"
    assert fuzzed.worker.proc.poll() is None, f"the worker died during the fuzz:\n{fuzzed.worker.log()[-5000:]}"
    assert requests.get(f"{fuzzed.url}/readyz", timeout=10).status_code == 200
    # The fuzz really ran: every selected operation tested, enough requests made ...
    got = fuzz_report(report)
    run = got["run"]
    print(f"requests: {got['requests']}; test cases: {run['test_cases']}; operations: {run['operations']}")
    assert run["exit_code"] == 0 and run["complete"], run
    assert run["operations"]["selected"] == run["operations"]["tested"] >= 21, run["operations"]
    assert got["requests"] >= MIN_REQUESTS, f"only {got['requests']} requests in {took:.0f}s"
    # ... and served: each inference route answered with success (the document's examples
    # use the echo model, loaded before the fuzz).
    ok = {op for (op, status), n in got["statuses"].items() if 200 <= status < 300}
    assert set(INFERENCE) <= ok, sorted(got["statuses"].items())
    assert {s["code"] for s in seen_503} <= RETRYABLE_503, seen_503
    # Loading works: the fuzz's echo manifests load (the document's examples register some),
    # and no load failed for a reason an echo manifest cannot cause.
    assert ends[("succeeded", None)] >= 1, dict(ends)
    assert {why for (status, why) in ends if status == "failed"} <= LOAD_FAILURES, dict(ends)
