"""The models a node holds: one supervised backend process per loaded model.

A load runs in the load task's thread and is detached from every request: only
:meth:`ModelManager.unload` (an explicit unload or delete, an eviction, or keep-alive expiry)
stops it. Memory is accounted per GPU, and for CPU models against the node's CPU budget
(:mod:`workers.node.placement`): a load goes where it fits, evicting least-recently-used idle,
unpinned models on that GPU only when needed, and fails with ``insufficient_memory`` (evicting
nothing) when no GPU can take it. Its device rules are in :mod:`workers.node.devices`.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.node.crashes import note_crash
from workers.supervisor.exits import describe_exit
from tasks.errors import ErrorCode
from tasks.names import model_from_token, model_queue, model_token
from tasks.schemas import JobRecord, Manifest, ModelNode, model_size_mb, utcnow
from tasks.settings import Settings
from tasks.store import Store
from workers.node.stranded import mark_orphaned
from workers import metrics
from workers.supervisor.calls import BackendCallError, BackendError, load_deadline_s
from workers.node.devices import accounted_mb, backend_env, backend_options, came_up_on_cpu, device_for
from workers.node.entry import Entry, LoadFailed, NotHere, Unloaded
from workers.node.gpus import process_memory_mb
from workers.node.placement import CPU, NoRoom, Pool
from workers.node.taker import QueueTaker
from workers.staging.stage import StagedModel, StageProgress, StagingError, stage
from workers.supervisor.process import BackendProcess

__all__ = ["Entry", "LoadFailed", "ModelManager", "NotHere", "Unloaded"]

log = logging.getLogger("modelbay.worker")

# stage(model, manifest, settings, on_progress, cancelled) -> StagedModel (workers.staging.stage.stage)
Stager = Callable[..., StagedModel]
ProgressSink = Callable[[str, dict[str, Any]], None]
# BackendProcess(backend, model, socket_dir, **kwargs): the seam unit tests replace
ProcessFactory = Callable[..., BackendProcess]


class ModelManager:
    """Loads, holds and unloads models on this node, and mirrors their state into Redis."""

    def __init__(self, settings: Settings, store: Store, budget_mb: int,
                 stager: Stager = stage, gpus: list[dict[str, Any]] | None = None,
                 process_factory: ProcessFactory = BackendProcess, taker: QueueTaker | None = None) -> None:
        """``taker``: the consumer of this worker's model queues (None: none, as in unit tests)."""
        self.settings = settings
        # NVML records ("uuid", "index", "memory_total_mb"); a faulty device (with "error") is no GPU
        self.gpus = [g for g in gpus or [] if "error" not in g]
        self.store = store
        self.budget_mb = budget_mb  # the CPU budget (MODELBAY_NODE_MEMORY_MB); GPUs have their own
        where = f"node {settings.node_id}"
        self.cpu_pool = Pool.for_cpu(budget_mb, where)
        self.gpu_pool = Pool.for_gpus(self.gpus, settings.gpu_memory_headroom, settings.gpu_process_overhead_mb,
                                      where) if self.gpus else None
        self.stager = stager
        self.process_factory = process_factory
        self.taker = taker
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self.socket_dir = Path(tempfile.mkdtemp(prefix=f"mb-{settings.node_id[:16]}-"))
        self.log_dir = Path(settings.run_dir).resolve() / "logs" / settings.node_id
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ---- loading ----------------------------------------------------------------------

    def load(self, job: JobRecord, manifest: Manifest,
             progress: ProgressSink = lambda event, fields: None) -> dict[str, object]:
        """Stage the files, start the backend and load the model; returns the load's result.
        Raises :class:`LoadFailed`. A model already ready here is not loaded again."""
        with self._lock:
            entry = self._entries.get(job.model)
            mine = entry is None or entry.state == "failed"
            if mine:
                entry = Entry(model=job.model, manifest=manifest, load_job=job.id,
                              size_mb=model_size_mb(manifest),
                              state="staging" if manifest.files else "loading")
                self._entries[job.model] = entry
        if not mine:
            entry.settled.wait()
            if entry.state != "ready":
                raise entry.error or LoadFailed(ErrorCode.LOAD_FAILED, "the load in flight failed")
            return {"node": self.settings.node_id, "already_loaded": True}
        started = time.monotonic()
        self._publish(entry)
        try:
            entry.device = device_for(manifest, self.gpu_pool is not None)
            self._make_room(entry)
            files, model_dir, size_bytes = self._stage(entry, progress)
            entry.state = "loading"
            self._publish(entry)
            progress("loading", {"message": f"loading {entry.model} on {self.settings.node_id}"})
            result = self._start_and_load(entry, files, model_dir, size_bytes)
        except LoadFailed as exc:
            self._settle_failed(entry, exc)
            raise
        entry.state, entry.loaded_at = "ready", utcnow()
        self._touch(entry)
        self._publish(entry)
        self._consume(model_queue(entry.model), True)
        entry.settled.set()
        result.update(node=self.settings.node_id, load_s=round(time.monotonic() - started, 3),
                      memory_mb=entry.size_mb)
        return result

    def _stage(self, entry: Entry, progress: ProgressSink) -> tuple[list[str], str, int]:
        manifest = entry.manifest
        if not manifest.files:
            return [], "", 0
        def on_progress(p: StageProgress) -> None:
            progress(p.event, {k: getattr(p, k) for k in ("file", "file_index", "files_total", "bytes_done",
                                                           "bytes_total", "rate_bps", "eta_s", "message")})

        try:
            staged = self.stager(entry.model, manifest, self.settings, on_progress, lambda: entry.unloading)
        except StagingError as exc:
            if entry.unloading:
                raise Unloaded(str(exc)) from exc
            raise LoadFailed(exc.code, str(exc)) from exc
        metrics.STAGING_BYTES.inc(staged.bytes_copied)
        if manifest.memory_mb is None:  # the real size is known now: account for it
            entry.size_mb = -(-staged.bytes_total // (1024 * 1024))
            self._make_room(entry)
        return [str(f) for f in staged.files], str(staged.model_dir), staged.bytes_total

    def _start_and_load(self, entry: Entry, files: list[str], model_dir: str, size_bytes: int) -> dict[str, object]:
        manifest = entry.manifest
        device = entry.device or "cpu"
        gpus = entry.slots if entry.on_gpu else ()
        proc = self.process_factory(
            manifest.backend, entry.model, self.socket_dir, env=backend_env(device, gpus),
            start_timeout_s=self.settings.backend_start_timeout_s,
            stop_grace_s=self.settings.backend_stop_grace_s,
            log_path=self.log_dir / f"{model_token(entry.model)[:80]}.log",
            on_exit=lambda code, e=entry: self._on_exit(e, code),
            health_interval_s=self.settings.backend_health_interval_s,
            health_timeout_s=self.settings.backend_health_timeout_s,
            health_failures=self.settings.backend_health_failures)
        with self._lock:
            if entry.unloading:
                raise Unloaded()
            entry.proc = proc
        try:
            proc.start()
            info = proc.load(files, model_dir, backend_options(manifest, device, gpus), device,
                             timeout_s=load_deadline_s(size_bytes, base_s=self.settings.load_base_timeout_s))
        except BackendError as exc:
            crashed = proc.crash_reason(wait_s=1.0)  # a failed load of a live process waits 1 s here
            proc.stop()
            if entry.unloading:
                raise Unloaded() from exc
            if crashed is not None:  # died inside LoadModel: the load itself or its warm-up
                tail = proc.log_tail(5)
                raise LoadFailed(ErrorCode.BACKEND_CRASHED, f"backend process {crashed} during the load (which runs "
                                 f"the model once to warm it up)" + (f"; its last lines:\n{tail}" if tail else "")) from exc
            # A backend that refuses the options (INVALID_ARGUMENT) is the request's fault: invalid_params.
            raise LoadFailed(exc.job_code if isinstance(exc, BackendCallError) else exc.code, str(exc)) from exc
        try:
            self._settle_device(entry, str(info.get("device") or ""), int(str(info.get("memory_mb") or 0)))
        except LoadFailed:
            proc.stop()
            raise
        return {"pid": proc.pid, "backend": manifest.backend, "device": info.get("device"), "dim": info.get("dim"),
                "gpu": entry.gpu}

    def _settle_device(self, entry: Entry, reported: str, reported_mb: int) -> None:
        """After the load: a process given a GPU that came up elsewhere fails, or (with
        ``allow_cpu_fallback``) becomes a CPU model; the charge becomes what it really uses
        (:func:`workers.node.devices.accounted_mb`)."""
        estimate = entry.size_mb
        if entry.on_gpu:
            error = came_up_on_cpu(entry.manifest, entry.slots, reported)
            if error is not None:
                raise error
            if not reported.startswith("cuda"):
                log.warning("%s was given GPU %s but came up on %s: accounted as a CPU model", entry.model,
                            entry.gpu, reported or "an unknown device")
                with self._lock:
                    entry.device, entry.slots = "cpu", (CPU,)
                entry.size_mb = max(estimate, reported_mb)
                self._make_room(entry)
                return
        nvml_mb = process_memory_mb(entry.slots, entry.proc.pid if entry.proc else None) if entry.on_gpu else None
        overhead = self.settings.gpu_process_overhead_mb if entry.on_gpu else 0
        with self._lock:
            entry.size_mb = accounted_mb(estimate, reported_mb, nvml_mb, overhead, len(entry.slots))
        if entry.size_mb > estimate:
            log.info("%s takes %d MiB, more than the %d MiB estimated", entry.model, entry.size_mb, estimate)

    def _pool(self, entry: Entry) -> Pool:
        return self.gpu_pool if entry.on_gpu and self.gpu_pool is not None else self.cpu_pool

    def _make_room(self, entry: Entry) -> None:
        """Choose where ``entry`` goes (:meth:`Pool.plan`) and reserve it there, evicting LRU
        idle unpinned models on the chosen GPU(s) only and waiting for models already
        unloading there; raise ``insufficient_memory`` (evicting nothing) when it fits nowhere."""
        while True:
            with self._lock:
                pool = self._pool(entry)
                others = [e.holding() for e in self._entries.values()
                          if e is not entry and e.state != "failed" and e.on_gpu == entry.on_gpu]
                try:
                    plan = pool.plan(entry.model, entry.size_mb, entry.manifest.gpus if pool.gpu else 1, others)
                except NoRoom as exc:
                    raise LoadFailed(ErrorCode.INSUFFICIENT_MEMORY, exc.message) from None
                if not plan.evict and not plan.wait_for:
                    entry.slots = plan.slots  # reserved: the next plan counts it
                    return
                victim = self._entries.get(plan.evict[0]) if plan.evict else None
                if victim is not None:
                    victim.unloading = True  # claimed under the lock: no new job acquires it
                draining = [e for m in plan.wait_for if (e := self._entries.get(m)) is not None]
            if victim is None:  # only models already unloading can make room: wait for one
                if draining:
                    draining[0].settled.wait(self.settings.backend_stop_grace_s + 5)
                continue
            log.info("evicting %s (%d MB, idle, on %s) to make room for %s", victim.model, victim.size_mb,
                     victim.gpu or "the CPU", entry.model)
            metrics.EVICTIONS.inc()
            self.unload(victim.model)

    def _settle_failed(self, entry: Entry, exc: LoadFailed) -> None:
        entry.state, entry.error = "failed", exc
        if isinstance(exc, Unloaded):
            with self._lock:
                if self._entries.get(entry.model) is entry:
                    del self._entries[entry.model]
            self.store.delete_model_state(self.settings.node_id, entry.model)
        else:
            self._publish(entry)
        entry.settled.set()

    def _on_exit(self, entry: Entry, returncode: int) -> None:
        """The backend process died on its own: the model is lost on this node. Its calls in
        flight fail (the supervisor's doing); the next request loads it again."""
        if entry.unloading:
            return
        log.error("backend for %s exited unexpectedly (code %s)", entry.model, returncode)
        was_ready = entry.state == "ready"
        entry.crashed = True
        entry.state = "failed"
        why = entry.proc.exit_reason if entry.proc is not None else None
        entry.error = LoadFailed(ErrorCode.BACKEND_CRASHED, f"backend process {why or describe_exit(returncode)}")
        if was_ready:
            self._consume(model_queue(entry.model), False)
            self._note_crash(entry.model, why or describe_exit(returncode))
        self._publish(entry)
        entry.settled.set()

    def _note_crash(self, model: str, reason: str) -> None:
        try:
            cooldown_s = note_crash(self.store, model, reason)
        except Exception as exc:  # a Redis blip must not hide the crash itself
            log.warning("could not count the crash of %s: %s", model, exc)
            return
        if cooldown_s is not None:
            log.error("%s crashes in a loop; new loads wait %gs", model, cooldown_s)

    # ---- using ------------------------------------------------------------------------

    def acquire(self, model: str, cancelled: Callable[[], bool]) -> Entry:
        """The ready entry for ``model``, waiting while it loads here. Raises :class:`NotHere`
        (not here, being unloaded, or ``cancelled()`` while waiting) or :class:`LoadFailed`."""
        while True:
            with self._lock:
                entry = self._entries.get(model)
                if entry is None or entry.unloading:
                    raise NotHere(model)
                if entry.state == "ready":
                    entry.in_flight += 1
                    metrics.INFLIGHT.labels(model=entry.model).set(entry.in_flight)
                    return entry
                if entry.state == "failed":
                    if entry.crashed:
                        raise NotHere(model)
                    raise entry.error or LoadFailed(ErrorCode.LOAD_FAILED, "model failed on this node")
            if entry.settled.wait(0.2):
                continue
            if cancelled():
                raise NotHere(model)

    def release(self, entry: Entry) -> None:
        """A job is done with ``entry``. Its ``in_flight`` and ``last_used`` reach the store
        with the next heartbeat (:meth:`republish`), not with every job."""
        with self._lock:
            entry.in_flight = max(0, entry.in_flight - 1)
            metrics.INFLIGHT.labels(model=entry.model).set(entry.in_flight)
            self._touch(entry)

    @staticmethod
    def _touch(entry: Entry) -> None:
        entry.last_used, entry.last_used_mono = utcnow(), time.monotonic()

    # ---- unloading --------------------------------------------------------------------

    def unload(self, model: str, *, stop_consuming: bool = True) -> str:
        """Stop the model's backend (staging, loading or ready). Returns how it ended.

        ``stop_consuming`` False leaves the model queue's taker and the sweep's mark alone: at
        worker shutdown the taker has stopped taking already."""
        with self._lock:
            entry = self._entries.get(model)
            if entry is None:
                return "not_loaded"
            entry.unloading = True
            was_ready = entry.state == "ready"
            entry.state = "unloading"
        if was_ready and stop_consuming:
            self._consume(model_queue(model), False)
        self._publish(entry)
        how = entry.proc.stop() if entry.proc is not None else "never_started"
        with self._lock:
            if self._entries.get(model) is entry:
                del self._entries[model]
        self.store.delete_model_state(self.settings.node_id, model)
        entry.settled.set()
        return how

    def expire_idle(self) -> list[str]:
        """Unload ready models idle longer than their keep-alive (manifest, else the
        setting; 0 keeps them). Pinned models stay. Returns the unloaded names."""
        now = time.monotonic()
        expired = []
        for entry in self.entries():
            keep_s = entry.manifest.keep_alive_s
            keep_s = self.settings.keep_alive_s if keep_s is None else keep_s
            if keep_s > 0 and entry.idle_evictable and now - entry.last_used_mono > keep_s:
                log.info("unloading %s: idle for more than %gs", entry.model, keep_s)
                self.unload(entry.model)
                expired.append(entry.model)
        return expired

    def stop_all(self) -> None:
        for model in list(self._entries):
            try:
                self.unload(model, stop_consuming=False)
            except Exception:  # shutting down: keep stopping the others
                log.exception("stopping %s", model)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    # ---- views ------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def loads_in_flight(self) -> int:
        return sum(1 for e in self.entries() if e.state in ("staging", "loading"))

    def republish(self) -> None:
        for entry in self.entries():
            self._publish(entry)

    def _publish(self, entry: Entry) -> None:
        proc = entry.proc
        live = proc is not None and entry.state == "ready"
        state = ModelNode(
            model=entry.model, node=self.settings.node_id, state=entry.state,  # type: ignore[arg-type]
            in_flight=entry.in_flight, last_used=entry.last_used, loaded_at=entry.loaded_at,
            load_job=entry.load_job, error=entry.error.message if entry.error else None,
            pid=proc.pid if live else None, socket=str(proc.socket_path) if live else None,
            instance=proc.instance if proc is not None else None, memory_mb=entry.size_mb)
        try:
            self.store.set_model_state(state)
        except Exception as exc:  # state mirroring must not break a load
            log.warning("could not publish state of %s: %s", entry.model, exc)

    def _consume(self, queue: str, start: bool) -> None:
        """Start or stop consuming the model queue ``queue`` on this worker (its taker,
        :mod:`workers.node.taker`). A queue that loses this consumer may have none left: it
        is noted for the sweep (:mod:`workers.node.stranded`)."""
        if not start:
            mark_orphaned(self.store, [model_from_token(queue[len("model."):])], quiet=True)
        if self.taker is not None:
            (self.taker.consume if start else self.taker.cancel)(queue)
