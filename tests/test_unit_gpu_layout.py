"""The GPU layout, checked without a GPU or Docker: the Dockerfile's CPU and CUDA worker
flavours (parsed), compose's GPU reservation, how ``modelbay up --workers N`` shares G GPUs
(fake GPU lists, a fake NVML) and the job threads that follow a worker's share."""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import yaml

from modelbay import gpus
from modelbay.gpus import Gpu, split, visible, worker_plans
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


# -- the Dockerfile ---------------------------------------------------------------------------

def dockerfile() -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    """(global ARG defaults, stage name -> {"from": image, "args": {name: default},
    "lines": [instruction, ...]}) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    global_args: dict[str, str] = {}
    stages: dict[str, dict[str, object]] = {}
    current: dict[str, object] | None = None
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            current = {"from": image.strip(), "args": {}, "lines": []}
            stages[name.strip()] = current
        elif word == "ARG":
            name, _, default = rest.partition("=")
            target = global_args if current is None else current["args"]
            target[name] = default.strip('"')  # type: ignore[index]
        elif current is not None:
            current["lines"].append(line)  # type: ignore[union-attr]
    return global_args, stages


def expand(value: str, args: dict[str, str]) -> str:
    for _ in range(3):
        value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)
    return value


def chain(stages: dict[str, dict[str, object]], args: dict[str, str], name: str) -> list[str]:
    """The stages ``name`` is built on, itself first, then the base image."""
    found = [name]
    while name in stages:
        name = expand(str(stages[name]["from"]), args)
        found.append(name)
    return found


def test_the_cpu_worker_is_the_default_and_unchanged() -> None:
    args, stages = dockerfile()
    assert args["WORKER_FLAVOR"] == "cpu"
    assert chain(stages, args, "worker") == ["worker", "worker-cpu", "web", "python:3.11-slim"]
    cpu = stages["worker-cpu"]["lines"]
    assert 'RUN CMAKE_ARGS="${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir ".[ml,demo]"' in cpu
    assert stages["worker-cpu"]["args"] == {"LLAMA_CMAKE_ARGS": ""}
    assert 'CMD ["modelbay", "worker"]' in cpu


def test_the_cuda_worker_builds_on_devel_and_runs_on_runtime() -> None:
    args, stages = dockerfile()
    cuda_args = {**args, "WORKER_FLAVOR": "cuda"}
    runtime = chain(stages, cuda_args, "worker")
    assert runtime[:2] == ["worker", "worker-cuda"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu2[24]\.04", runtime[-1])
    build = stages["cuda-build"]
    devel = expand(str(build["from"]), cuda_args)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-devel-ubuntu2[24]\.04", devel)
    assert devel.split(":")[1].split("-")[0] == runtime[-1].split(":")[1].split("-")[0]  # same CUDA
    build_args = build["args"]
    assert build_args["CUDA_ARCHITECTURES"] == "80;86;89;90"  # type: ignore[index]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", build_args["TORCH_CUDA_INDEX"])  # type: ignore[index]
    runs = [line for line in build["lines"] if line.startswith("RUN ")]  # type: ignore[union-attr]
    torch_first = next(i for i, r in enumerate(runs) if "${TORCH_CUDA_INDEX}" in r and " torch" in r)
    llama = next(i for i, r in enumerate(runs) if "-DGGML_CUDA=on" in r)
    assert torch_first < llama
    assert "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in runs[llama] and ".[flower,ml,demo]" in runs[llama]
    final = stages["worker-cuda"]["lines"]
    assert any(line.startswith("COPY --from=cuda-build /opt/venv") for line in final)  # type: ignore[union-attr]
    assert any("MODELBAY_MODELS_DIR=/models" in line for line in final)  # type: ignore[union-attr]
    assert 'CMD ["modelbay", "worker"]' in final


# -- compose ----------------------------------------------------------------------------------

def test_compose_gives_one_worker_every_gpu_of_its_host() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    worker = services["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert "device_ids" not in device and "replicas" not in worker["deploy"]
    assert worker["build"]["target"] == "worker"
    assert worker["build"]["args"]["WORKER_FLAVOR"] == "${MODELBAY_WORKER_FLAVOR:-cuda}"
    assert not any("device_ids" in str(s.get("deploy")) for s in services.values())


# -- modelbay up --workers N ------------------------------------------------------------------

def fake_gpus(count: int) -> list[Gpu]:
    return [Gpu(i, f"GPU-{i:04d}-uuid", "Fake H100", 81559) for i in range(count)]


@pytest.mark.parametrize(("count", "workers", "sizes"), [
    (1, 1, [1]), (1, 3, [1, 0, 0]),
    (2, 1, [2]), (2, 2, [1, 1]), (2, 3, [1, 1, 0]),
    (8, 3, [3, 3, 2]), (8, 8, [1] * 8), (8, 2, [4, 4]), (8, 10, [1] * 8 + [0, 0]),
])
def test_each_worker_gets_a_contiguous_share_of_the_gpus(count: int, workers: int, sizes: list[int]) -> None:
    found = fake_gpus(count)
    shares = split(found, workers)
    assert [len(s) for s in shares] == sizes
    assert [g for s in shares for g in s] == found  # each GPU exactly once, in order
    settings = load_settings({"MODELBAY_NODE_ID": "box"})
    plans = worker_plans(settings, workers, found, cpus=16, environ={})
    for plan, share in zip(plans, shares, strict=True):
        assert plan.env["CUDA_VISIBLE_DEVICES"] == ",".join(g.uuid for g in share)  # "" for no share
        assert plan.concurrency == (32 * len(share) if share else 8)
        assert plan.gpus == tuple(share)
    assert [p.node_id for p in plans] == (["box"] if workers == 1 else [f"box-{i}" for i in range(1, workers + 1)])


def test_no_gpu_changes_nothing_but_the_cpu_share() -> None:
    settings = load_settings({"MODELBAY_NODE_ID": "box"})
    [one] = worker_plans(settings, 1, [], cpus=16, environ={})
    assert (one.node_id, one.concurrency, one.env) == ("box", 8, {})
    plans = worker_plans(settings, 3, [], cpus=16, environ={})
    assert [p.env for p in plans] == [{"MODELBAY_BACKEND_CPUS": "5"}] * 3
    assert all("CUDA_VISIBLE_DEVICES" not in p.env for p in plans)
    assert worker_plans(settings, 3, [], cpus=16, environ={"MODELBAY_BACKEND_CPUS": "2"})[0].env == {}
    with pytest.raises(ValueError):
        split([], 0)


def test_explicit_concurrency_wins_over_the_gpu_default() -> None:
    explicit = load_settings({"MODELBAY_WORKER_CONCURRENCY": "5", "MODELBAY_NODE_ID": "box"})
    assert [p.concurrency for p in worker_plans(explicit, 2, fake_gpus(4), 4, {})] == [5, 5]
    assert explicit.worker_threads(4) == 5 and explicit.worker_threads(0) == 5
    default = load_settings({})
    assert (default.worker_threads(0), default.worker_threads(1), default.worker_threads(8)) == (8, 32, 256)
    tuned = load_settings({"MODELBAY_WORKER_CONCURRENCY_PER_GPU": "16"})
    assert tuned.worker_threads(2) == 32


def test_cuda_visible_devices_limits_what_up_shares() -> None:
    found = fake_gpus(4)
    assert visible(found, {}) == found
    assert visible(found, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [found[2], found[0]]
    assert visible(found, {"CUDA_VISIBLE_DEVICES": "GPU-0003-uuid,1"}) == [found[3], found[1]]
    assert visible(found, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible(found, {"CUDA_VISIBLE_DEVICES": "1,9,2"}) == [found[1]]  # CUDA stops at an unknown one


class FakeNvml(types.SimpleNamespace):
    """The pynvml calls :func:`modelbay.gpus.nvml_gpus` makes, over a list of (uuid, MiB)."""

    def __init__(self, devices: list[tuple[str, int]], fail_init: bool = False) -> None:
        super().__init__()
        self.devices, self.fail_init, self.shutdowns = devices, fail_init, 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:  # noqa: N802
        return self.devices[handle][0].encode()

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return "Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:  # noqa: N802
        return types.SimpleNamespace(total=self.devices[handle][1] * 2**20, used=0)


def test_gpus_come_from_nvml_and_its_absence_means_none() -> None:
    fake = FakeNvml([("GPU-a", 81559), ("GPU-b", 81559)])
    assert gpus.nvml_gpus(lambda: fake) == [Gpu(0, "GPU-a", "Fake GPU", 81559), Gpu(1, "GPU-b", "Fake GPU", 81559)]
    assert fake.shutdowns == 1
    assert gpus.nvml_gpus(lambda: FakeNvml([], fail_init=True)) == []

    def missing() -> types.ModuleType:
        raise ImportError("No module named 'pynvml'")

    assert gpus.nvml_gpus(missing) == []


class RecordingStack:
    """What :func:`modelbay.cli.start_stack` asks of a :class:`~modelbay.stack.LocalStack`."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {"MODELBAY_REDIS_URL": "redis://x", "MODELBAY_NATS_URL": "nats://x"}
        self.workers: list[tuple[str, int, dict[str, str]]] = []

    def start_worker(self, node_id: str, concurrency: int, env: dict[str, str]) -> None:
        self.workers.append((node_id, concurrency, env))

    def start_web(self, *args: object, **kwargs: object) -> None:
        pass


def test_modelbay_up_starts_each_worker_with_its_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelbay import cli

    for name in ("CUDA_VISIBLE_DEVICES", "MODELBAY_BACKEND_CPUS", "MODELBAY_WORKER_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODELBAY_REDIS_URL", "redis://x")
    monkeypatch.setenv("MODELBAY_NATS_URL", "nats://x")
    monkeypatch.setenv("MODELBAY_NODE_ID", "box")
    monkeypatch.setattr(gpus, "nvml_gpus", lambda: fake_gpus(2))
    monkeypatch.setattr(gpus, "machine_cpus", lambda: 12)
    stack = RecordingStack()
    args = cli.build_parser().parse_args(["up", "--workers", "3"])
    cli.start_stack(stack, args)  # type: ignore[arg-type]
    assert [(n, c, e["CUDA_VISIBLE_DEVICES"], e["MODELBAY_BACKEND_CPUS"]) for n, c, e in stack.workers] == [
        ("box-1", 32, "GPU-0000-uuid", "4"), ("box-2", 32, "GPU-0001-uuid", "4"), ("box-3", 8, "", "4")]
    assert [e["MODELBAY_WORKER_METRICS_PORT"] for _, _, e in stack.workers] == ["9400", "9401", "9402"]
