"""deploy/kubernetes checked statically against the CLI, the settings and a real /metrics
(no Kubernetes here: nothing is applied to a cluster), and the autoscaling gauges of
``/metrics`` on a real Valkey with a real Celery message waiting in a model queue."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modelbay.cli import build_parser
from tasks.celery_app import make_celery
from tasks.names import TASK_INFER, model_queue
from tasks.schemas import JobRecord
from tasks.settings import Settings, env_name, load_settings
from tasks.store import new_job_id

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy/kubernetes"


def docs() -> dict[tuple[str, str], dict]:
    """Every object of the kustomization, by (kind, name)."""
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    found: dict[tuple[str, str], dict] = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUBE / resource).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} twice"
            found[key] = doc
    return found


def container(deployment: dict) -> dict:
    (one,) = deployment["spec"]["template"]["spec"]["containers"]
    return one


def env_of(objects: dict, deployment: dict) -> dict[str, str]:
    """The environment a container gets: its ConfigMap and Secret, then its own ``env``."""
    spec, env = container(deployment), {}
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(objects[("ConfigMap", source["configMapRef"]["name"])]["data"])
        else:
            env.update(objects[("Secret", source["secretRef"]["name"])]["stringData"])
    env.update({e["name"]: e["value"] for e in spec.get("env", [])})
    return env


def test_every_file_parses_and_is_in_the_kustomization():
    objects = docs()
    listed = set(yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert {("Deployment", "modelbay-web"), ("Deployment", "modelbay-worker"), ("Service", "modelbay-web"),
            ("ConfigMap", "modelbay-settings"), ("Secret", "modelbay-secrets"),
            ("ScaledObject", "modelbay-worker")} <= set(objects)


def test_commands_images_and_ports_match_the_cli_and_the_dockerfile():
    objects = docs()
    targets = {line.split()[-1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")}
    for name in ("web", "worker"):
        spec = container(objects[("Deployment", f"modelbay-{name}")])
        command = spec["command"]
        assert command[:2] == ["modelbay", name]
        args = build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown flag
        assert spec["image"].split(":")[0] == f"modelbay-{name}" and name in targets
        if name == "web":
            assert [p["containerPort"] for p in spec["ports"]] == [args.port]
    web = container(objects[("Deployment", "modelbay-web")])
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz" and web["readinessProbe"]["httpGet"]["port"] == "http"
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = objects[("Service", "modelbay-web")]
    labels = objects[("Deployment", "modelbay-web")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(web["ports"][0]["containerPort"])


def test_the_worker_asks_for_a_gpu_and_outlasts_its_stop_grace():
    objects = docs()
    deployment = objects[("Deployment", "modelbay-worker")]
    spec, env = container(deployment), env_of(objects, deployment)
    settings = load_settings(env)
    assert int(spec["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert [p["containerPort"] for p in spec["ports"]] == [settings.worker_metrics_port]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.worker_metrics_port)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.worker_stop_grace_s + settings.backend_stop_grace_s
    assert env_name("node_id") not in env  # each pod takes its name (the hostname)
    mounts = {m["mountPath"] for m in spec["volumeMounts"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.split("MODELBAY_MODELS_DIR=", 1)[1].split()[0] in mounts


def test_every_modelbay_variable_is_a_setting_and_the_settings_load():
    objects = docs()
    known = {env_name(name) for name in Settings.model_fields}
    for name in ("web", "worker"):
        env = env_of(objects, objects[("Deployment", f"modelbay-{name}")])
        unknown = {k for k in env if k.startswith("MODELBAY_")} - known
        assert not unknown, f"{name}: {unknown} are not settings"
        settings = load_settings(env)  # every value is valid
        assert len(settings.nats_url.split(",")) == 3  # the NATS cluster, every server named


def scrape(client) -> dict[str, list]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return {f.name: f.samples for f in text_string_to_metric_families(resp.get_data(as_text=True))}


def test_the_scaler_queries_metrics_that_metrics_exposes(client, register):
    register()  # a catalog model: the per-model gauges have a sample
    exposed = scrape(client)
    objects = docs()
    scaled = objects[("ScaledObject", "modelbay-worker")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "modelbay-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1  # /readyz of the web needs a live worker node
    triggers = scaled["spec"]["triggers"]
    assert triggers and all(t["type"] == "prometheus" for t in triggers)
    for trigger in triggers:
        names = set(re.findall(r"\bmodelbay_[a-z_]+", trigger["metadata"]["query"]))
        assert names and names <= set(exposed), f"{trigger['metadata']['query']} names {names - set(exposed)}"
        assert all(exposed[n] for n in names)
        assert float(trigger["metadata"]["threshold"]) > 0


@pytest.fixture
def waiting_job(stack_env: dict[str, str], store, register):
    """A catalog model held nowhere with one real Celery message waiting in its queue, for a
    job created two minutes ago. The message is taken off the queue afterwards."""
    name = register()
    record = JobRecord(id=new_job_id(), kind="inference", model=name, task="generate", input="x",
                       created_at=(datetime.now(UTC) - timedelta(minutes=2)).isoformat().replace("+00:00", "Z"))
    store.create_job(record)
    celery = make_celery(load_settings(stack_env))
    celery.send_task(TASK_INFER, args=[record.id], queue=model_queue(name))
    yield name, record
    for raw in store.queues.messages(model_queue(name)):
        store.queues.remove_message(model_queue(name), raw)


def sample(samples: list, model: str) -> float:
    return next(s.value for s in samples if s.labels.get("model") == model)


def test_the_backlog_gauges_show_the_oldest_job_and_jobs_per_holder(client, waiting_job):
    name, record = waiting_job
    exposed = scrape(client)
    assert sample(exposed["modelbay_queue_oldest_age_seconds"], name) >= 110  # created two minutes ago
    assert sample(exposed["modelbay_model_holders"], name) == 0
    assert sample(exposed["modelbay_model_jobs_per_holder"], name) == 1  # held nowhere: the whole depth
    depth = next(s.value for s in exposed["modelbay_queue_depth"] if s.labels["queue"] == model_queue(name))
    assert depth == 1


def test_an_empty_queue_has_age_zero(client, register):
    name = register()
    exposed = scrape(client)
    assert sample(exposed["modelbay_queue_oldest_age_seconds"], name) == 0
    assert sample(exposed["modelbay_model_jobs_per_holder"], name) == 0


def test_a_model_held_by_a_node_counts_it_as_a_holder(client, register, worker):
    from helpers import wait_job

    name = register()
    job = client.post(f"/v1/models/{name}/load").get_json()
    assert wait_job(client, job["id"], 60)["status"] == "succeeded"
    exposed = scrape(client)
    assert sample(exposed["modelbay_model_holders"], name) == 1
    assert sample(exposed["modelbay_model_jobs_per_holder"], name) == 0
    client.post(f"/v1/models/{name}/unload")
