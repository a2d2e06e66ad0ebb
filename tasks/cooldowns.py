"""A model's load cooldown: after a failed load, new loads of the model wait (base, doubling,
capped); a backend's crashes are counted over a window, for the caller to decide on. A mixin
of :class:`tasks.store.Store`."""
from __future__ import annotations

import json
import time
import uuid

import redis

from tasks.keys import cooldown_key, crashes_key
from tasks.settings import Settings


class Cooldowns:
    """Load cooldowns, a mixin of :class:`tasks.store.Store`."""

    _r: redis.Redis
    settings: Settings

    def note_load_failure(self, model: str, message: str, minimum_s: float = 0.0) -> float:
        """Record a failed load; returns the cooldown in seconds (base, doubling, capped; at
        least ``minimum_s``)."""
        key = cooldown_key(model)
        raw = self._r.get(key)
        failures = (json.loads(raw)["failures"] if raw else 0) + 1
        base, cap = self.settings.load_cooldown_base_s, self.settings.load_cooldown_max_s
        cooldown_s = max(minimum_s, min(base * 2 ** (failures - 1), cap))
        record = {"failures": failures, "until": time.time() + cooldown_s, "error": message}
        self._r.set(key, json.dumps(record), ex=int(cap * 4) + 1)
        return cooldown_s

    def count_crash(self, model: str, at_s: float, window_s: float) -> int:
        """Note a crash of ``model``'s backend at ``at_s`` (epoch seconds); returns the crashes
        in the last ``window_s`` seconds, this one included (one MULTI)."""
        key = crashes_key(model)
        with self._r.pipeline() as pipe:
            pipe.zadd(key, {f"{at_s:.6f}:{uuid.uuid4().hex[:8]}": at_s})
            pipe.zremrangebyscore(key, 0, at_s - window_s)
            pipe.zcard(key)
            pipe.expire(key, int(window_s) + 1)
            _, _, count, _ = pipe.execute()
        return int(count)

    def clear_cooldown(self, model: str) -> None:
        self._r.delete(cooldown_key(model))

    def cooldown(self, model: str) -> tuple[float, str] | None:
        """(seconds left, last error) while loads of ``model`` are cooling down, else None."""
        raw = self._r.get(cooldown_key(model))
        if not raw:
            return None
        record = json.loads(raw)
        left = record["until"] - time.time()
        return (left, record["error"]) if left > 0 else None
