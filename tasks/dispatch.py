"""Placement and routing (architecture §3), shared by web/ (new requests) and workers/ (re-routing).

- A model ready somewhere: an inference job goes to ``model.<token>``, so any holder pulls it.
- A model held nowhere: place a load on a node (backend supported, memory fits, fewest loads
  in flight, most free memory), and queue the job on ``model.<token>``; it waits there, status
  ``loading``, until a holder consumes the queue. If the load fails, its waiters fail with it.
- A pinned job (``node``) goes to ``node.<id>``, and its load (if one is needed) is placed on
  that node even though the load is a job of its own, detached from the request.
"""
from __future__ import annotations


import math

from celery import Celery

from tasks.errors import Conflict, ErrorCode, InvalidRequest, NotFound, Unavailable
from tasks.backends import BACKEND_EXTRAS, check_task
from tasks.catalog import CatalogCache, model_not_found
from tasks.batches import chunk_route
from tasks.modelstats import Slot
from tasks.publish import queue_key, task_message
from tasks.readypath import StaleManifest
from tasks.names import TASK_INFER, TASK_LOAD, TASK_UNLOAD, model_queue, node_queue
from tasks.schemas import JobRecord, JobRequest, Manifest, ModelNode, NodeRecord, manifest_device, model_size_mb
from tasks.store import Store, new_job_id
from tasks.webhooks import pending


def choose_node(nodes: list[NodeRecord], manifest: Manifest) -> NodeRecord:
    """Pick the node for a new load, or raise :class:`Unavailable` when no live node runs the
    backend. Nodes where the model fits in free memory come first, then those where it fits
    after evicting idle models, then the rest (whose worker then fails the load with
    ``insufficient_memory``: the node's own accounting is the authority). Within a tier:
    fewest loads in flight, then most free memory. On a GPU node "fits" means on single GPUs
    (``manifest.gpus`` of them, each taking its share plus the CUDA context), never the sum
    of its GPUs; a model asking for "cpu" is judged against the node's CPU budget, and one
    asking for "cuda" goes to a node without GPU only as a last resort."""
    able = [n for n in nodes if manifest.backend in n.backends]
    if not able:
        package, extra = BACKEND_EXTRAS.get(manifest.backend, ("", ""))
        hint = f" (a worker needs {package}: pip install 'modelbay[{extra}]')" if extra else ""
        raise Unavailable(f"no live node can run backend {manifest.backend!r}{hint}", code=ErrorCode.NO_NODE)
    need = model_size_mb(manifest)
    device, _ = manifest_device(manifest)

    def rank(n: NodeRecord) -> tuple[int, int, int, str]:
        tier, free = _fit(n, manifest, need, device)
        return (tier, n.loads_in_flight, -free, n.id)

    return min(able, key=rank)


def _fit(n: NodeRecord, manifest: Manifest, need: int, device: str | None) -> tuple[int, int]:
    """(tier, free MiB) of ``need`` MiB on node ``n``: 0 fits free, 1 after evictions, 2 not
    at all, 3 wants a GPU the node lacks."""
    if n.gpus and device != "cpu":
        per = math.ceil(need / manifest.gpus) + n.gpu_process_overhead_mb
        frees = sorted((g.budget_mb - g.used_mb for g in n.gpus), reverse=True)
        if sum(1 for g in n.gpus if g.budget_mb - g.used_mb >= per) >= manifest.gpus:
            return 0, frees[0]
        if sum(1 for g in n.gpus if g.budget_mb - g.used_mb + g.evictable_mb >= per) >= manifest.gpus:
            return 1, frees[0]
        return 2, frees[0]
    if device == "cpu" and n.cpu_memory_budget_mb is not None:
        budget, used, evictable = n.cpu_memory_budget_mb, n.cpu_memory_used_mb, n.cpu_memory_evictable_mb
    else:
        budget, used, evictable = n.memory_budget_mb, n.memory_used_mb, n.memory_evictable_mb
    free = budget - used
    if device == "cuda" and not n.gpus and not manifest.allow_cpu_fallback:
        return 3, free
    return (0 if free >= need else 1 if free + evictable >= need else 2), free


class Dispatcher:
    """Turns intents (load, unload, run a job) into job records and Celery messages."""

    def __init__(self, store: Store, celery: Celery, catalog: CatalogCache | None = None) -> None:
        """``catalog``: a web process's kept manifests (:mod:`tasks.catalog`); a submission
        decided on one of them is checked against the stored manifest."""
        self.store = store
        self.celery = celery
        self.catalog = catalog

    def ensure_load(self, model: str, manifest: Manifest, node: str | None = None,
                    slot: Slot | None = None) -> tuple[JobRecord | None, bool]:
        """Make sure ``model`` is ready or loading (on ``node`` when pinned).

        Returns ``(None, False)`` when it is ready, else ``(load job, created)``: single-flight
        per (model, node), so a second caller gets the job already in flight. A manifest whose
        device names a GPU ("cuda:1": the worker assigns GPUs) is a 400 ``invalid_params``."""
        _, problem = manifest_device(manifest)
        if problem is not None:
            raise InvalidRequest(problem, param="options.device", code=ErrorCode.INVALID_PARAMS)
        nodes, states = self.store.placement_view(model, slot)  # with ``slot``: a queue place, or a 429
        if node is not None:
            target = self._pinned(nodes, node, manifest)
            states = [s for s in states if s.node == node]
        if any(s.state == "ready" for s in states):
            return None, False
        for s in states:
            if s.state in ("staging", "loading"):
                active = self.store.active_load(s.node, model)
                if active is not None:
                    return active, False
        cooling = self.store.cooldown(model)
        if cooling is not None:
            left_s, error = cooling
            raise Unavailable(f"the last load of {model!r} failed ({error}); next try in {left_s:.0f}s",
                              retry_after_s=max(1, math.ceil(left_s)), code=ErrorCode.LOAD_COOLDOWN)
        if node is None:
            target = choose_node(nodes, manifest)
        # ``runner``: the node's process now; if the node comes back as a new process before
        # the load starts, the reaper sees the mismatch and places the load again.
        candidate = JobRecord(id=new_job_id(), kind="load", model=model, node=target.id,
                              runner=target.instance or None)
        record, created = self.store.claim_load(target.id, model, candidate)
        if created:
            self.store.set_model_state(ModelNode(model=model, node=target.id, state="loading",
                                                 load_job=record.id,
                                                 memory_mb=model_size_mb(manifest)))
            self.celery.send_task(TASK_LOAD, args=[record.id], queue=node_queue(target.id))
        return record, created

    def submit(self, request: JobRequest, manifest: Manifest, *, stream: bool = False,
               webhooks: bool = False, job_id: str | None = None) -> JobRecord:
        """Create an inference job and route it; with ``stream`` its pieces go to the job's
        token stream as they are generated; with ``webhooks`` (a ``/v1/jobs`` job, not one
        behind a synchronous OpenAI route) its end is posted to its ``callback_url`` and the
        operator's URLs (tasks/webhooks.py). ``job_id``: the id, when the caller made it
        (:func:`tasks.store.new_job_id`) to listen for the job before it exists."""
        hook = pending(request.callback_url, self.store.settings) if webhooks else None
        record = JobRecord(id=job_id or new_job_id(), kind="inference", model=request.model,
                           task=request.task, input=request.input_json(), params=request.params,
                           node=request.node, pin=request.node, stream=stream,
                           callback_url=request.callback_url, webhook=hook)
        kept = self.catalog.raw_of(request.model, manifest) if self.catalog is not None else None
        slot = self._slot(manifest)  # its number in the model's queue; a 429 at the cap (tasks.modelstats)
        try:
            if self._ready_path(record, manifest, slot, kept):
                return record
            stale = False
        except StaleManifest:
            stale = True
        if kept is not None:  # decided on a kept copy: what follows decides on a fresh read
            manifest = self._fresh(request)
            slot = self._slot(manifest)
            if stale and self._ready_path(record, manifest, slot):
                return record
        try:
            return self.route(record, manifest, create=True, slot=slot)
        except Exception:
            if slot.seq and not record.queue_seq:  # placed no job: give the place back
                self.store.release_slot(record.model)
            raise

    def route(self, record: JobRecord, manifest: Manifest, *, create: bool = False, reroutes: int = 0,
              slot: Slot | None = None) -> JobRecord:
        """Queue ``record`` where a holder of its model will take it, placing a load if none
        holds it. With ``create`` False the record already exists (a re-route): it must still
        be ``queued``/``loading`` and not routed by anyone else since ``record`` was read
        (its ``routed`` count), else nothing is sent and the current record is returned."""
        load, _ = self.ensure_load(record.model, manifest, record.node, slot)
        status = "loading" if load is not None else "queued"
        load_id = load.id if load is not None else None
        if create:
            record.status, record.load_job, record.routed = status, load_id, 1
            record.queue_seq = slot.seq if slot is not None else 0
            self.store.create_job(record)
        else:
            seen = record.routed
            change = self.store.transition(record.id, status, allowed_from=("queued", "loading"),
                                           when=lambda r: r.routed == seen, load_job=load_id, routed=seen + 1)
            if not change.applied or change.record is None:
                return change.record or record
            record = change.record
        if load is not None:
            self.store.add_waiter(load.id, record.id)
            latest = self.store.get_job(load.id)
            if latest is not None and latest.status in ("failed", "cancelled") and latest.error:
                # The load ended between placement and registration: nobody will pop us.
                self.store.fail(record.id, ErrorCode.of(latest.error.type), f"model load failed: {latest.error.message}")
                return self.store.get_job(record.id) or record
        queue = node_queue(record.node) if record.node else model_queue(record.model)
        kwargs: dict[str, int] = {"route": record.routed}
        if reroutes:
            kwargs["reroutes"] = reroutes
        self._send_infer(record.id, kwargs, queue)
        return record

    def _slot(self, manifest: Manifest) -> Slot:
        cap = manifest.max_queued if manifest.max_queued is not None else self.store.settings.max_queued_per_model
        return Slot(cap)

    def _fresh(self, request: JobRequest) -> Manifest:
        """The model's manifest read again: 404 when it is gone, 400 when its backend no longer
        does the task (the checks a route made on its kept copy)."""
        manifest = self.catalog.fresh(request.model) if self.catalog is not None else None
        if manifest is None:
            raise model_not_found(request.model)
        check_task(manifest.backend, request.task, model=request.model)
        return manifest

    def _ready_path(self, record: JobRecord, manifest: Manifest, slot: Slot, kept: str | None = None) -> bool:
        """Create and queue a new job in one round trip when a live node holds its model
        ready (:mod:`tasks.readypath`); False, with nothing done, when the slow path must
        place it: no node holds it ready, the manifest's device is refused, or task events
        are on (the message then goes through Celery's producer). With ``redis_wait_replicas``
        a job that a failover lost before a replica had it is made again by the slow path.
        ``kept``: the stored JSON of a kept ``manifest``; :class:`StaleManifest` when it changed."""
        if self.store.settings.celery_events or manifest_device(manifest)[1] is not None:
            return False
        queue = node_queue(record.node) if record.node else model_queue(record.model)
        if not self.store.submit_ready(record, slot, *self._infer_message(record.id, {"route": 1}, queue), kept,
                                       carry=not record.node):
            return False
        return self.store.replicated() or self.store.get_job(record.id) is not None

    def _send_infer(self, job_id: str, kwargs: dict[str, int], queue: str) -> None:
        """The job's message: one LPUSH (:mod:`tasks.publish`); through Celery's producer
        while task events are on (Flower's ``task-sent``)."""
        if self.store.settings.celery_events:
            self.celery.send_task(TASK_INFER, args=[job_id], kwargs=kwargs, queue=queue)
            return
        self.store.queues.push(*self._infer_message(job_id, kwargs, queue))

    @staticmethod
    def _infer_message(job_id: str, kwargs: dict[str, int], queue: str) -> tuple[str, bytes]:
        """The list an inference message goes on and the message, a batch chunk's at its low priority."""
        priority = int((chunk_route(TASK_INFER, [job_id], kwargs, {}) or {}).get("priority", 0))
        return queue_key(queue, priority), task_message(TASK_INFER, [job_id], kwargs, queue, priority)

    def unload(self, model: str, node: str | None = None) -> list[JobRecord]:
        """One unload job per node that holds (or is loading) ``model``."""
        jobs = []
        for state in self.store.model_nodes(model):
            if node is not None and state.node != node:
                continue
            record = JobRecord(id=new_job_id(), kind="unload", model=model, node=state.node)
            self.store.create_job(record)
            self.celery.send_task(TASK_UNLOAD, args=[record.id], queue=node_queue(state.node))
            jobs.append(record)
        return jobs

    @staticmethod
    def _pinned(nodes: list[NodeRecord], node: str, manifest: Manifest) -> NodeRecord:
        target = next((n for n in nodes if n.id == node), None)
        if target is None:
            raise NotFound(f"node {node!r} is not live", param="node", code=ErrorCode.NODE_NOT_FOUND)
        if manifest.backend not in target.backends:
            raise Conflict(f"node {node!r} cannot run backend {manifest.backend!r}",
                           param="node", code=ErrorCode.BACKEND_UNSUPPORTED)
        return target
