"""Request limits, checked before a job is queued: :func:`tasks.limits.check_limits` (shared with
the batch runner, which checks each batch line the same way)."""
from __future__ import annotations

from tasks.limits import check_limits

__all__ = ["check_limits"]
