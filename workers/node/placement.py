"""Where a model goes on this node and what must be evicted for it: memory accounted per GPU.

A :class:`Pool` is a set of slots, each with its own budget in MiB:

- the GPU pool: one slot per GPU (or MIG instance), budget = its memory ×
  ``gpu_memory_headroom`` less ``gpu_process_overhead_mb`` (the CUDA context) for each backend
  process placed on it;
- the CPU pool: one slot, ``"cpu"``, budget ``node_memory_mb``, no overhead.

A model spans ``count`` slots (a manifest's ``gpus``; 1 on the CPU) and charges each of them
``ceil(size / count)`` plus the overhead. :meth:`Pool.plan` chooses the slots: those where it
fits in free memory first (best fit: the least left over), then those where it fits after
evicting idle unpinned models on that slot (least-recently-used first, the fewest MiB
evicted), then those where models already unloading will make room. It raises
:class:`NoRoom` (nothing evicted) naming the slots' sizes when no choice fits.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

CPU = "cpu"


@dataclass(frozen=True)
class Slot:
    """A GPU (``id`` its uuid) or the CPU (``id`` "cpu"); memory in MiB."""

    id: str
    index: int
    name: str
    total_mb: int
    budget_mb: int  # total × headroom, before the processes' overheads
    mig: bool = False  # a MIG instance: CUDA shows a process one MIG instance at most


@dataclass(frozen=True)
class Holding:
    """A model that holds (or has reserved) memory in a pool."""

    model: str
    size_mb: int
    slots: tuple[str, ...]
    evictable: bool = False  # ready, idle, unpinned, not unloading
    unloading: bool = False
    last_used: float = 0.0  # monotonic seconds: least recently used is evicted first


@dataclass(frozen=True)
class SlotUse:
    """A slot's budget (after its processes' overheads), what its models use and what
    evicting the idle ones frees (their share and their overhead), in MiB."""

    budget_mb: int
    used_mb: int = 0
    evictable_mb: int = 0
    processes: int = 0

    @property
    def free_mb(self) -> int:
        return self.budget_mb - self.used_mb


@dataclass(frozen=True)
class Plan:
    """The slots chosen, the models to evict first (LRU first), and the models already
    unloading that must be gone before it fits."""

    slots: tuple[str, ...]
    evict: tuple[str, ...] = ()
    wait_for: tuple[str, ...] = ()


class NoRoom(Exception):
    """No choice of slots fits the model, even after evicting every idle model."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(order=True)
class _Option:
    rank: tuple[int, int, int]
    slot: str = field(compare=False)
    evict: list[Holding] = field(compare=False, default_factory=list)
    wait_for: list[str] = field(compare=False, default_factory=list)


def share_mb(size_mb: int, count: int) -> int:
    """What a model of ``size_mb`` spread over ``count`` slots charges each, in MiB."""
    return math.ceil(size_mb / max(1, count))


class Pool:
    """Slots and the rules to charge them; ``gpu`` pools name GPUs in their messages."""

    def __init__(self, slots: list[Slot], overhead_mb: int, where: str, gpu: bool) -> None:
        self.slots = slots
        self.overhead_mb = overhead_mb
        self.where = where  # "node <id>", for messages
        self.gpu = gpu

    @classmethod
    def for_gpus(cls, gpus: Iterable[dict[str, object]], headroom: float, overhead_mb: int, where: str) -> Pool:
        slots = [Slot(id=str(g["uuid"]), index=int(str(g.get("index", 0))), name=str(g.get("name", "")),
                      total_mb=int(str(g["memory_total_mb"])),
                      budget_mb=int(int(str(g["memory_total_mb"])) * headroom), mig="mig_slot" in g) for g in gpus]
        return cls(slots, overhead_mb, where, gpu=True)

    @classmethod
    def for_cpu(cls, budget_mb: int, where: str) -> Pool:
        return cls([Slot(id=CPU, index=0, name="cpu", total_mb=budget_mb, budget_mb=budget_mb)], 0, where, gpu=False)

    def usage(self, holdings: Iterable[Holding]) -> dict[str, SlotUse]:
        """Each slot's :class:`SlotUse` with ``holdings`` in it."""
        acc = {s.id: [s.budget_mb, 0, 0, 0] for s in self.slots}
        for h in holdings:
            charge = share_mb(h.size_mb, len(h.slots))
            for slot in h.slots:
                if slot in acc:
                    row = acc[slot]
                    row[0] -= self.overhead_mb
                    row[1] += charge
                    row[2] += charge + self.overhead_mb if h.evictable else 0
                    row[3] += 1
        return {k: SlotUse(*v) for k, v in acc.items()}

    def plan(self, model: str, size_mb: int, count: int, holdings: list[Holding]) -> Plan:
        """Where ``model`` (``size_mb`` over ``count`` slots) goes; :class:`NoRoom` if nowhere."""
        if count > len(self.slots):
            raise NoRoom(f"{model} asks for {count} GPUs (manifest gpus); {self.where} has "
                         f"{len(self.slots)}: {self._sizes()}")
        need = share_mb(size_mb, count) + self.overhead_mb
        if need > max(s.budget_mb for s in self.slots):
            raise NoRoom(self._too_large(model, size_mb, count))
        use = self.usage(holdings)
        slots = [s for s in self.slots if count == 1 or not s.mig]  # one process spans whole GPUs only
        options = [o for o in (self._option(s.id, need, use[s.id], holdings) for s in slots) if o is not None]
        if len(options) < count:
            raise NoRoom(self._busy(model, size_mb, count, use))
        chosen = sorted(options)[:count]
        victims = sorted({h.model: h for o in chosen for h in o.evict}.values(), key=lambda h: h.last_used)
        waits = sorted({m for o in chosen for m in o.wait_for})
        return Plan(tuple(o.slot for o in chosen), tuple(h.model for h in victims), tuple(waits))

    def _option(self, slot: str, need: int, use: SlotUse, holdings: list[Holding]) -> _Option | None:
        free = use.free_mb
        if free >= need:
            return _Option((0, free - need, 0), slot)
        here = [h for h in holdings if slot in h.slots]
        freed, evict = 0, []
        for h in sorted((h for h in here if h.evictable), key=lambda h: h.last_used):
            if free + freed >= need:
                break
            evict.append(h)
            freed += share_mb(h.size_mb, len(h.slots)) + self.overhead_mb
        if free + freed >= need:
            return _Option((1, freed, free + freed - need), slot, evict)
        draining = [h for h in here if h.unloading]
        freed += sum(share_mb(h.size_mb, len(h.slots)) + self.overhead_mb for h in draining)
        if free + freed >= need:
            return _Option((2, freed, free + freed - need), slot, evict, [h.model for h in draining])
        return None

    def _sizes(self) -> str:
        if not self.gpu:
            return f"a budget of {self.slots[0].budget_mb} MB (MODELBAY_NODE_MEMORY_MB)"
        return "GPU budgets " + ", ".join(
            f"{s.index}{' ' + s.name if s.name else ''} ({s.id[:12]}): {s.budget_mb} of {s.total_mb} MiB"
            for s in self.slots)

    def _too_large(self, model: str, size_mb: int, count: int) -> str:
        if not self.gpu:
            return f"{model} needs {size_mb} MB; {self.where} has {self._sizes()}"
        largest = max(s.budget_mb for s in self.slots) - self.overhead_mb
        spread = math.ceil(size_mb / max(1, largest))
        hint = (f"; set \"gpus\": {spread} in the manifest to spread it over {spread} GPUs"
                if count < spread <= len(self.slots) else "")
        return (f"{model} needs {size_mb} MiB over {count} GPU(s) ({share_mb(size_mb, count)} MiB each, plus "
                f"{self.overhead_mb} MiB of CUDA context), more than any single GPU of {self.where} offers: "
                f"{self._sizes()}{hint}")

    def _busy(self, model: str, size_mb: int, count: int, use: dict[str, SlotUse]) -> str:
        if count > 1 and sum(1 for s in self.slots if not s.mig) < count:
            return (f"{model} asks for {count} GPUs (manifest gpus) but {self.where} has "
                    f"{sum(1 for s in self.slots if not s.mig)} whole GPUs; a process can use one MIG instance at most")
        if not self.gpu:
            slot = use[CPU]
            return (f"{model} needs {size_mb} MB; {self.where} has {slot.free_mb} MB free of "
                    f"{self.slots[0].budget_mb} MB and busy or pinned models hold the rest")
        free = ", ".join(f"{s.index} ({s.id[:12]}): {use[s.id].free_mb} free of {s.budget_mb}" for s in self.slots)
        return (f"{model} needs {share_mb(size_mb, count)} MiB (plus {self.overhead_mb} MiB of CUDA context) on "
                f"{count} GPU(s); on {self.where} no GPU has room even after evicting its idle models, busy or "
                f"pinned models hold the rest (MiB per GPU: {free})")
