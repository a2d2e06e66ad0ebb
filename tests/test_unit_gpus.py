"""Unit tests of GPU inventory, per-GPU accounting and placement, with a fake NVML and a fake
backend process (no GPU, no real process): workers/node/gpus.py, placement.py, devices.py,
the ModelManager's load, eviction and device paths, the node record, and choose_node."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import fakeredis
import pytest

from tasks.dispatch import Dispatcher, choose_node
from tasks.errors import ErrorCode, InvalidRequest
from tasks.schemas import GpuUsage, JobRecord, Manifest, NodeRecord, utcnow
from tasks.settings import load_settings
from tasks.store import Store, new_job_id
from workers.node import agent, gpus
from workers.node.entry import LoadFailed
from workers.node.models import ModelManager
from workers.node.placement import Holding, NoRoom, Plan, Pool

GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024


# ---- a fake NVML -----------------------------------------------------------------------

class FakeNVMLError(Exception):
    pass


@dataclass
class FakeMem:
    total: int
    used: int


@dataclass
class FakeProc:
    pid: int
    usedGpuMemory: int | None


@dataclass
class FakeGpu:
    uuid: str
    total_gib: float
    used_gib: float = 0.0
    name: str | bytes = b"NVIDIA H100 80GB HBM3"
    broken: str | None = None  # "handle" or "memory": that NVML call fails
    mig: list[tuple[str, float]] | None = None  # (MIG uuid, GiB) per instance: MIG mode on
    procs: list[FakeProc] = field(default_factory=list)


class FakeNvml:
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, devices: list[FakeGpu]) -> None:
        self.devices = devices
        self.shutdowns = 0

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[int, int | None]:
        if self.devices[index].broken == "handle":
            raise FakeNVMLError("GPU is lost")
        return index, None

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> tuple[int, int | None]:
        for i, d in enumerate(self.devices):
            if d.uuid == uuid:
                return i, None
            for slot, (mig_uuid, _) in enumerate(d.mig or []):
                if mig_uuid == uuid:
                    return i, slot
        raise FakeNVMLError("not found")

    def nvmlDeviceGetUUID(self, handle: tuple[int, int | None]) -> str | bytes:
        index, slot = handle
        d = self.devices[index]
        return d.uuid.encode() if slot is None else (d.mig or [])[slot][0]

    def nvmlDeviceGetName(self, handle: tuple[int, int | None]) -> str | bytes:
        return self.devices[handle[0]].name

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[int, int | None]) -> FakeMem:
        index, slot = handle
        d = self.devices[index]
        if d.broken == "memory":
            raise FakeNVMLError("Insufficient Permissions")
        gib = d.total_gib if slot is None else (d.mig or [])[slot][1]
        return FakeMem(total=int(gib * GIB), used=int(d.used_gib * GIB) if slot is None else 0)

    def nvmlDeviceGetMigMode(self, handle: tuple[int, int | None]) -> tuple[int, int]:
        if self.devices[handle[0]].mig is None:
            raise FakeNVMLError("Not Supported")
        return 1, 1

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: tuple[int, int | None]) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: tuple[int, int | None], slot: int) -> tuple[int, int]:
        if slot >= len(self.devices[handle[0]].mig or []):
            raise FakeNVMLError("Not Found")
        return handle[0], slot

    def nvmlDeviceGetComputeRunningProcesses(self, handle: tuple[int, int | None]) -> list[FakeProc]:
        return self.devices[handle[0]].procs


def eight_gpus() -> list[FakeGpu]:
    """Mixed sizes: 4 × 80 GiB, 2 × 24 GiB, 2 × 16 GiB."""
    sizes = [80, 80, 80, 80, 24, 24, 16, 16]
    return [FakeGpu(uuid=f"GPU-{i:08x}-aaaa", total_gib=s, name=f"gpu{s}") for i, s in enumerate(sizes)]


# ---- inventory -------------------------------------------------------------------------

def test_inventory_lists_every_gpu_with_total_and_used_memory() -> None:
    devices = eight_gpus()
    devices[1].used_gib = 2
    found = gpus.read_inventory(FakeNvml(devices), None)
    assert [g.index for g in found.gpus] == list(range(8)) and not found.faults
    assert [g.memory_total_mb for g in found.gpus] == [s * 1024 for s in (80, 80, 80, 80, 24, 24, 16, 16)]
    assert found.gpus[1].memory_used_mb == 2048
    assert found.gpus[0].uuid == "GPU-00000000-aaaa"  # bytes from NVML decoded
    one = gpus.read_inventory(FakeNvml([FakeGpu("GPU-1", 24)]), None)
    assert one.gpus[0].name == "NVIDIA H100 80GB HBM3" and one.devices()[0]["type"] == "cuda"


@pytest.mark.parametrize("visible, expected", [
    ("1,3", [1, 3]), ("GPU-00000005-aaaa", [5]), ("GPU-00000006", [6]), (" 0 , GPU-00000007-aaaa", [0, 7]),
    ("", []), ("-1", []), ("2,-1,3", [2]), (None, list(range(8))),
])
def test_inventory_honours_cuda_visible_devices(visible: str | None, expected: list[int]) -> None:
    assert [g.index for g in gpus.read_inventory(FakeNvml(eight_gpus()), visible).gpus] == expected


def test_a_faulty_gpu_is_skipped_and_reported() -> None:
    devices = eight_gpus()
    devices[2].broken, devices[5].broken = "handle", "memory"
    found = gpus.read_inventory(FakeNvml(devices), None)
    assert [g.index for g in found.gpus] == [0, 1, 3, 4, 6, 7]
    assert [(f.index, f.error) for f in found.faults] == [
        (2, "FakeNVMLError: GPU is lost"), (5, "FakeNVMLError: Insufficient Permissions")]
    assert found.devices()[-1] == {"type": "cuda", "index": 5, "uuid": None,
                                   "error": "FakeNVMLError: Insufficient Permissions"}
    hidden = gpus.read_inventory(FakeNvml(devices), "0,1")  # not visible: not our fault to report
    assert [g.index for g in hidden.gpus] == [0, 1] and not hidden.faults


def test_a_failing_device_count_is_reported_not_raised() -> None:
    class NoCount(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise FakeNVMLError("Unknown Error")

    found = gpus.read_inventory(NoCount([]), None)
    assert not found.gpus and found.faults[0].index == -1


def test_a_gpu_in_mig_mode_lists_its_instances_not_itself() -> None:
    devices = [FakeGpu("GPU-aaaa", 80, mig=[("MIG-1111", 10), ("MIG-2222", 20)]), FakeGpu("GPU-bbbb", 80)]
    found = gpus.read_inventory(FakeNvml(devices), None)
    assert [(g.uuid, g.memory_total_mb, g.mig_slot) for g in found.gpus] == [
        ("MIG-1111", 10240, 0), ("MIG-2222", 20480, 1), ("GPU-bbbb", 81920, None)]
    assert found.gpus[0].as_device()["mig_slot"] == 0
    assert [g.uuid for g in gpus.read_inventory(FakeNvml(devices), "MIG-2222").gpus] == ["MIG-2222"]
    assert [g.uuid for g in gpus.read_inventory(FakeNvml(devices), "GPU-aaaa").gpus] == ["MIG-1111", "MIG-2222"]
    assert [g.uuid for g in gpus.read_inventory(FakeNvml(devices), "0,1").gpus] == ["GPU-bbbb"]  # MIG: by uuid only


def test_process_memory_comes_from_nvml_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = eight_gpus()
    devices[0].procs = [FakeProc(pid=41, usedGpuMemory=3 * GIB), FakeProc(pid=42, usedGpuMemory=5 * GIB)]
    devices[1].procs = [FakeProc(pid=42, usedGpuMemory=1 * GIB), FakeProc(pid=43, usedGpuMemory=None)]
    monkeypatch.setattr(gpus, "open_nvml", lambda: FakeNvml(devices))
    assert gpus.process_memory_mb((devices[0].uuid, devices[1].uuid), 42) == 6144
    assert gpus.process_memory_mb((devices[1].uuid,), 43) is None  # NVML could not tell
    assert gpus.process_memory_mb((devices[2].uuid,), 42) is None
    monkeypatch.setattr(gpus, "open_nvml", lambda: None)
    assert gpus.process_memory_mb((devices[0].uuid,), 42) is None and agent.gpus() == []


# ---- the pool's plan -------------------------------------------------------------------

def gpu_pool(sizes_gib: list[int], overhead_mb: int = 500) -> Pool:
    return Pool.for_gpus([{"uuid": f"G{i}", "index": i, "memory_total_mb": s * 1024} for i, s in enumerate(sizes_gib)],
                         0.9, overhead_mb, "node n1")


def test_budget_is_memory_times_headroom_less_a_context_per_process() -> None:
    pool = gpu_pool([10])
    use = pool.usage([Holding("a", 1000, ("G0",)), Holding("b", 2000, ("G0",), evictable=True)])["G0"]
    assert use.budget_mb == 9216 - 2 * 500 and use.used_mb == 3000 and use.processes == 2
    assert use.evictable_mb == 2500 and use.free_mb == 9216 - 1000 - 3000


def test_one_gpu_fits_then_is_full() -> None:
    pool = gpu_pool([10])
    assert pool.plan("a", 8000, 1, []).slots == ("G0",)
    with pytest.raises(NoRoom, match="busy or pinned"):
        pool.plan("b", 2000, 1, [Holding("a", 8000, ("G0",))])


def test_eight_mixed_gpus_best_fit_per_gpu() -> None:
    pool = gpu_pool([80, 80, 80, 80, 24, 24, 16, 16])
    assert pool.plan("small", 10_000, 1, []).slots == ("G6",)  # the smallest GPU it fits on
    assert pool.plan("mid", 20_000, 1, []).slots == ("G4",)
    assert pool.plan("big", 60_000, 1, []).slots == ("G0",)
    held = [Holding(f"m{i}", 14_000, (f"G{i}",)) for i in (6, 7)]
    assert pool.plan("small", 10_000, 1, held).slots == ("G4",)  # the 16 GiB ones are full


def test_a_model_larger_than_any_gpu_is_refused_naming_the_sizes() -> None:
    pool = gpu_pool([24, 24, 16, 16])
    held = [Holding("idle", 1000, ("G0",), evictable=True)]
    with pytest.raises(NoRoom) as refused:
        pool.plan("huge", 40_000, 1, held)
    assert "more than any single GPU" in refused.value.message and "22118 of 24576 MiB" in refused.value.message
    assert '"gpus": 2' in refused.value.message  # the way out: spread it
    assert pool.plan("huge", 40_000, 2, []).slots == ("G0", "G1")


def test_eviction_happens_on_the_chosen_gpu_only() -> None:
    pool = gpu_pool([24, 16])
    held = [Holding("old-on-0", 10_000, ("G0",), evictable=True, last_used=1.0),
            Holding("new-on-0", 10_000, ("G0",), evictable=True, last_used=5.0),
            Holding("busy-on-1", 12_000, ("G1",)), Holding("idle-on-1", 2_000, ("G1",), evictable=True, last_used=0.0)]
    plan = pool.plan("x", 9_000, 1, held)
    assert plan.slots == ("G0",) and plan.evict == ("old-on-0",)  # LRU on G0; G1 would not fit even empty of idle
    assert pool.plan("y", 500, 1, held) == Plan(("G0",))  # fits free on G0: nothing evicted
    plan = pool.plan("z", 1_500, 1, held)
    assert plan.slots == ("G1",) and plan.evict == ("idle-on-1",)  # the fewest MiB evicted


def test_models_already_unloading_are_waited_for() -> None:
    pool = gpu_pool([10])
    plan = pool.plan("x", 5000, 1, [Holding("going", 6000, ("G0",), unloading=True)])
    assert plan.wait_for == ("going",) and plan.evict == ()


def test_a_multi_gpu_model_charges_each_gpu_its_share() -> None:
    pool = gpu_pool([24, 24, 24])
    with pytest.raises(NoRoom, match="asks for 4 GPUs"):
        pool.plan("x", 30_000, 4, [])
    plan = pool.plan("x", 30_000, 2, [Holding("y", 5_000, ("G0",))])
    assert plan.slots == ("G0", "G1")  # best fit: G0 has just the room for its half
    use = pool.usage([Holding("x", 30_000, plan.slots)])
    assert use["G0"].used_mb == use["G1"].used_mb == 15_000 and use["G2"].used_mb == 0


def test_a_multi_gpu_model_never_spans_mig_instances() -> None:
    found = gpus.read_inventory(FakeNvml([FakeGpu("GPU-a", 80, mig=[("MIG-1", 40), ("MIG-2", 40)]),
                                          FakeGpu("GPU-b", 80)]), None)
    pool = Pool.for_gpus(found.devices(), 0.9, 500, "node n1")
    assert [s.mig for s in pool.slots] == [True, True, False]
    assert pool.plan("small", 10_000, 1, []).slots == ("MIG-1",)
    with pytest.raises(NoRoom, match="1 whole GPUs; a process can use one MIG instance at most"):
        pool.plan("wide", 20_000, 2, [])


def test_the_cpu_pool_keeps_the_node_budget_and_its_message() -> None:
    pool = Pool.for_cpu(1000, "node n1")
    assert pool.plan("a", 1000, 1, []).slots == ("cpu",)
    with pytest.raises(NoRoom, match="node n1 has 400 MB free of 1000 MB"):
        pool.plan("b", 500, 1, [Holding("a", 600, ("cpu",))])
    assert pool.plan("b", 500, 1, [Holding("a", 600, ("cpu",), evictable=True)]).evict == ("a",)


# ---- the ModelManager with a fake backend process --------------------------------------

_pids = itertools.count(1000)


class FakeBackend:
    """Stands for BackendProcess: records its environment and load; reports ``device``
    (default: the one asked for) and ``memory_mb``."""

    def __init__(self, backend: str, model: str, socket_dir: Path, *, env: dict[str, str],
                 report: dict[str, dict[str, object]], **_: object) -> None:
        self.backend, self.model, self.env, self.report = backend, model, env, report.get(model, {})
        self.pid = next(_pids)
        self.socket_path, self.instance, self.exit_reason = socket_dir / "x.sock", "inst", None
        self.stopped = False
        self.options: dict[str, object] = {}

    def start(self) -> None:
        pass

    def load(self, files: list[str], model_dir: str, options: dict[str, object], device: str,
             timeout_s: float) -> dict[str, object]:
        self.options, self.device = options, device
        return {"ok": True, "memory_mb": self.report.get("memory_mb", 1),
                "device": self.report.get("device", device), "dim": 0}

    def stop(self) -> str:
        self.stopped = True
        return "stopped"

    def crash_reason(self, wait_s: float = 2.0) -> str | None:
        return None

    def log_tail(self, max_lines: int = 20) -> str:
        return ""


@dataclass
class Node:
    manager: ModelManager
    procs: dict[str, FakeBackend]
    report: dict[str, dict[str, object]]
    store: Store

    def load(self, model: str, **manifest: object) -> dict[str, object]:
        job = JobRecord(id=new_job_id(), kind="load", model=model)
        return self.manager.load(job, Manifest(backend="echo", **manifest))  # type: ignore[arg-type]

    def on(self, model: str) -> str | None:
        return next((e.gpu for e in self.manager.entries() if e.model == model), None)

    def held(self) -> list[str]:
        return sorted(e.model for e in self.manager.entries() if e.state != "failed")


def make_node(tmp_path: Path, devices: list[FakeGpu] | None, monkeypatch: pytest.MonkeyPatch,
              node_memory_mb: int = 16384) -> Node:
    monkeypatch.setattr(gpus, "open_nvml", lambda: None if devices is None else FakeNvml(devices))
    settings = load_settings({}, node_id="n1", run_dir=str(tmp_path), node_memory_mb=node_memory_mb,
                             gpu_memory_headroom=0.9, gpu_process_overhead_mb=500)
    store = Store(fakeredis.FakeRedis(decode_responses=True), settings)
    procs: dict[str, FakeBackend] = {}
    report: dict[str, dict[str, object]] = {}

    def factory(backend: str, model: str, socket_dir: Path, **kw: object) -> FakeBackend:
        procs[model] = FakeBackend(backend, model, socket_dir, report=report, **kw)  # type: ignore[arg-type]
        return procs[model]

    found = agent.devices()
    manager = ModelManager(settings, store, agent.memory_budget_mb(settings, found),
                           gpus=[d for d in found if d["type"] == "cuda"],
                           process_factory=factory)  # type: ignore[arg-type]
    return Node(manager, procs, report, store)


def test_a_model_gets_one_gpu_by_uuid_with_pci_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, eight_gpus(), monkeypatch)
    result = node.load("small", memory_mb=10_000)
    assert result["gpu"] == "GPU-00000006-aaaa" and result["device"] == "cuda"  # a 16 GiB GPU: best fit
    proc = node.procs["small"]
    assert proc.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-00000006-aaaa"}
    assert proc.device == "cuda" and "gpu_count" not in proc.options
    node.load("big", memory_mb=60_000)
    assert node.on("big") == "GPU-00000000-aaaa"


def test_a_model_larger_than_any_gpu_is_refused_and_nothing_is_evicted(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, [FakeGpu("GPU-a", 24), FakeGpu("GPU-b", 16)], monkeypatch)
    node.load("idle", memory_mb=1000)
    with pytest.raises(LoadFailed) as refused:
        node.load("huge", memory_mb=30_000)  # fits the sum of the GPUs, not one of them
    assert refused.value.code == ErrorCode.INSUFFICIENT_MEMORY
    assert "more than any single GPU" in refused.value.message and "GPU-a" in refused.value.message
    assert "idle" in node.held() and not node.procs["idle"].stopped and "huge" not in node.procs


def test_full_gpus_evict_on_the_chosen_gpu_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, [FakeGpu("GPU-a", 16), FakeGpu("GPU-b", 16)], monkeypatch)
    node.load("a1", memory_mb=12_000)
    node.load("b1", memory_mb=12_000, pinned=True)
    assert {node.on("a1"), node.on("b1")} == {"GPU-a", "GPU-b"}
    a_gpu = node.on("a1")
    node.load("c", memory_mb=10_000)  # fits on no GPU free; b1 is pinned: a1 is evicted
    assert node.held() == ["b1", "c"] and node.procs["a1"].stopped and not node.procs["b1"].stopped
    assert node.on("c") == a_gpu
    next(e for e in node.manager.entries() if e.model == "c").in_flight = 1  # c is busy now
    with pytest.raises(LoadFailed, match="busy or pinned") as refused:
        node.load("d", memory_mb=10_000)
    assert refused.value.code == ErrorCode.INSUFFICIENT_MEMORY
    assert node.held() == ["b1", "c"] and not node.procs["c"].stopped and "d" not in node.procs


def test_a_multi_gpu_manifest_gets_several_uuids_and_the_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, eight_gpus(), monkeypatch)
    result = node.load("wide", memory_mb=140_000, gpus=2)
    proc = node.procs["wide"]
    assert result["gpu"] == "GPU-00000000-aaaa,GPU-00000001-aaaa"
    assert proc.env["CUDA_VISIBLE_DEVICES"] == "GPU-00000000-aaaa,GPU-00000001-aaaa"
    assert proc.options["gpu_count"] == 2
    record = agent.memory_fields(node.manager)
    rows = {g.uuid: g for g in record["gpus"]}  # type: ignore[attr-defined]
    assert rows["GPU-00000000-aaaa"].used_mb == rows["GPU-00000001-aaaa"].used_mb == 70_000
    assert rows["GPU-00000000-aaaa"].processes == 1 and rows["GPU-00000002-aaaa"].used_mb == 0


def test_device_cpu_gets_no_gpu_and_the_cpu_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, eight_gpus(), monkeypatch, node_memory_mb=2000)
    result = node.load("on-cpu", memory_mb=1500, device="cpu", pinned=True)
    proc = node.procs["on-cpu"]
    assert result["gpu"] is None and proc.device == "cpu"
    assert proc.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ""}
    node.load("opt-cpu", memory_mb=400, options={"device": "cpu"}, pinned=True)
    assert node.procs["opt-cpu"].env["CUDA_VISIBLE_DEVICES"] == ""
    fields = agent.memory_fields(node.manager)
    assert fields["cpu_memory_used_mb"] == 1900
    assert all(g.used_mb == 0 for g in fields["gpus"])  # type: ignore[attr-defined]
    with pytest.raises(LoadFailed, match="free of 2000 MB"):
        node.load("too-big-cpu", memory_mb=1000, device="cpu", pinned=True)


def test_cuda_n_is_refused_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, eight_gpus(), monkeypatch)
    with pytest.raises(LoadFailed, match="the worker assigns GPUs") as refused:
        node.load("m", options={"device": "cuda:1"})
    assert refused.value.code == ErrorCode.INVALID_PARAMS and "m" not in node.procs
    with pytest.raises(LoadFailed, match='set "gpus": 2 instead') as refused:
        node.load("g", options={"gpu_count": 2})  # the GPUs come from the manifest's gpus
    assert refused.value.code == ErrorCode.INVALID_PARAMS and "g" not in node.procs
    node.load("ok", options={"gpu_count": 2}, gpus=2, memory_mb=1000)
    assert node.procs["ok"].options["gpu_count"] == 2 and node.on("ok").count(",") == 1  # type: ignore[union-attr]


def test_cuda_asked_cpu_came_up_fails_the_load_and_stops_the_process(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, [FakeGpu("GPU-a", 24)], monkeypatch)
    node.report["m"] = {"device": "cpu"}
    with pytest.raises(LoadFailed) as refused:
        node.load("m", memory_mb=100)
    assert refused.value.code == ErrorCode.DEVICE_UNAVAILABLE and node.procs["m"].stopped
    assert "allow_cpu_fallback" in refused.value.message
    node.report["l"] = {"device": "cpu"}
    with pytest.raises(LoadFailed, match="CUDA build") as refused:
        node.manager.load(JobRecord(id=new_job_id(), kind="load", model="l"), Manifest(backend="llama-cpp"))
    fields = agent.memory_fields(node.manager)
    assert fields["gpus"][0].used_mb == 0  # type: ignore[index]


def test_with_cpu_fallback_it_is_accounted_as_a_cpu_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, [FakeGpu("GPU-a", 24)], monkeypatch)
    node.report["m"] = {"device": "cpu", "memory_mb": 700}
    result = node.load("m", memory_mb=100, allow_cpu_fallback=True)
    assert result["gpu"] is None and result["memory_mb"] == 700 and not node.procs["m"].stopped
    fields = agent.memory_fields(node.manager)
    assert fields["cpu_memory_used_mb"] == 700 and fields["gpus"][0].used_mb == 0  # type: ignore[index]


def test_cuda_on_a_node_without_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, None, monkeypatch)
    with pytest.raises(LoadFailed, match="no usable GPU") as refused:
        node.load("m", device="cuda")
    assert refused.value.code == ErrorCode.DEVICE_UNAVAILABLE
    node.load("f", device="cuda", allow_cpu_fallback=True, memory_mb=5)
    assert node.procs["f"].env["CUDA_VISIBLE_DEVICES"] == "" and node.procs["f"].device == "cpu"


def test_the_charge_after_a_load_is_what_it_really_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [FakeGpu("GPU-a", 24)]
    node = make_node(tmp_path, devices, monkeypatch)
    node.report["kv"] = {"memory_mb": 3000}  # the backend's report (llama: weights + KV cache)
    assert node.load("kv", memory_mb=1000)["memory_mb"] == 3000
    node.report["low"] = {"memory_mb": 10}  # a report below the estimate: the estimate stands
    assert node.load("low", memory_mb=1000)["memory_mb"] == 1000
    pid = next(_pids) + 1  # the next FakeBackend's pid
    devices[0].procs = [FakeProc(pid=pid, usedGpuMemory=4500 * MIB)]  # NVML: 4000 MiB + the context
    assert node.load("nvml", memory_mb=1000)["memory_mb"] == 4000


def test_a_cpu_node_keeps_its_one_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(tmp_path, None, monkeypatch, node_memory_mb=1000)
    node.load("a", memory_mb=600)
    assert node.procs["a"].device == "cpu" and node.procs["a"].env["CUDA_VISIBLE_DEVICES"] == ""
    node.load("b", memory_mb=600)  # evicts a (idle, unpinned): the node-wide budget as before
    assert node.held() == ["b"]
    fields = agent.memory_fields(node.manager)
    assert (fields["memory_budget_mb"], fields["memory_used_mb"]) == (1000, 600) and "gpus" not in fields


# ---- the node record and its heartbeat -------------------------------------------------

def test_a_faulty_gpu_is_in_the_heartbeat_and_the_heartbeat_works(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    devices = eight_gpus()
    devices[3].broken = "handle"
    node = make_node(tmp_path, devices, monkeypatch)
    found = agent.devices()
    assert len([d for d in found if d["type"] == "cuda" and "error" not in d]) == 7
    node.load("m", memory_mb=5000)
    beat = agent.NodeAgent(node.manager.settings, node.store, node.manager, "modelbay@n1", found, "inst")
    beat.beat()
    record = node.store.get_node("n1")
    assert record is not None and record.device_errors == [
        {"type": "cuda", "index": 3, "uuid": None, "error": "FakeNVMLError: GPU is lost"}]
    assert len(record.gpus) == 7 and record.gpu_process_overhead_mb == 500
    assert record.memory_budget_mb == sum(g.budget_mb for g in record.gpus) + 500  # the one process's context
    assert record.memory_used_mb == 5500 and record.cpu_memory_budget_mb == 16384
    nodes, _ = node.store.placement_view("m")
    assert nodes[0].gpus == record.gpus  # placement reads the per-GPU view


# ---- choose_node ------------------------------------------------------------------------

def gpu_node(node_id: str, free_per_gpu: list[int], loads: int = 0, evictable: int = 0) -> NodeRecord:
    rows = [GpuUsage(uuid=f"{node_id}-{i}", index=i, memory_total_mb=30_000, budget_mb=20_000,
                     used_mb=20_000 - f, evictable_mb=evictable) for i, f in enumerate(free_per_gpu)]
    return NodeRecord(id=node_id, hostname="h", celery_hostname=f"modelbay@{node_id}", pid=1, backends=["echo"],
                      memory_budget_mb=20_000 * len(rows), memory_used_mb=sum(20_000 - f for f in free_per_gpu),
                      gpus=rows, gpu_process_overhead_mb=500, cpu_memory_budget_mb=4000, started_at=utcnow(),
                      last_heartbeat=utcnow(), loads_in_flight=loads)


def cpu_node(node_id: str, budget: int, used: int = 0) -> NodeRecord:
    return NodeRecord(id=node_id, hostname="h", celery_hostname=f"modelbay@{node_id}", pid=1, backends=["echo"],
                      memory_budget_mb=budget, memory_used_mb=used, started_at=utcnow(), last_heartbeat=utcnow())


def test_choose_node_wants_a_single_gpu_that_fits_not_the_sum() -> None:
    m = Manifest(backend="echo", memory_mb=10_000)
    many_small = gpu_node("many-small", [6_000] * 8)  # 48 GB free in all, 6 GB on any one GPU
    one_big = gpu_node("one-big", [12_000], loads=1)
    assert choose_node([many_small, one_big], m).id == "one-big"
    assert choose_node([many_small, gpu_node("evict", [6_000], evictable=6_000)], m).id == "evict"
    wide = Manifest(backend="echo", memory_mb=40_000, gpus=8)  # 5000 + 500 per GPU
    assert choose_node([one_big, many_small], wide).id == "many-small"


def test_choose_node_judges_cpu_models_on_the_cpu_budget_and_cuda_off_cpu_nodes() -> None:
    small_cpu = Manifest(backend="echo", memory_mb=3_000, device="cpu")
    assert choose_node([gpu_node("g", [1_000]), cpu_node("c", 2_000)], small_cpu).id == "g"  # its 4000 MB CPU budget
    cuda = Manifest(backend="echo", memory_mb=1_000, device="cuda")
    assert choose_node([cpu_node("c", 100_000), gpu_node("g", [2_000], loads=5)], cuda).id == "g"
    auto = Manifest(backend="echo", memory_mb=1_000)
    assert choose_node([cpu_node("c", 100_000), gpu_node("g", [2_000], loads=5)], auto).id == "c"


def test_ensure_load_refuses_a_numbered_cuda_device() -> None:
    store = Store(fakeredis.FakeRedis(decode_responses=True), load_settings({}))
    with pytest.raises(InvalidRequest, match="the worker assigns GPUs") as refused:
        dispatcher = Dispatcher(store, object())  # type: ignore[arg-type]
        dispatcher.ensure_load("m", Manifest(backend="echo", options={"device": "cuda:1"}))
    assert refused.value.status == 400 and refused.value.code == ErrorCode.INVALID_PARAMS


def proc_environ(pid: object) -> dict[str, str]:
    """A process's environment, from /proc."""
    return dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)


def test_a_real_backend_process_gets_its_gpu_in_its_environment(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The real BackendProcess (an echo backend, which reports the device it was asked for):
    its environment, read from /proc, names its GPU by uuid and the PCI bus order."""
    devices = [FakeGpu("GPU-aaaa", 24), FakeGpu("GPU-bbbb", 16)]
    monkeypatch.setattr(gpus, "open_nvml", lambda: FakeNvml(devices))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")  # the worker's own: only the second GPU
    settings = load_settings({}, node_id="n1", run_dir=str(tmp_path))
    store = Store(fakeredis.FakeRedis(decode_responses=True), settings)
    found = agent.devices()
    manager = ModelManager(settings, store, agent.memory_budget_mb(settings, found),
                           gpus=[d for d in found if d["type"] == "cuda"])
    try:
        result = manager.load(JobRecord(id=new_job_id(), kind="load", model="e"), Manifest(backend="echo", memory_mb=5))
        assert result["gpu"] == "GPU-bbbb" and result["device"] == "cuda"
        environ = proc_environ(result["pid"])
        assert environ["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb" and environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        result = manager.load(JobRecord(id=new_job_id(), kind="load", model="c"),
                              Manifest(backend="echo", memory_mb=5, device="cpu"))
        environ = proc_environ(result["pid"])
        assert environ["CUDA_VISIBLE_DEVICES"] == "" and result["device"] == "cpu" and result["gpu"] is None
    finally:
        manager.stop_all()
