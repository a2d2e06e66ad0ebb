"""A batch's input file, read once (streamed): validated line by line and split into chunks of
up to ``batch_chunk_lines`` lines of one model (see :mod:`workers.jobs.batch`)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from tasks.batches import (DUPLICATE_CUSTOM_ID, EMPTY_FILE, INVALID_JSON_LINE, INVALID_METHOD, INVALID_URL,
                           MAX_ERRORS, MODEL_NOT_FOUND, BatchErrors, BatchLineError, BatchRecord, batch_prefix,
                           part_key)
from tasks.files import content_key
from tasks.filestore import FileStore
from workers.jobs.batch_files import filestore
from workers.runtime import Runtime

log = logging.getLogger("modelbay.worker")
LEASE_S = 60


@dataclass
class Splitter:
    """The state of one pass over the input file."""

    rt: Runtime
    batch: BatchRecord
    fs: FileStore
    errors: list[BatchLineError] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    known: dict[str, bool] = field(default_factory=dict)  # model name → registered
    buffers: dict[str, list[bytes]] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    chunk_models: list[int] = field(default_factory=list)
    lines: int = 0

    def error(self, line: int, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(BatchLineError(code=code, message=message, param=param, line=line))

    def check(self, number: int, raw: bytes) -> str | None:
        """The line's model when it is good; else its error is noted and None returned."""
        try:
            line = json.loads(raw)
        except ValueError:
            self.error(number, INVALID_JSON_LINE, "the line is not valid JSON")
            return None
        if not isinstance(line, dict):
            self.error(number, INVALID_JSON_LINE, "the line is not a JSON object")
            return None
        custom_id = line.get("custom_id")
        body = line.get("body")
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            self.error(number, INVALID_JSON_LINE, "custom_id must be a non-empty string", "custom_id")
        elif custom_id in self.seen:
            self.error(number, DUPLICATE_CUSTOM_ID, f"custom_id {custom_id!r} is used by an earlier line",
                       "custom_id")
        else:
            self.seen.add(custom_id)
        if line.get("method") != "POST":
            self.error(number, INVALID_METHOD, "method must be POST", "method")
        if line.get("url") != self.batch.endpoint:
            self.error(number, INVALID_URL, f"url must be the batch's endpoint {self.batch.endpoint}, "
                       f"got {line.get('url')!r}", "url")
        if not isinstance(model, str) or not model:
            self.error(number, INVALID_JSON_LINE, "body.model must be a non-empty string", "body.model")
            return None
        if model not in self.known:
            self.known[model] = self.rt.store.get_manifest(model) is not None
        if not self.known[model]:
            self.error(number, MODEL_NOT_FOUND, f"model {model!r} is not in the catalog", "body.model")
            return None
        return model

    def add(self, model: str, raw: bytes) -> None:
        buffer = self.buffers.setdefault(model, [])
        buffer.append(raw)
        if len(buffer) >= self.rt.settings.batch_chunk_lines:
            self.flush(model)

    def flush(self, model: str) -> None:
        buffer = self.buffers.pop(model, [])
        if not buffer or self.errors:
            return
        if model not in self.models:
            self.models.append(model)
        self.fs.put_bytes(part_key(self.batch.id, len(self.chunk_models), "in"), b"\n".join(buffer) + b"\n")
        self.chunk_models.append(self.models.index(model))


def split(rt: Runtime, batch: BatchRecord, holder: str) -> BatchRecord | None:
    """Validate and split ``batch``'s input file; the batch after: ``in_progress`` (its chunks
    written, no job made yet), ``failed`` (with its errors) or as it was (cancelled meanwhile)."""
    fs = filestore(rt.settings)
    fs.delete_prefix(batch_prefix(batch.id))  # a split that a dead worker left half done
    s = Splitter(rt, batch, fs)
    for number, raw in enumerate(fs.iter_lines(content_key(batch.input_file_id)), 1):
        if not raw.strip():
            continue
        s.lines += 1
        model = s.check(number, raw)
        if model is not None:
            s.add(model, raw)
        if number % 1000 == 0:
            rt.store.batches.lease(batch.id, holder, LEASE_S)
            current = rt.store.batches.get(batch.id)
            if current is None or current.status != "validating":
                fs.delete_prefix(batch_prefix(batch.id))
                return current
    for model in list(s.buffers):
        s.flush(model)
    if s.lines == 0:
        s.error(1, EMPTY_FILE, "the input file has no requests")
    if s.lines > rt.settings.batch_max_lines:
        s.error(s.lines, "too_many_requests", f"the input file has {s.lines} requests; the most is "
                f"{rt.settings.batch_max_lines} (MODELBAY_BATCH_MAX_LINES)")
    if s.errors:
        fs.delete_prefix(batch_prefix(batch.id))
        log.info("batch %s refused: %d bad line(s)", batch.id, len(s.errors))
        return rt.store.batches.move(batch.id, "failed", allowed_from=("validating",),
                                     errors=BatchErrors(data=s.errors).model_dump(),
                                     request_counts={"total": s.lines, "completed": 0, "failed": 0})
    return rt.store.batches.move(batch.id, "in_progress", allowed_from=("validating",), chunks=len(s.chunk_models),
                                 models=s.models, chunk_models=s.chunk_models,
                                 request_counts={"total": s.lines, "completed": 0, "failed": 0})
