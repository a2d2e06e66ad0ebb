"""The auth matrix: with ``MODELBAY_API_KEYS`` set, every route of the app (read from its URL
map, so a new route cannot slip through) answers 401 without a key and with a wrong key, and
does not with a right one; only the probes (``/healthz``, ``/readyz``) and the operations
page's own files (``/``, ``/ui/*``) stay open. The open set is written out here, not taken
from ``web.auth``, so widening it in the code fails this test."""
from __future__ import annotations

import re

import pytest

from web.auth import is_open

pytestmark = pytest.mark.usefixtures("worker")

SAMPLE = {"name": "auth-echo", "job_id": "0" * 32}
SAMPLE["file_id"] = "file-" + "0" * 32  # /v1/files/<file_id>
SAMPLE["batch_id"] = "batch_" + "0" * 32  # /v1/batches/<batch_id>

# The URL-map rules that need no key (docs/reliability.md, Security): nothing else.
OPEN_RULES = frozenset({"/healthz", "/readyz", "/", "/ui/<name>"})
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}


@pytest.fixture(scope="module")
def guarded(stack_env, tmp_path_factory):
    from web import create_app

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("first-key\nsecond-key\n")
    return create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_API_KEYS": f"@{keys}"}})


def routes(app) -> list[tuple[str, str, str]]:
    """(method, rule, path with samples) for every route of the URL map."""
    out = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: SAMPLE[m.group(1)], rule.rule)
        out += [(method, rule.rule, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return out


def call(client, method: str, path: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    kwargs = {"json": {}} if method in ("POST", "PUT") else {}
    return client.open(path, method=method, headers=headers, buffered=not path.endswith("/stream"), **kwargs)


def test_the_code_opens_exactly_the_documented_routes(guarded) -> None:
    rules = {rule for _, rule, _ in routes(guarded)}
    assert OPEN_RULES <= rules, OPEN_RULES - rules
    for _, rule, path in routes(guarded):
        assert is_open(path) == (rule in OPEN_RULES), (rule, path)
    for path in ("/v1/models", "/metrics", "/openapi.json", "/api/operations", "/healthzx", "/uix", "/ui"):
        assert not is_open(path), path


def check_open(client, method: str, rule: str, path: str) -> None:
    """An open route answers what it really answers, with no key and with a wrong one."""
    for key in (None, "wrong-key"):
        resp = call(client, method, path, key)
        body = resp.get_json(silent=True)
        if rule == "/healthz":
            assert (resp.status_code, body) == (200, {"status": "ok"}), (key, resp.status_code, body)
        elif rule == "/readyz":  # the session's worker is live
            assert resp.status_code == 200 and body["status"] == "ready" and body["nodes"] >= 1, (key, body)
        elif rule == "/":
            assert resp.status_code == 200 and resp.mimetype == "text/html", (key, resp.status_code)
            assert b"<title>modelbay" in resp.get_data()
        elif rule == "/ui/<name>":  # a sample name is no file: the envelope's 404, not a 401
            assert resp.status_code == 404 and body["error"]["code"] == "not_found", (key, body)
            for name, mimetype in PAGE_FILES.items():
                page = call(client, method, f"/ui/{name}", key)
                assert page.status_code == 200 and page.mimetype == mimetype, (name, key, page.status_code)
                assert page.get_data(), name
        else:
            raise AssertionError(f"no expectation for the open route {rule}")


def test_every_route_needs_a_key(guarded) -> None:
    client = guarded.test_client()
    table = routes(guarded)
    assert len(table) >= 18 and ("POST", "/v1/chat/completions", "/v1/chat/completions") in table
    for method, rule, path in table:
        if rule in OPEN_RULES:
            check_open(client, method, rule, path)
            continue
        for key in (None, "wrong-key", "first-keyx", "first-ke"):
            resp = call(client, method, path, key)
            assert resp.status_code == 401, (method, path, key, resp.status_code)
            assert resp.get_json()["error"]["type"] == "authentication_error"
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        for key in ("first-key", "second-key"):
            resp = call(client, method, path, key)
            assert resp.status_code != 401 and resp.status_code < 500, (method, path, key, resp.status_code)
            resp.close()


def test_a_key_is_never_echoed(guarded) -> None:
    client = guarded.test_client()
    resp = client.get("/v1/models", headers={"Authorization": "Bearer first-keyX"})
    assert resp.status_code == 401 and b"first-key" not in resp.get_data()
