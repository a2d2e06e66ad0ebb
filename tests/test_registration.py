"""The registry of backends (tasks/backends.py) at the API's door: a typo in a manifest's
backend or option names, or a task the model's backend does not do, is a 400 at once that
names the closest match, and nothing is stored or queued. Plus the registry against the
backend modules themselves, parsed (never imported: they need torch and llama.cpp).

Runs against real Valkey; no worker is needed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import unique
from tasks.backends import BACKENDS, TASK_NAMES
from test_api_errors import assert_envelope

ROOT = Path(__file__).resolve().parents[1]


def jobs_of(client, model: str) -> list[dict]:
    resp = client.get(f"/v1/jobs?model={model}&limit=1000")
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["data"]


# ---- registration -------------------------------------------------------------------------

def test_an_unknown_backend_is_refused_naming_the_closest(client) -> None:
    name = unique("typo")
    resp = client.put(f"/v1/models/{name}", json={"backend": "sentence-transformer"})
    err = assert_envelope(resp, 400, "unknown_backend", "backend")
    assert err["type"] == "invalid_request_error"
    assert "'sentence-transformer'" in err["message"]
    assert "did you mean 'sentence-transformers'?" in err["message"]
    for known in ("echo", "sentence-transformers", "llama-cpp", "diffusers"):
        assert known in err["message"]
    assert_envelope(client.get(f"/v1/models/{name}"), 404, "model_not_found")


def test_a_backend_with_nothing_close_names_them_all(client) -> None:
    err = assert_envelope(client.put(f"/v1/models/{unique()}", json={"backend": "zzz"}), 400, "unknown_backend")
    assert "did you mean" not in err["message"]
    assert "echo, sentence-transformers, llama-cpp, diffusers" in err["message"]


@pytest.mark.parametrize("backend,option,closest", [
    ("echo", "load_dealy_s", "load_delay_s"),
    ("sentence-transformers", "max_batch_sise", "max_batch_size"),
    ("llama-cpp", "n_gpu_layer", "n_gpu_layers"),
    ("diffusers", "dtypes", "dtype"),
])
def test_an_unknown_option_is_refused_naming_the_closest(client, backend, option, closest) -> None:
    name = unique("typo")
    resp = client.put(f"/v1/models/{name}", json={"backend": backend, "options": {option: 1}})
    err = assert_envelope(resp, 400, "unknown_option", f"options.{option}")
    assert f"'{option}'" in err["message"] and f"did you mean '{closest}'?" in err["message"]
    assert ", ".join(sorted(BACKENDS[backend].options)) in err["message"]  # all the backend's options
    assert_envelope(client.get(f"/v1/models/{name}"), 404, "model_not_found")


def test_a_refused_replacement_leaves_the_manifest_as_it_was(client, register) -> None:
    name = register({"dim": 4})
    resp = client.put(f"/v1/models/{name}", json={"backend": "echo", "options": {"dim": 8, "load_dealy_s": 1}})
    assert_envelope(resp, 400, "unknown_option", "options.load_dealy_s")
    assert client.get(f"/v1/models/{name}").get_json()["manifest"]["options"] == {"dim": 4}


def test_every_real_option_registers(client) -> None:
    for spec in BACKENDS.values():
        options: dict[str, object] = dict.fromkeys(spec.options, 1)
        if "device" in options:
            options["device"] = "cpu"  # the one option whose values registration checks
        resp = client.put(f"/v1/models/{unique('all')}", json={"backend": spec.name, "options": options})
        assert resp.status_code == 201, resp.get_json()


@pytest.mark.parametrize("manifest,param,words", [
    ({"options": {"device": "cuda:1"}}, "options.device", "the worker assigns GPUs"),
    ({"options": {"device": "tpu"}}, "options.device", "must be 'cpu' or 'cuda'"),
    ({"device": "cpu", "options": {"device": "cuda"}}, "options.device", "disagree"),
    ({"gpus": 2, "options": {"gpu_count": 3}}, "options.gpu_count", "set \"gpus\": 3"),
])
def test_a_device_the_worker_cannot_honour_is_refused_at_registration(client, manifest, param, words) -> None:
    name = unique("dev")
    body = {"backend": "sentence-transformers", **manifest}
    err = assert_envelope(client.put(f"/v1/models/{name}", json=body), 400, "invalid_params", param)
    assert words in err["message"], err
    assert_envelope(client.get(f"/v1/models/{name}"), 404, "model_not_found")


# ---- submission ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend,task,does", [
    ("echo", "image", "embed, generate, chat"),
    ("llama-cpp", "embed", "generate, chat"),
    ("sentence-transformers", "chat", "embed"),
    ("diffusers", "generate", "image"),
])
def test_a_task_the_backend_cannot_do_is_refused_and_nothing_is_queued(client, register, backend, task,
                                                                       does) -> None:
    name = register(backend=backend)
    body = {"model": name, "task": task,
            "input": [{"role": "user", "content": "hi"}] if task == "chat" else "a cat"}
    err = assert_envelope(client.post("/v1/jobs", json=body), 400, "unsupported_task", "task")
    assert f"backend '{backend}'" in err["message"] and f"task '{task}'" in err["message"]
    assert f"it does: {does}" in err["message"]
    assert jobs_of(client, name) == []


def test_the_openai_routes_refuse_with_the_same_registry(client, register) -> None:
    echo, llama = register(), register(backend="llama-cpp")
    image = client.post("/v1/images/generations", json={"model": echo, "prompt": "a cat"})
    err = assert_envelope(image, 400, "unsupported_task", "model")
    assert "backend 'echo'" in err["message"] and "it does: embed, generate, chat" in err["message"]
    embed = client.post("/v1/embeddings", json={"model": llama, "input": "a cat"})
    assert "it does: generate, chat" in assert_envelope(embed, 400, "unsupported_task", "model")["message"]
    assert jobs_of(client, echo) == [] and jobs_of(client, llama) == []


# ---- messages -----------------------------------------------------------------------------

@pytest.mark.parametrize("task,value,says", [
    ("embed", 42, "task 'embed' takes a string or a non-empty list of strings, got a number"),
    ("embed", [1, "a"], "got a list of numbers and strings"),
    ("generate", ["a"], "task 'generate' takes a string, got a list of strings"),
    ("image", {"prompt": "x"}, "task 'image' takes a string, got an object"),
    ("chat", "hi", "task 'chat' takes a non-empty list of {role, content} messages, got a string"),
])
def test_an_input_that_does_not_fit_the_task_says_what_the_task_takes(client, task, value, says) -> None:
    err = assert_envelope(client.post("/v1/jobs", json={"model": "m", "task": task, "input": value}), 422,
                          "validation_error", "input")
    assert says in err["message"], err["message"]


def test_a_wait_over_the_limit_names_the_setting(client, store, register) -> None:
    from tasks.schemas import JobRecord
    from tasks.store import new_job_id

    rec = store.create_job(JobRecord(id=new_job_id(), kind="inference", model=register(), task="generate"))
    err = assert_envelope(client.get(f"/v1/jobs/{rec.id}?wait=120"), 400, "invalid_request", "wait")
    assert "between 0 and 60 seconds" in err["message"] and "MODELBAY_MAX_WAIT_S" in err["message"]


# ---- the registry against the backend modules ----------------------------------------------

def _module_tree(module: str) -> ast.Module:
    return ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())


def options_read(tree: ast.Module) -> set[str]:
    """The LoadModel option names a backend module reads: string literals that are the 2nd
    argument of any call whose 1st is the name ``options`` (``option(options, "n_ctx", ...)``,
    echo's ``_number(options, "dim", ...)``), the key of ``options.get("...")``, and
    ``options["..."]``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            args = node.args
            if (len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id == "options"
                    and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str)):
                found.add(args[1].value)
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Name)
                    and func.value.id == "options" and args and isinstance(args[0], ast.Constant)):
                found.add(str(args[0].value))
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "options"
                and isinstance(node.slice, ast.Constant)):
            found.add(str(node.slice.value))
    return found


# BackendModel method → the tasks it serves (workers/jobs/inference.py: chat and generate both call Generate).
METHOD_TASKS = {"embed": {"embed"}, "embed_with_usage": {"embed"}, "generate": {"generate", "chat"},
                "generate_image": {"image"}}


def tasks_served(tree: ast.Module) -> set[str]:
    """The tasks of the BackendModel methods the module's classes define."""
    out: set[str] = set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef):
                out |= METHOD_TASKS.get(fn.name, set())
    return out


@pytest.mark.parametrize("name", list(BACKENDS))
def test_the_registry_lists_exactly_the_options_each_backend_reads(name: str) -> None:
    spec = BACKENDS[name]
    read = options_read(_module_tree(spec.module))
    assert read == set(spec.options), (f"{spec.module} reads {sorted(read)}, tasks/backends.py lists "
                                       f"{sorted(spec.options)}: keep them the same")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_the_registry_lists_exactly_the_tasks_each_backend_does(name: str) -> None:
    spec = BACKENDS[name]
    assert tasks_served(_module_tree(spec.module)) == set(spec.tasks)
    assert set(spec.tasks) <= set(TASK_NAMES)


def test_every_backend_module_is_in_the_registry() -> None:
    modules = {p.stem for p in (ROOT / "workers" / "backends").glob("*.py")}
    backends = {m for m in modules if "BackendModel)" in (ROOT / "workers" / "backends" / f"{m}.py").read_text()
                and m != "model"}
    assert backends == {spec.module.rsplit(".", 1)[1] for spec in BACKENDS.values()}
