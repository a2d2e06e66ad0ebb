"""The Redis store: job records with atomic transitions, the catalog, nodes and model states.

Its Redis keys are named in :mod:`tasks.keys`; its client is private, so every command on
them is here, in :mod:`tasks.nodestore` (nodes), :mod:`tasks.tokens` (token streams) and
:mod:`tasks.queues` (the broker's queues and the reaper's marks, ``store.queues``).

A transition is one compare-and-set script (:mod:`tasks.cas`): a terminal record is never
overwritten, so a ``cancelled`` job never turns ``succeeded``. A failed model's load
cooldown is :mod:`tasks.cooldowns`'.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from collections.abc import Callable, Iterable

import redis
from redis.backoff import ExponentialBackoff
from redis.client import PubSub
from redis.retry import Retry

from tasks.batches import BatchStore
from tasks.cas import JobCas, Note, Write, event_of
from tasks.cooldowns import Cooldowns
from tasks.errors import ErrorCode
from tasks.files import FileIndex
from tasks.modelstats import queue_count
from tasks.keys import (CATALOG, CATALOG_CREATED, INFLIGHT, JOB_CHANNEL_PATTERN, JOBS, OPS, OPS_VER,
                        REPL_BARRIER, job_key, load_flight_key, waiters_key)
from tasks.schemas import (ACTIVE, TERMINAL, JobErrorInfo, JobProgress, JobRecord, Manifest,
                           utcnow)
from tasks.settings import Settings
from tasks.nodestore import NodeStore
from tasks.queues import QueueStore
from tasks.readypath import ReadyPath
from tasks.redisconn import make_client
from tasks.tokens import TokenStream
from tasks.webhooks import Outbox


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Change:
    """The outcome of a mutation: ``applied`` False means the record was left as it is."""

    applied: bool
    record: JobRecord | None
    raw: str | None = None  # the record's JSON as stored, when known (a later write can start from it)


class Store(NodeStore, ReadyPath, Cooldowns):
    """All of modelbay's state in Redis. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._r = client
        self.settings = settings
        self.tokens = TokenStream(client, settings.job_ttl_s)
        self.queues = QueueStore(client)
        self.batches = BatchStore(client, settings.batch_ttl_s)
        self.files = FileIndex(client)  # file records (/v1/files); their bytes are in the file store
        self.webhooks = Outbox(client)  # webhook events waiting to be posted (tasks/webhooks.py)
        self._cas = JobCas(client)

    @classmethod
    def from_settings(cls, settings: Settings, outage_s: float = 1.0) -> Store:
        """A store whose commands ride out a Redis outage (a restart) of about ``outage_s``
        seconds (a Sentinel failover: each retry reconnects to the current master, see
        :mod:`tasks.redisconn`): connection errors are retried with backoff (50 ms doubling to 1 s) for
        that long before they surface. Workers wait long (a job's writes must land); the
        web waits little (it answers 503 instead)."""
        retries = 3
        while sum(min(1.0, 0.05 * 2 ** i) for i in range(retries)) < outage_s:
            retries += 1
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)
        return cls(make_client(settings, retry), settings)

    # ---- jobs -------------------------------------------------------------------------

    def create_job(self, record: JobRecord) -> JobRecord:
        """Write a new job's record; with ``redis_wait_replicas`` only once a replica has it
        (or, none answering in time, the current master has it: see :meth:`replicated`)."""
        for _ in range(3):
            with self._r.pipeline() as pipe:
                pipe.set(job_key(record.id), record.model_dump_json(), nx=True,
                         ex=self._ttl_for(record))
                pipe.zadd(JOBS, {record.id: time.time()})
                if record.kind != "inference":
                    pipe.sadd(OPS, record.id)
                    pipe.incr(OPS_VER)
                pipe.zremrangebyrank(JOBS, 0, -self.settings.jobs_recent_max - 1)
                pipe.execute()
            if self.replicated() or self._r.exists(job_key(record.id)):
                return record
            # written to a master that failed over before a replica had it: write it again
        return record

    def replicated(self) -> bool:
        """Whether every write this process made before the call is on ``redis_wait_replicas``
        replicas (always True with the wait off): a barrier write, then ``WAIT`` for it on
        the same connection (replication is one ordered stream, so it covers the earlier
        writes of every connection). False when fewer had it within ``redis_wait_timeout_ms``:
        no replica in sync, or a failover in between (the write may be lost; look again)."""
        wanted = self.settings.redis_wait_replicas
        if wanted <= 0:
            return True
        with self._r.pipeline(transaction=False) as pipe:
            pipe.incr(REPL_BARRIER)
            pipe.execute_command("WAIT", wanted, self.settings.redis_wait_timeout_ms)
            return int(pipe.execute()[1]) >= wanted

    def get_job(self, job_id: str) -> JobRecord | None:
        raw = self._r.get(job_key(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def get_job_raw(self, job_id: str) -> tuple[JobRecord, str] | None:
        """The record and its JSON as stored (for a later write that starts from it)."""
        raw = self._r.get(job_key(job_id))
        return (JobRecord.model_validate_json(raw), raw) if raw else None

    def mutate(self, job_id: str, fn: Callable[[JobRecord], JobRecord | None], known: str | None = None, *,
               ack: str = "", note: Note | None = None) -> Change:
        """Apply ``fn`` to the record atomically (:mod:`tasks.cas`). ``fn`` returns the new
        record or None (no change). A terminal record is never passed to ``fn``: it is
        returned unchanged. ``known``: the record's JSON as the caller last saw it, which
        saves a read when nobody changed it since. ``ack``: a taken message's tag,
        acknowledged with the write; ``note``: a message recorded as taken, written or not,
        in the first round trip (both :mod:`tasks.cas`)."""
        raw = known if known is not None else self._r.get(job_key(job_id))
        while True:
            if raw is None:
                return Change(False, None)
            current = JobRecord.model_validate_json(raw)
            new = None if current.terminal else fn(current.model_copy(deep=True))
            if new is None:
                if note is not None:  # recorded as taken all the same
                    self.queues.note_taken(note.tag, note.entry, note.at_s)
                return Change(False, current, raw)
            new_raw = new.model_dump_json()
            running, was_running = new.status == "running", current.status == "running"
            inference = new.kind == "inference"
            written, raw = self._cas(Write(
                job_id, raw, new_raw, self._ttl_for(new), leaves_ops=new.terminal and not inference,
                inflight="add" if inference and running else "rem" if inference and was_running else "",
                publish=event_of(current, new, new_raw),
                count=queue_count(current, new), model=new.model, ack=ack, note=note))
            note = None  # recorded by the first round trip
            if written and new.terminal and not self.replicated():
                now = self._r.get(job_key(job_id))  # on no replica yet: lost in a failover?
                if now != new_raw:
                    raw = now  # it was: apply again to what the new master has
                    continue
            if written:
                return Change(True, new, new_raw)

    def transition(self, job_id: str, status: str, *, allowed_from: Iterable[str] = ACTIVE,
                   when: Callable[[JobRecord], bool] | None = None, known: str | None = None,
                   ack: str = "", note: Note | None = None, **fields: object) -> Change:
        """Move a job to ``status`` if its status is in ``allowed_from`` (and ``when`` holds
        for the current record); set ``fields`` too. ``known``, ``ack``, ``note``: see :meth:`mutate`.

        ``started_at``/``finished_at`` are stamped on entering running/loading and terminal."""
        allowed = frozenset(allowed_from)

        def apply(rec: JobRecord) -> JobRecord | None:
            if rec.status not in allowed or (when is not None and not when(rec)):
                return None
            data = rec.model_dump()
            data.update(fields)
            data["status"] = status
            if status in ("loading", "running") and not rec.started_at:
                data["started_at"] = utcnow()
            if status in TERMINAL:
                data["finished_at"] = utcnow()
            return JobRecord.model_validate(data)

        return self.mutate(job_id, apply, known, ack=ack, note=note)

    def finish(self, job_id: str, status: str, *, result: object = None,
               error: JobErrorInfo | None = None, known: str | None = None, ack: str = "") -> Change:
        """Write a terminal state once. Later calls leave the first outcome in place.
        ``ack``: the tag of the taken message that ran the job, acknowledged with the write."""
        fields: dict[str, object] = {"result": result}
        if error is not None:
            fields["error"] = error
        return self.transition(job_id, status, known=known, ack=ack, **fields)

    def fail(self, job_id: str, code: ErrorCode, message: str) -> Change:
        return self.finish(job_id, "failed", error=JobErrorInfo(type=code, message=message))

    def cancel(self, job_id: str, message: str = "cancelled by request") -> Change:
        return self.finish(job_id, "cancelled", error=JobErrorInfo(type=ErrorCode.CANCELLED, message=message))

    def set_progress(self, job_id: str, progress: JobProgress | None) -> Change:
        def apply(rec: JobRecord) -> JobRecord:
            rec.progress = progress
            return rec

        return self.mutate(job_id, apply)

    def list_jobs(self, *, model: str | None = None, status: str | None = None,
                  limit: int = 50) -> list[JobRecord]:
        """Newest first. Scans at most 20 × ``limit`` recent ids."""
        out: list[JobRecord] = []
        ids = self._r.zrevrange(JOBS, 0, max(limit * 20, 100) - 1)
        gone: list[str] = []
        for i in range(0, len(ids), 200):
            chunk = ids[i:i + 200]
            for job_id, raw in zip(chunk, self._r.mget([job_key(j) for j in chunk])):
                if raw is None:
                    gone.append(job_id)
                    continue
                rec = JobRecord.model_validate_json(raw)
                if (model is None or rec.model == model) and (status is None or rec.status == status):
                    out.append(rec)
                    if len(out) >= limit:
                        return out
        if gone:
            self._r.zrem(JOBS, *gone)
        return out

    def _ttl_for(self, record: JobRecord) -> int:
        # Active records also expire, much later, so a job stranded by a lost message goes.
        return self.settings.job_ttl_s if record.terminal else self.settings.job_ttl_s * 7

    def active_ops(self) -> list[JobRecord]:
        """Load and unload jobs that are queued or running, whatever their node's state."""
        ids = sorted(self._r.smembers(OPS))
        out, gone = [], []
        for job_id, raw in zip(ids, self._r.mget([job_key(i) for i in ids]) if ids else []):
            rec = JobRecord.model_validate_json(raw) if raw else None
            if rec is None or rec.terminal:
                gone.append(job_id)
            else:
                out.append(rec)
        if gone:
            self._r.srem(OPS, *gone)
            self._r.incr(OPS_VER)
        return out

    def ops_version(self) -> int:
        """Changes whenever the set of active operations does (see ``mb:ops:ver``)."""
        return int(self._r.get(OPS_VER) or 0)

    def jobs(self, ids: list[str]) -> dict[str, JobRecord]:
        """The records of ``ids`` that exist, in one round trip."""
        if not ids:
            return {}
        raws = self._r.mget([job_key(i) for i in ids])
        return {i: JobRecord.model_validate_json(r) for i, r in zip(ids, raws) if r}

    def job_events(self) -> PubSub:
        """A pub/sub connection subscribed to every job's transitions (``mb:jobev:*``): each
        message's channel ends with the job id, its data is :func:`event_of`'s."""
        pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe(JOB_CHANNEL_PATTERN)
        return pubsub

    def inflight_ids(self) -> list[str]:
        """Inference jobs in ``running`` (``mb:inflight``), for the reaper."""
        return sorted(self._r.smembers(INFLIGHT))

    def forget_inflight(self, job_ids: list[str]) -> None:
        if job_ids:
            self._r.srem(INFLIGHT, *job_ids)

    # ---- catalog ----------------------------------------------------------------------

    def put_manifest(self, name: str, manifest: Manifest) -> bool:
        """Store a manifest. True when it is new, False when it replaced one. The first
        registration time (epoch seconds) is kept in ``mb:catalog:created``."""
        with self._r.pipeline() as pipe:
            pipe.hset(CATALOG, name, manifest.model_dump_json())
            pipe.hsetnx(CATALOG_CREATED, name, int(time.time()))
            new, _ = pipe.execute()
        return bool(new)

    def created_at(self, names: list[str]) -> dict[str, int]:
        """Registration times (epoch seconds) of ``names``; 0 when unknown."""
        values = self._r.hmget(CATALOG_CREATED, names) if names else []
        return {n: int(v or 0) for n, v in zip(names, values, strict=True)}

    def get_manifest(self, name: str) -> Manifest | None:
        raw = self._r.hget(CATALOG, name)
        return Manifest.model_validate_json(raw) if raw else None

    def delete_manifest(self, name: str) -> bool:
        with self._r.pipeline() as pipe:
            pipe.hdel(CATALOG, name)
            pipe.hdel(CATALOG_CREATED, name)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def manifests(self) -> dict[str, Manifest]:
        return {k: Manifest.model_validate_json(v)
                for k, v in sorted(self._r.hgetall(CATALOG).items())}

    # ---- single-flight loads and their waiters ---------------------------------------

    def claim_load(self, node_id: str, model: str, candidate: JobRecord) -> tuple[JobRecord, bool]:
        """Single-flight per (model, node): return the active load job for the pair, or store
        ``candidate`` as the new one. The bool is True when ``candidate`` was created."""
        sf = load_flight_key(node_id, model)
        with self._r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(sf)
                    current_id = pipe.get(sf)
                    if current_id:
                        current = self.get_job(current_id)
                        if current is not None and not current.terminal:
                            pipe.unwatch()
                            return current, False
                    pipe.multi()
                    pipe.set(sf, candidate.id, ex=self.settings.job_ttl_s)
                    pipe.set(job_key(candidate.id), candidate.model_dump_json(),
                             ex=self._ttl_for(candidate))
                    pipe.zadd(JOBS, {candidate.id: time.time()})
                    pipe.sadd(OPS, candidate.id)
                    pipe.incr(OPS_VER)
                    pipe.execute()
                    return candidate, True
                except redis.WatchError:
                    continue

    def active_load(self, node_id: str, model: str) -> JobRecord | None:
        job_id = self._r.get(load_flight_key(node_id, model))
        rec = self.get_job(job_id) if job_id else None
        return rec if rec is not None and not rec.terminal else None

    def release_load(self, node_id: str, model: str, job_id: str) -> None:
        """Clear the single-flight key if it still names ``job_id``."""
        sf = load_flight_key(node_id, model)
        with self._r.pipeline() as pipe:
            try:
                pipe.watch(sf)
                if pipe.get(sf) == job_id:
                    pipe.multi()
                    pipe.delete(sf)
                    pipe.execute()
                else:
                    pipe.unwatch()
            except redis.WatchError:
                pass  # someone else changed it: it no longer names our job

    def add_waiter(self, load_job_id: str, job_id: str) -> None:
        key = waiters_key(load_job_id)
        with self._r.pipeline() as pipe:
            pipe.sadd(key, job_id)
            pipe.expire(key, self.settings.job_ttl_s)
            pipe.execute()

    def pop_waiters(self, load_job_id: str) -> list[str]:
        key = waiters_key(load_job_id)
        with self._r.pipeline() as pipe:
            pipe.smembers(key)
            pipe.delete(key)
            members, _ = pipe.execute()
        return sorted(members)

    # ---- misc -------------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except redis.RedisError:
            return False
