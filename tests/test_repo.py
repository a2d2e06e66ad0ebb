"""Static checks of what cannot run here: compose.yaml against the CLI and the settings,
.ci/run against the README, the committed gRPC stubs against the proto, import rules."""
from __future__ import annotations

import ast
import os
import re
import tomllib
import filecmp
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

from modelbay.cli import build_parser
from tasks.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_services_run_real_cli_commands():
    services = compose()["services"]
    assert {"valkey", "nats", "web", "worker"} <= set(services)
    for name in ("web", "worker"):
        command = services[name]["command"]
        assert command[0] == "modelbay" and command[1] == name
        build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown flag
    assert "--appendonly" in services["valkey"]["command"]
    # The worker image carries the ML extras, the web image none (one Dockerfile, two targets).
    targets = {line.split()[-1] for line in (ROOT / "Dockerfile").read_text().splitlines()
               if line.startswith("FROM ")}
    assert services["web"]["build"]["target"] == "web" and services["worker"]["build"]["target"] == "worker"
    assert {"web", "worker"} <= targets and '".[ml,demo]"' in (ROOT / "Dockerfile").read_text()
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_compose_lb_flower_and_healthchecks():
    services = compose()["services"]
    web, lb, flower = services["web"], services["lb"], services["flower"]
    assert "ports" not in web and web["deploy"]["replicas"] >= 2  # only the lb is published
    assert "/readyz" in " ".join(web["healthcheck"]["test"])
    assert lb["image"].startswith("nginx") and lb["ports"] == ["8080:8080"]
    mount = lb["volumes"][0].split(":")
    conf = (ROOT / mount[0]).read_text()
    assert mount[1] == "/etc/nginx/conf.d/default.conf"
    assert "server web:8080" in conf and "proxy_buffering off" in conf  # round-robin, SSE unbuffered
    assert "proxy_ignore_client_abort off" in conf  # disconnects reach the web (architecture §9)
    assert flower["profiles"] == ["flower"] and flower["command"][:3] == ["celery", "--broker", web["environment"]
                                                                             ["MODELBAY_REDIS_URL"]]
    assert "flower" in flower["command"] and "valkey" in services and "nats" in services
    assert int(services["worker"]["stop_grace_period"].rstrip("s")) > Settings().worker_stop_grace_s
    # Ports and volumes agree with the settings and the image.
    assert str(Settings().worker_metrics_port) in services["worker"]["expose"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    models_dir = dockerfile.split("MODELBAY_MODELS_DIR=", 1)[1].split()[0]
    assert any(v.split(":")[1] == models_dir for v in services["worker"]["volumes"])
    assert web["command"][web["command"].index("--port") + 1] == "8080" and "8080" in web["expose"]


def test_compose_env_vars_are_settings():
    known = {env_name(name) for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("MODELBAY_")} - known
        assert not unknown, f"{name}: {unknown} are not settings"
    worker_env = compose()["services"]["worker"]["environment"]
    assert worker_env["MODELBAY_REDIS_URL"].startswith("redis://valkey:")
    assert "MODELBAY_NODE_ID" not in worker_env  # replicas take their hostname


def test_compose_shares_files_over_s3():
    """Files (/v1/files, batches) must be one store for every replica: an S3 service with a
    volume, which web and worker reach by name and wait for."""
    services, volumes = compose()["services"], compose()["volumes"]
    s3 = services["s3"]
    assert s3["image"].startswith("chrislusf/seaweedfs") and s3["command"][:1] == ["server"]
    assert "-s3" in s3["command"] and "-s3.port=8333" in s3["command"] and "ports" not in s3
    data = s3["volumes"][0].split(":")
    assert data[0] in volumes and f"-dir={data[1]}" in s3["command"]
    for name in ("web", "worker"):
        env, service = services[name]["environment"], services[name]
        assert env["MODELBAY_FILES_URL"].split(":-", 1)[-1].startswith("s3://"), name
        assert env["MODELBAY_S3_ENDPOINT_URL"].endswith("http://s3:8333}"), name
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env), name
        assert service["depends_on"]["s3"] == {"condition": "service_healthy"}, name
    assert "8333" in " ".join(s3["healthcheck"]["test"])


def test_ci_runs_the_readme_test_command():
    command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert command in readme
    fences = [b for b in readme.split("```")[1::2]][:2]
    assert "modelbay up" in fences[0] and command in fences[1], "README must open with run + test commands"


def test_committed_grpc_stubs_match_the_proto(tmp_path):
    proto = "workers/backends/proto/modelbay/backend/v1/backend.proto"
    (tmp_path / Path(proto).parent).mkdir(parents=True)
    shutil.copy(ROOT / proto, tmp_path / proto)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--grpc_python_out=.", "--pyi_out=.", proto], cwd=tmp_path, check=True)
    for stub in ("backend_pb2.py", "backend_pb2_grpc.py", "backend_pb2.pyi"):
        rel = Path(proto).parent / stub
        assert filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False), f"{rel} is stale: python -m workers.backends.proto"


def imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_layering_rules():
    assert not imports("tasks") & {"flask", "grpc", "torch", "web", "workers"}
    assert "workers" not in imports("web") and "grpc" not in imports("web")


# Modules that run only where an extra is installed: the distributions they import may come
# from those extras; every other module of tasks/, web/ and workers/ has the core dependencies.
MODULE_EXTRAS = {
    "workers/backends/sentence_transformers.py": {"embeddings"},
    "workers/backends/llama_cpp.py": {"llama"},
    "workers/backends/diffusers.py": {"images"},
    "workers/backends/libs.py": {"embeddings", "images"},  # torch and transformers helpers of both
}


def _dist(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0]).lower()


def test_every_import_is_declared():
    """A new user installs the core dependencies plus an extra: every module's third-party
    imports (at any depth, lazy ones included) must come from those, not through a test extra
    (``prometheus_client`` once came only through ``flower``, and ``modelbay up`` died)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_dist(r) for r in project["dependencies"]}
    extras = {name: {_dist(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    owners = packages_distributions()
    local = {"modelbay", "tasks", "web", "workers"}
    problems = []
    for package in sorted(local):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            allowed = core.union(*(extras[e] for e in MODULE_EXTRAS.get(rel, ())))
            where = "the core dependencies"
            if rel in MODULE_EXTRAS:
                where += f" or extras {sorted(MODULE_EXTRAS[rel])}"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    roots = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    roots = {node.module.split(".")[0]}
                else:
                    continue
                for root in roots - local - set(sys.stdlib_module_names) - {"__future__"}:
                    dists = {_dist(d) for d in owners.get(root, [])}
                    if not dists & allowed:
                        found = sorted(dists) or "nothing installed"
                        problems.append(f"{rel}:{node.lineno} imports {root} (from {found}), which is not in {where}")
    assert not problems, "\n".join(problems)


HEAVY = ("torch", "transformers", "sentence_transformers", "diffusers", "llama_cpp", "numpy")


def test_heavy_libraries_stay_in_backend_processes():
    """The worker and web processes never import an ML library: only backend processes do
    (architecture §7). Importing every worker, web and backend module must load none of them."""
    code = ("import sys, importlib, pkgutil\n"
            "import web, web.wsgi, workers.jobs.tasks, workers.jobs.inference\n"
            "import workers.backends.echo, workers.backends.sentence_transformers, workers.backends.diffusers\n"
            "import workers.backends.llama_cpp, workers.backends.libs, workers.backends.batching\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "MODELBAY_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
