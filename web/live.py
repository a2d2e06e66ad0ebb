"""Each web process's view of live progress, and the merged operations rows.

One subscriber per process (a :class:`~tasks.bus.Bus` thread, started after fork, on first
use) applies the workers' NATS events to an :class:`~tasks.ops.OpsTable`. Rows for
``GET /api/operations`` are the Redis baseline (load and unload jobs not yet ended, on live
nodes) with the live table laid over it, one row per operation: every replica answers the
same, and with NATS down the rows remain with the coarse progress of the job records.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from tasks.bus import Bus
from tasks.names import progress_wildcards
from tasks.ops import OpsTable
from tasks.schemas import JobProgress, JobRecord
from tasks.settings import Settings
from tasks.store import Store

log = logging.getLogger("modelbay.web")

ROW_FIELDS = ("id", "kind", "model", "node", "job", "phase", "file", "file_index", "files_total",
              "bytes_done", "bytes_total", "progress", "message", "error", "started_at", "updated_at")


class Live:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.table = OpsTable(ttl_s=settings.ops_ttl_s, error_grace_s=settings.ops_error_grace_s)
        self.bus: Bus | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self.table = OpsTable(ttl_s=self.settings.ops_ttl_s, error_grace_s=self.settings.ops_error_grace_s)
            self.bus = Bus(self.settings.nats_url, name=f"web-{os.getpid()}")
            for subject in progress_wildcards(self.settings.nats_prefix):
                self.bus.subscribe(subject, self._on_message)
            self.bus.start()

    def _on_message(self, subject: str, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            log.warning("ignoring a progress message that is not JSON on %s", subject)
            return
        if isinstance(event, dict):
            self.table.apply(event)

    # ---- rows -------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """The merged operations, oldest first, identical on every replica."""
        self.ensure_started()
        live_nodes = {n.id for n in self.store.live_nodes()}
        rows = {rec.id: baseline_row(rec) for rec in self.store.active_ops() if rec.node in live_nodes}
        orphans = []
        for op in self.table.snapshot():
            key = op.get("job") or op["op"]
            if key in rows:
                rows[key] = overlay(rows[key], op)
            else:
                orphans.append((key, op))
        # A live op whose job already ended in Redis lost its "complete": drop it now rather
        # than wait for its TTL. Ops of dead nodes stay until their TTL (DESIGN 5).
        ended = {k for k, rec in self.store.jobs([k for k, _ in orphans]).items() if rec.terminal}
        for key, op in orphans:
            if key not in ended or op.get("status") == "error":
                rows[key] = overlay(None, op)
        return sorted(rows.values(), key=lambda r: (r.get("started_at") or "", r["id"]))

    def job_progress(self, record: JobRecord) -> JobProgress | None:
        """The live progress of ``record``'s operation, when it is fresher than the record's."""
        self.ensure_started()
        op = self.table.by_job(record.id)
        if op is None or record.terminal:
            return None
        base = record.progress
        done = max(op.get("bytes_done") or 0, (base.bytes_done or 0) if base else 0)
        return JobProgress(phase=op.get("phase") or op.get("kind") or "staging",
                           progress=max(op.get("progress") or 0.0, base.progress if base else 0.0),
                           bytes_done=done, bytes_total=op.get("bytes_total"), file=op.get("file"),
                           file_index=op.get("file_index"), files_total=op.get("files_total"),
                           message=op.get("message"))


def baseline_row(rec: JobRecord) -> dict[str, Any]:
    p = rec.progress
    kind = "unloading" if rec.kind == "unload" else (p.phase if p else ("loading" if rec.status == "loading" else "queued"))
    return {"id": rec.id, "kind": kind, "model": rec.model, "node": rec.node, "job": rec.id,
            "phase": p.phase if p else rec.status, "file": p.file if p else None,
            "file_index": p.file_index if p else None, "files_total": p.files_total if p else None,
            "bytes_done": p.bytes_done if p else None, "bytes_total": p.bytes_total if p else None,
            "progress": p.progress if p else 0.0, "message": p.message if p else None,
            "error": rec.error.message if rec.error else None, "started_at": rec.started_at or rec.created_at,
            "updated_at": rec.started_at or rec.created_at, "live": False}


def overlay(base: dict[str, Any] | None, op: dict[str, Any]) -> dict[str, Any]:
    """The live op over its baseline row. Progress never goes backwards: the larger of the
    two byte counts wins (the record and NATS are debounced apart)."""
    row = dict(base) if base else {"id": op.get("job") or op["op"]}
    for key in ROW_FIELDS[1:]:
        if key in ("bytes_done", "progress") and base is not None:
            row[key] = max(v for v in (op.get(key), base.get(key), 0) if v is not None)
        elif op.get(key) is not None or base is None:
            row[key] = op.get(key)
    row["live"] = True
    return row
