"""Stage a manifest's files into the node's cache: ``models_dir/<model token>/<path>``.

Every file lands first in a content-addressed blob store, ``models_dir/.blobs/<key>``
(``key``: the manifest's sha256, else ``uri-`` + the sha256 of the source URI), and the
model's entry is a hard link to the blob (a copy where linking fails). So two models that
share a file on one node transfer it once, and a load after a restart transfers nothing:

- ``<key>.lock``: ``flock``'d while one stager checks, fills or links the blob; a second
  stager of the same blob waits (polling, so it can be cancelled) and then reuses it. The
  kernel drops the lock when its holder dies. Lock files stay (empty); removing them would
  race with a waiter.
- ``<key>.json``: the blob's size, mtime_ns and sha256, and the source URI (with a local
  source's size and mtime_ns), written after the blob. A blob is reused when its size and
  mtime_ns still match this record (no rehash) and the record fits the manifest: its sha256
  when the manifest has one, else the same URI (and an unchanged local source) and size.
- ``<key>.tmp-<random>``: a blob being filled, hashed while written, fsync'd, then renamed
  into place (``os.replace``), so no reader ever sees half a file. A mismatch, an error or a
  cancel removes it; a dead stager's leftover is removed by the next holder of the lock, or
  by :func:`sweep`. Blobs are read-only (0444): every model that links one shares it.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ErrorCode, InvalidRequest
from tasks.schemas import FileSpec, Manifest
from tasks.settings import Settings
from tasks.sources import (Source, allowed_local_path, check_manifest, dest_path, expand_directories,
                           file_rel_path, package_file, parse_source)
from tasks.sources import model_dir as model_dir_of
from workers.staging.blobs import blob_key, fsync_dir, link, locked, reusable, sweep
from workers.staging.fetch import download
from workers.staging.output import StagingError, copy_local

__all__ = ["StageProgress", "StagedModel", "StagingError", "stage", "sweep"]

log = logging.getLogger("modelbay.worker")

RATE_WINDOW_S = 5.0     # rate_bps is measured over this many seconds


@dataclass
class StageProgress:
    """One progress event. Sizes in bytes, ``rate_bps`` in bytes/s (bytes transferred over the
    last RATE_WINDOW_S; reused files do not count), ``eta_s`` in seconds."""

    event: str               # "start" | "progress" | "file_complete" | "complete" | "error"
    file: str | None         # the file's path inside the model dir
    file_index: int          # 1-based index of the current file (0 at start)
    files_total: int
    bytes_done: int          # staged so far, all files of this load (reused ones count as done)
    bytes_total: int | None  # None while a size is unknown
    rate_bps: float
    eta_s: float | None
    message: str | None = None


@dataclass
class StagedModel:
    """The staged model: its directory, its files in manifest order, and sizes in bytes."""

    model_dir: Path
    files: list[Path]
    bytes_total: int
    bytes_copied: int        # transferred from sources this time (0 when all were reused)


@dataclass
class _Item:
    spec: FileSpec
    source: Source
    rel: str
    dest: Path
    size: int | None


class _Tracker:
    """Turns byte counts into :class:`StageProgress` events; ``bytes_done`` never goes back."""

    def __init__(self, on_progress: Callable[[StageProgress], None], items: list[_Item]) -> None:
        self.on_progress = on_progress
        self.items = items
        self.index = 0
        self.finished = 0            # bytes of the files done
        self.current = 0             # bytes of the current file so far
        self.reported = 0
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        self.moved = 0               # bytes transferred, for the rate
        self._others: tuple[int, int | None] | None = None

    def total(self) -> int | None:
        """The sum of all sizes, or None while one is unknown. Once staging runs, only the
        current file's size changes, so the others are summed once per file."""
        if self._others is None or self._others[0] != self.index:
            rest = [item.size for i, item in enumerate(self.items, 1) if i != self.index]
            self._others = (self.index, None if None in rest else sum(s for s in rest if s is not None))
        current = self.items[self.index - 1].size if self.index else 0
        return None if self._others[1] is None or current is None else self._others[1] + current

    def transferred(self, n: int, received: int) -> None:
        self.moved += n
        self.current = received
        self.samples.append((time.monotonic(), self.moved))
        self.emit("progress")

    def file_done(self, size: int) -> None:
        self.items[self.index - 1].size = size
        self.finished += size
        self.current = 0
        self.emit("file_complete")

    def emit(self, event: str, message: str | None = None) -> None:
        now = time.monotonic()
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t0, m0 = self.samples[0]
        rate = (self.moved - m0) / (now - t0) if now > t0 else 0.0
        self.reported = max(self.reported, self.finished + self.current)
        total = self.total()
        eta = max(0.0, total - self.reported) / rate if total is not None and rate > 0 else None
        item = self.items[self.index - 1] if self.index else None
        try:
            self.on_progress(StageProgress(event, item.rel if item else None, self.index, len(self.items),
                                           self.reported, total, rate, eta, message))
        except Exception as exc:  # progress never fails staging
            log.warning("staging progress callback failed: %s", exc)


def stage(model: str, manifest: Manifest, settings: Settings, on_progress: Callable[[StageProgress], None],
          cancelled: Callable[[], bool] = lambda: False) -> StagedModel:
    """Stage ``manifest``'s files for ``model`` under ``settings.models_dir``; see the module
    docstring. Sends "start", "progress", one "file_complete" per file, then "complete" to
    ``on_progress``, or "error" before raising :class:`StagingError`."""
    models_dir = Path(settings.models_dir)
    tracker = _Tracker(on_progress, [])
    try:
        try:
            manifest = manifest.model_copy(update={"files": expand_directories(manifest, settings.file_root_list)})
            check_manifest(model, manifest, settings)
            items = []
            for spec in manifest.files:
                source = parse_source(spec.uri)
                items.append(_Item(spec, source, file_rel_path(spec, source),
                                   dest_path(models_dir, model, spec), spec.size))
        except InvalidRequest as exc:
            raise StagingError(ErrorCode.SOURCE_REJECTED, exc.message) from exc
        for item in items:
            item.size = item.size if item.size is not None else _size_hint(models_dir, item, settings)
        tracker.items = items
        model_dir = model_dir_of(models_dir, model)
        model_dir.mkdir(parents=True, exist_ok=True)
        tracker.emit("start")
        copied = 0
        for tracker.index, item in enumerate(items, 1):
            size, moved = _stage_file(models_dir, item, settings, tracker, cancelled)
            copied += moved
            tracker.file_done(size)
        tracker.emit("complete")
        return StagedModel(model_dir, [item.dest for item in items], tracker.finished, copied)
    except StagingError as exc:
        tracker.emit("error", str(exc))
        raise
    except Exception as exc:  # OSError mostly: a full disk, a permission, a vanished directory
        log.warning("staging %s failed", model, exc_info=not isinstance(exc, OSError))
        error = StagingError(ErrorCode.STAGING_FAILED, f"staging failed: {exc}")
        tracker.emit("error", str(error))
        raise error from exc


def _local_source(item: _Item, settings: Settings) -> Path | None:
    """The resolved local file of a ``file://``/path or ``pkg://`` source; None for HTTP."""
    source = item.source
    if source.kind == "local":
        path = allowed_local_path(source.path, settings.file_root_list)
        if path is None:
            raise StagingError(ErrorCode.SOURCE_REJECTED, f"{source.path} is outside every allowed file root")
        return path
    if source.kind == "pkg":
        found = package_file(source.package, source.path)
        if found is None:
            raise StagingError(ErrorCode.SOURCE_UNREACHABLE,
                               f"{source.uri}: no such file in an installed package {source.package!r}")
        return found
    return None


def _size_hint(models_dir: Path, item: _Item, settings: Settings) -> int | None:
    """A size known before the transfer: a local source's, or a reusable blob's (bytes)."""
    try:
        if item.source.kind != "http":
            local = _local_source(item, settings)
            return local.stat().st_size if local is not None else None
        key = blob_key(item.spec)
        return reusable(models_dir / ".blobs" / key, models_dir / ".blobs" / f"{key}.json", item.spec, None)
    except (StagingError, OSError):
        return None  # the transfer will tell


def _stage_file(models_dir: Path, item: _Item, settings: Settings, tracker: _Tracker,
                cancelled: Callable[[], bool]) -> tuple[int, int]:
    """Put one file in place; ``(size_bytes, bytes_transferred)``."""
    blobs = models_dir / ".blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    key = blob_key(item.spec)
    blob, meta = blobs / key, blobs / f"{key}.json"
    with locked(blobs / f"{key}.lock", cancelled):
        spec, local, src_stat = item.spec, None, None
        size = reusable(blob, meta, spec, None) if spec.sha256 else None
        if size is None:  # the source is looked at only when the blob cannot be trusted as is
            local = _local_source(item, settings)
            src_stat = local.stat() if local is not None else None
            if not spec.sha256:
                size = reusable(blob, meta, spec, src_stat)
        if size is None:
            for stale in [*blobs.glob(f"{key}.tmp-*"), *blobs.glob(f"{key}.json.tmp-*")]:
                stale.unlink(missing_ok=True)  # a dead stager's
            if src_stat is not None and item.size is None:
                item.size = src_stat.st_size
            size = _fill_blob(blob, meta, blobs, item, local, src_stat, tracker, cancelled,
                              settings.allow_private_sources)
            moved = size
        else:
            item.size, moved = size, 0
        link(blob, item.dest)
    return size, moved


def _fill_blob(blob: Path, meta: Path, blobs: Path, item: _Item, local: Path | None,
               src_stat: os.stat_result | None, tracker: _Tracker, cancelled: Callable[[], bool],
               allow_private: bool = False) -> int:
    """Transfer the source into a temp file, verify, and rename it to ``blob``; its size.
    ``allow_private``: fetch from loopback/private/link-local hosts too (workers/staging/fetch.py)."""
    spec = item.spec
    need = spec.size if spec.size is not None else item.size
    if need is not None and shutil.disk_usage(blobs).free < need:
        raise StagingError(ErrorCode.STAGING_FAILED, f"not enough disk space for {item.rel} ({need} bytes) in {blobs}")
    tmp = blobs / f"{blob.name}.tmp-{secrets.token_hex(6)}"
    try:
        if local is not None:
            size, digest = copy_local(str(local), tmp, tracker.transferred, cancelled)
        else:
            def on_size(total: int) -> None:
                item.size = total

            size, digest = download(item.source.url, tmp, on_size, tracker.transferred, cancelled, spec.size,
                                    allow_private)
        if spec.size is not None and size != spec.size:
            raise StagingError(ErrorCode.HASH_MISMATCH, f"size mismatch for {item.rel}: the manifest says "
                               f"{spec.size} bytes, the source has {size}")
        if spec.sha256 is not None and digest != spec.sha256:
            raise StagingError(ErrorCode.HASH_MISMATCH,
                               f"sha256 mismatch for {item.rel}: expected {spec.sha256}, got {digest}")
        os.chmod(tmp, 0o444)  # a blob is shared by every model that links it: nobody writes to it
        os.replace(tmp, blob)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(blobs)
    st = blob.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "uri": spec.uri}
    if src_stat is not None:
        record.update(source_size=src_stat.st_size, source_mtime_ns=src_stat.st_mtime_ns)
    tmp_meta = blobs / f"{meta.name}.tmp-{secrets.token_hex(6)}"
    tmp_meta.write_text(json.dumps(record))
    os.replace(tmp_meta, meta)
    return size


