"""Crash loops: a model whose backend keeps dying after good loads stops being loaded.

Each crash of a ready model's backend is noted in ``mb:crashes:<model token>`` (a sorted set
of crash times, epoch seconds, trimmed to the last ``backend_crash_window_s``). When it holds
``backend_crash_limit`` crashes, the model enters the load cooldown of
:meth:`tasks.store.Store.note_load_failure` (at least ``backend_crash_cooldown_s``) with a
message that names the cause, so new
requests get 503 ``load_cooldown`` with ``Retry-After`` instead of loading it again, only to
crash again. A later crash inside the window extends the cooldown (it doubles each time).
Crashes during a load are not counted here: the failed load already starts a cooldown.
"""
from __future__ import annotations

import time

from tasks.store import Store


def note_crash(store: Store, model: str, reason: str) -> float | None:
    """Record a crash of ``model``'s backend (``reason``: how it ended, "was killed by
    SIGSEGV (signal 11)"). Returns the cooldown in seconds it started, or None while the
    model is under the limit."""
    settings = store.settings
    window_s = settings.backend_crash_window_s
    count = store.count_crash(model, time.time(), window_s)
    if count < settings.backend_crash_limit:
        return None
    return store.note_load_failure(
        model, f"it loaded, but its backend crashed {count} times in {window_s:g}s, the last time it {reason}",
        minimum_s=settings.backend_crash_cooldown_s)
