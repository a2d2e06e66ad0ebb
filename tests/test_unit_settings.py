"""Unit tests of the settings (tasks/settings.py): parsing, errors, defaults, where they are read."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.settings import Settings, SettingsError, env_name, load_settings

# A few defaults that compose.yaml, the README and operators rely on. A change here is a
# change of behaviour: say so in the README, not only here.
DEFAULTS: dict[str, object] = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "nats_url": "nats://127.0.0.1:4222",
    "nats_prefix": "modelbay",
    "models_dir": "./.modelbay/models",
    "run_dir": "./.modelbay/run",
    "backends": "auto",
    "allow_private_sources": False,
    "metrics_open": False,
    "worker_metrics_port": 9400,
    "job_ttl_s": 86400,
    "max_body_mb": 32.0,
    "node_ttl_s": 15.0,
    "node_memory_mb": 16384,
    "worker_concurrency": 8,
    "job_max_attempts": 3,
    "worker_stop_grace_s": 30.0,
    "keep_alive_s": 0.0,
    "backend_health_interval_s": 5.0,
    "backend_health_timeout_s": 2.0,
    "backend_health_failures": 3,
    "visibility_timeout_s": 7200,
}


@pytest.mark.parametrize(("name", "raw", "kind"), [
    ("worker_concurrency", "many", "int"),
    ("metrics_open", "maybe", "bool"),
    ("node_ttl_s", "soon", "float"),
])
def test_a_bad_value_names_the_variable_its_value_and_type(name: str, raw: str, kind: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({env_name(name): raw})
    assert isinstance(caught.value, ValueError)
    [line] = caught.value.problems
    assert line.startswith(f"{env_name(name)}={raw!r}: expected {kind} ")
    assert line in str(caught.value)


def test_every_bad_variable_is_reported_one_line_each() -> None:
    env = {"MODELBAY_WORKER_CONCURRENCY": "3.5", "MODELBAY_ALLOW_PRIVATE_SOURCES": "perhaps",
           "MODELBAY_MAX_WAIT_S": "1m", "MODELBAY_NODE_ID": "has space", "MODELBAY_NODE_TTL_S": "2.5"}
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 4
    for name in ("MODELBAY_WORKER_CONCURRENCY", "MODELBAY_ALLOW_PRIVATE_SOURCES", "MODELBAY_MAX_WAIT_S",
                 "MODELBAY_NODE_ID"):
        assert sum(line.strip().startswith(f"{name}={env[name]!r}: expected ") for line in lines) == 1


def test_defaults_are_unchanged() -> None:
    settings = Settings()
    assert {name: getattr(settings, name) for name in DEFAULTS} == DEFAULTS
    # load_settings with no variables gives every field its one default.
    loaded = load_settings({})
    for name, field in Settings.model_fields.items():
        assert not field.is_required(), name
        assert type(getattr(loaded, name)) in (str, int, float, bool), name
        assert getattr(loaded, name) == getattr(settings, name), name


def test_values_parse_by_type() -> None:
    s = load_settings({"MODELBAY_NODE_TTL_S": " 2.5 ", "MODELBAY_WORKER_CONCURRENCY": "3",
                       "MODELBAY_NODE_ID": "gpu-0", "MODELBAY_BACKENDS": "", "MODELBAY_API_KEYS": "a, b,,"})
    assert (s.node_ttl_s, s.worker_concurrency, s.node_queue, s.backend_list, s.api_key_list) == (
        2.5, 3, "node.gpu-0", [], ["a", "b"])
    for raw, value in [("1", True), ("true", True), ("Yes", True), (" on ", True), ("0", False),
                       ("false", False), ("no", False), ("OFF", False), ("", False)]:
        assert load_settings({"MODELBAY_METRICS_OPEN": raw}).metrics_open is value, raw


def test_an_explicit_mapping_replaces_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELBAY_WORKER_CONCURRENCY", "5")
    monkeypatch.setenv("MODELBAY_NODE_TTL_S", "7.5")
    assert (load_settings().worker_concurrency, load_settings().node_ttl_s) == (5, 7.5)
    explicit = load_settings({"MODELBAY_WORKER_CONCURRENCY": "2"})
    assert (explicit.worker_concurrency, explicit.node_ttl_s) == (2, DEFAULTS["node_ttl_s"])
    assert load_settings({}).worker_concurrency == DEFAULTS["worker_concurrency"]
    # Typed overrides win over the mapping, and are checked like it.
    assert load_settings({"MODELBAY_WORKER_CONCURRENCY": "2"}, worker_concurrency=4).worker_concurrency == 4
    with pytest.raises(SettingsError, match="MODELBAY_JOB_MAX_ATTEMPTS='x': expected int"):
        load_settings({}, job_max_attempts="x")
    with pytest.raises(SettingsError, match="'no_such_setting' is not a setting"):
        load_settings({}, no_such_setting=1)
    # Settings() is the defaults, whatever the process environment says.
    assert Settings().worker_concurrency == DEFAULTS["worker_concurrency"]


def test_variable_names_are_exact() -> None:
    assert load_settings({"modelbay_worker_concurrency": "2", "WORKER_CONCURRENCY": "2"}).worker_concurrency == 8
    assert env_name("node_ttl_s") == "MODELBAY_NODE_TTL_S"


def test_settings_are_immutable() -> None:
    settings = load_settings({})
    with pytest.raises(ValueError):
        settings.worker_concurrency = 1  # type: ignore[misc]
    assert settings.worker_concurrency == DEFAULTS["worker_concurrency"]
    assert hash(settings) == hash(load_settings({"MODELBAY_NODE_ID": settings.node_id}))


def test_health_and_gunicorn_defaults_are_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from web import gunicorn_conf
    from workers.supervisor import health

    assert (health.DEFAULT_INTERVAL_S, health.DEFAULT_TIMEOUT_S, health.DEFAULT_FAILURES) == (
        DEFAULTS["backend_health_interval_s"], DEFAULTS["backend_health_timeout_s"],
        DEFAULTS["backend_health_failures"])
    monkeypatch.setenv(gunicorn_conf.ENV, "")  # restored after the test; empty: make one
    monkeypatch.setenv("MODELBAY_RUN_DIR", str(tmp_path))
    gunicorn_conf.on_starting(None)
    made = Path(os.environ[gunicorn_conf.ENV])
    assert made.parent == tmp_path / "prometheus" and made.is_dir()


def test_the_cli_names_a_bad_setting_and_exits_2(monkeypatch, capsys):
    from modelbay.cli import main

    monkeypatch.setenv("MODELBAY_WORKER_CONCURRENCY", "many")
    assert main(["worker"]) == 2  # before any process is started
    err = capsys.readouterr().err
    assert "MODELBAY_WORKER_CONCURRENCY='many'" in err and "expected int" in err and "Traceback" not in err


def test_the_access_log_follows_log_requests(monkeypatch):
    import importlib

    import web.gunicorn_conf as conf

    monkeypatch.delenv("MODELBAY_LOG_REQUESTS", raising=False)
    assert importlib.reload(conf).accesslog is None  # off by default: no line per request
    monkeypatch.setenv("MODELBAY_LOG_REQUESTS", "1")
    assert importlib.reload(conf).accesslog == "-"
