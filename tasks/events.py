"""The one message that crosses processes on NATS, and the row the web builds from it.

A worker publishes a :class:`ProgressEvent` for each step of a live operation (a load:
staging then loading; an unload; a streamed inference) on ``progress_subject(...)``; every web
replica applies the events to its table and answers ``GET /api/operations`` with
:class:`OperationRow` rows (architecture §5). Both are defined here once; the web's OpenAPI
document shows :class:`OperationRow` as it is.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The progress details an event carries (kept by the publisher between events: a tick that
# does not name the file still belongs to the last one named).
DETAIL_FIELDS = ("file", "file_index", "files_total", "bytes_done", "bytes_total", "rate_bps", "eta_s", "step",
                 "steps", "message")

class Transfer(BaseModel):
    """Where a staging is: the file being copied and the bytes so far (both an event and a row)."""

    file: str | None = None
    file_index: int | None = None
    files_total: int | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    rate_bps: float | None = Field(default=None, description="bytes/s over the last few seconds (live only)")
    eta_s: float | None = Field(default=None, description="seconds left at that rate (live only)")


EventStatus = Literal["start", "progress", "file_complete", "complete", "error", "keepalive"]


class ProgressEvent(Transfer):
    """Version 1 of a live-progress event. ``seq`` only grows per operation and ``origin``
    names the publishing process, which is authoritative for its operation."""

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    op: str
    kind: str = Field(description="staging, loading, unloading or inference")
    status: EventStatus
    seq: int
    origin: str = Field(description="node:pid:random of the publishing worker process")
    model: str
    node: str
    job: str | None = None
    phase: str
    step: int | None = None
    steps: int | None = None
    message: str | None = None
    progress: float | None = Field(default=None, description="percent; none while a phase has no measure")
    error: str | None = None
    started_at: str
    ts: float = Field(description="seconds since the epoch when it was sent")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class OperationRow(Transfer):
    """A live operation (a load, an unload, a staging, a streamed inference, a batch)."""

    id: str
    kind: str | None = None
    model: str | None = None
    node: str | None = None
    job: str | None = None
    phase: str | None = None
    progress: float | None = None
    message: str | None = None
    error: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    live: bool = Field(description="true when live progress (NATS) is laid over the job record")
    # A batch's row (kind "batch", read from Valkey): its lines answered, of its total, and lines/s.
    lines_done: int | None = None
    lines_total: int | None = None
    rate_lps: float | None = None


# The fields of a row that come from the event or the job record (``live`` is set by the merge).
ROW_FIELDS = tuple(name for name in OperationRow.model_fields if name != "live")
