"""A web process's copy of the catalog's manifests, never trusted alone.

Reading a model's manifest was a round trip and a parse on every submission. This keeps each
manifest as last read, and what is decided on a kept copy is checked where it matters:
- a job made on the ready path is made only if the stored manifest is still the copy's, in
  the same script that creates it (:mod:`tasks.readypath`); otherwise nothing is written and
  the dispatcher reads the manifest again and decides again;
- the slow path (placement, a load) reads it again first;
- a refusal for the manifest's sake (404 ``model_not_found``, 400 ``unsupported_task``) is
  only given after a fresh read (:func:`web.util.job_manifest`);
- absence is never kept, and any other reader (``GET /v1/models``, the workers) reads Redis.

So a manifest changed or deleted on another replica never makes a job on the old one: the
cost of a change is one more round trip for the first submission that meets it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from tasks.errors import ErrorCode, NotFound
from tasks.schemas import Manifest

MAX_MODELS = 1024
"""Manifests kept per process; past that the copy starts again empty."""


def model_not_found(name: str) -> NotFound:
    return NotFound(f"model {name!r} is not in the catalog", param="model", code=ErrorCode.MODEL_NOT_FOUND)


class CatalogCache:
    """``read(name)``: the stored manifest's JSON or None (``Store.manifest_raw``). Thread-safe."""

    def __init__(self, read: Callable[[str], str | None], max_models: int = MAX_MODELS) -> None:
        self._read = read
        self._max = max_models
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[str, Manifest]] = {}

    def manifest(self, name: str) -> Manifest | None:
        """The kept copy of ``name``'s manifest, else a fresh read (None: not in the catalog)."""
        kept = self.kept(name)
        return kept if kept is not None else self.fresh(name)

    def kept(self, name: str) -> Manifest | None:
        """The kept copy of ``name``'s manifest, or None; never reads."""
        kept = self._kept.get(name)
        return kept[1] if kept is not None else None

    def fresh(self, name: str) -> Manifest | None:
        """Read ``name``'s manifest now and keep it (or forget it when it is gone)."""
        raw = self._read(name)
        with self._lock:
            if raw is None:
                self._kept.pop(name, None)
                return None
            kept = self._kept.get(name)
            if kept is not None and kept[0] == raw:
                return kept[1]
            if len(self._kept) >= self._max:
                self._kept.clear()
            manifest = Manifest.model_validate_json(raw)
            self._kept[name] = (raw, manifest)
            return manifest

    def raw_of(self, name: str, manifest: Manifest) -> str | None:
        """The stored JSON ``manifest`` was read from, when it is this cache's copy of ``name``
        (checked by identity); None for any other object (a caller's own fresh read)."""
        kept = self._kept.get(name)
        return kept[0] if kept is not None and kept[1] is manifest else None
