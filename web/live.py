"""Each web process's view of live progress, and the merged operations rows.

One subscriber per process (a :class:`~tasks.bus.Bus` thread, started after fork, on first
use) applies the workers' NATS events to an :class:`~web.ops.OpsTable`. Rows for
``GET /api/operations`` are the Redis baseline (load and unload jobs not yet ended, on live
nodes) with the live table laid over it, one row per operation: every replica answers the
same, and with NATS down the rows remain with the coarse progress of the job records.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from pydantic import ValidationError

from tasks.bus import Bus
from tasks.batches import operation_row
from tasks.events import ROW_FIELDS, ProgressEvent
from tasks.names import progress_wildcards
from tasks.schemas import JobProgress, JobRecord
from tasks.settings import Settings
from tasks.store import Store
from web.ops import OpsTable
from web.perprocess import PerProcess

log = logging.getLogger("modelbay.web")

UNMEASURED = frozenset({"loading"})  # phases without a percentage (LoadModel tells nothing until done)
BASELINE_REFRESH_S = 1.0   # the longest the coarse progress of baseline rows may be cached
NODES_REFRESH_S = 0.5      # the longest the set of live nodes may be cached


class Live:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.table = OpsTable(ttl_s=settings.ops_ttl_s, error_grace_s=settings.ops_error_grace_s)
        self.bus: Bus | None = None
        self._subscriber = PerProcess(self._start)
        self._cache: tuple[int, float, list[dict[str, Any]]] | None = None
        self._nodes: tuple[float, set[str]] | None = None

    def ensure_started(self) -> None:
        self._subscriber.ensure()

    def _start(self) -> None:
        """A fresh table and subscriber for this process."""
        self.table = OpsTable(ttl_s=self.settings.ops_ttl_s, error_grace_s=self.settings.ops_error_grace_s)
        self.bus = Bus(self.settings.nats_url, name=f"web-{os.getpid()}")
        for subject in progress_wildcards(self.settings.nats_prefix):
            self.bus.subscribe(subject, self._on_message)
        self.bus.start()

    def _on_message(self, subject: str, data: bytes) -> None:
        try:
            event = ProgressEvent.model_validate_json(data)
        except ValidationError as exc:
            log.warning("ignoring a progress message on %s that is not a progress event: %s", subject,
                        exc.errors(include_url=False)[:3])
            return
        self.table.apply(event.model_dump())

    # ---- rows -------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """The merged operations, oldest first, identical on every replica."""
        self.ensure_started()
        live_nodes = self._live_nodes()
        active = self._active()  # every load/unload not yet ended, on any node
        active_ids = {row["id"] for row in active}
        rows = {row["id"]: row for row in active if row["node"] in live_nodes}
        for op in self.table.live_rows():  # read-only: overlay builds new dicts
            key = op.get("job") or op["op"]
            base = rows.get(key)
            if base is not None:
                rows[key] = overlay(base, op)
            elif key in active_ids or op.get("status") == "error" or op.get("kind") == "inference":
                # Not in the baseline: its node is gone (the mirror expires after its TTL) or
                # it failed (its error lingers for a grace period).
                rows[key] = overlay(None, op)
            # else: its job already ended in Redis and the "complete" was lost: no phantom.
        for batch in self.store.batches.active():  # batches: from Valkey alone (tasks/batches.py)
            if batch.status in ("in_progress", "finalizing", "cancelling"):
                rows[batch.id] = operation_row(batch, self.store.batches.done(batch.id), time.time())
        return sorted(rows.values(), key=_row_order)

    def _live_nodes(self) -> set[str]:
        """Ids of the live nodes, re-read at most every ``NODES_REFRESH_S``."""
        now = time.monotonic()
        if self._nodes is None or now - self._nodes[0] >= NODES_REFRESH_S:
            self._nodes = (now, {n.id for n in self.store.live_nodes(include_draining=True)})
        return self._nodes[1]

    def _active(self) -> list[dict[str, Any]]:
        """Baseline rows of the active operations. Which operations exist is exact on every
        call (one counter read); their coarse progress is re-read at most every
        ``BASELINE_REFRESH_S`` (the live overlay carries the fresh progress)."""
        version = self.store.ops_version()
        cached = self._cache
        if cached is not None and cached[0] == version and time.monotonic() - cached[1] < BASELINE_REFRESH_S:
            return cached[2]
        rows = [baseline_row(rec) for rec in self.store.active_ops()]
        self._cache = (version, time.monotonic(), rows)
        return rows

    def job_progress(self, record: JobRecord) -> JobProgress | None:
        """The live progress of ``record``'s operation, when it is fresher than the record's.
        Workers name every operation after its job, so this is one lookup per poll."""
        if record.terminal:
            return None
        self.ensure_started()
        op = self.table.get(record.id)
        if op is None:
            return None
        base = record.progress
        done = max(op.get("bytes_done") or 0, (base.bytes_done or 0) if base else 0)
        phase = op.get("phase") or op.get("kind") or "staging"
        return JobProgress(phase=phase, progress=None if phase in UNMEASURED else
                           max(op.get("progress") or 0.0, (base.progress or 0.0) if base else 0.0),
                           bytes_done=done, bytes_total=op.get("bytes_total"), file=op.get("file"),
                           file_index=op.get("file_index"), files_total=op.get("files_total"),
                           step=op.get("step"), steps=op.get("steps"), message=op.get("message"))


def baseline_row(rec: JobRecord) -> dict[str, Any]:
    p = rec.progress
    kind = "unloading" if rec.kind == "unload" else (p.phase if p else ("loading" if rec.status == "loading" else "queued"))
    return {"id": rec.id, "kind": kind, "model": rec.model, "node": rec.node, "job": rec.id,
            "phase": p.phase if p else rec.status, "file": p.file if p else None,
            "file_index": p.file_index if p else None, "files_total": p.files_total if p else None,
            "bytes_done": p.bytes_done if p else None, "bytes_total": p.bytes_total if p else None,
            "rate_bps": None, "eta_s": None, "progress": _percent(kind, p.progress if p else 0.0),
            "message": p.message if p else None,
            "error": rec.error.message if rec.error else None, "started_at": rec.started_at or rec.created_at,
            "updated_at": rec.started_at or rec.created_at, "live": False}


def overlay(base: dict[str, Any] | None, op: dict[str, Any]) -> dict[str, Any]:
    """The live op over its baseline row, as a new dict (a cached base is never changed).
    Progress never goes backwards: the larger of the two byte counts wins (the record and
    NATS are debounced apart)."""
    get = op.get
    if base is None:
        row = {key: get(key) for key in ROW_FIELDS}
        row["id"] = get("job") or op["op"]
    else:
        row = {key: (value if (value := get(key)) is not None else base.get(key)) for key in ROW_FIELDS}
        row["id"] = base["id"]
        for key in ("bytes_done", "progress"):
            theirs, mine = base.get(key), row[key]
            if theirs is not None and mine is not None and theirs > mine:
                row[key] = theirs
    row["progress"] = _percent(row.get("kind"), row.get("progress"))
    row["live"] = True
    return row


def _percent(kind: str | None, progress: float | None) -> float | None:
    """``progress``, or None in a phase that has no percentage (a record or baseline from
    the staging that went before must not show through)."""
    return None if kind in UNMEASURED else progress


def _row_order(row: dict[str, Any]) -> tuple[str, str]:
    return (row.get("started_at") or "", row["id"])
