"""The auth matrix: with ``MODELBAY_API_KEYS`` set, every route of the app (read from its URL
map, so a new route cannot slip through) answers 401 without a key and with a wrong key, and
does not with a right one; only ``/healthz`` and ``/readyz`` stay open."""
from __future__ import annotations

import re

import pytest

from web.auth import is_open

pytestmark = pytest.mark.usefixtures("worker")

SAMPLE = {"name": "auth-echo", "job_id": "0" * 32}


@pytest.fixture(scope="module")
def guarded(stack_env, tmp_path_factory):
    from web import create_app

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("first-key\nsecond-key\n")
    return create_app({"TESTING": True, "MODELBAY_ENV": {**stack_env, "MODELBAY_API_KEYS": f"@{keys}"}})


def routes(app) -> list[tuple[str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: SAMPLE[m.group(1)], rule.rule)
        out += [(method, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return out


def call(client, method: str, path: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    kwargs = {"json": {}} if method in ("POST", "PUT") else {}
    return client.open(path, method=method, headers=headers, buffered=not path.endswith("/stream"), **kwargs)


def test_every_route_needs_a_key(guarded) -> None:
    client = guarded.test_client()
    table = routes(guarded)
    assert len(table) >= 18 and ("POST", "/v1/chat/completions") in table
    for method, path in table:
        if is_open(path):
            assert call(client, method, path, None).status_code != 401, path
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
