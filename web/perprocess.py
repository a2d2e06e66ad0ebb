"""Background threads that each process must start for itself, after any fork."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable


class PerProcess:
    """Calls ``start`` once per process: the first time :meth:`ensure` is called, and again
    in a forked child (threads do not survive a fork, so gunicorn workers start their own)."""

    def __init__(self, start: Callable[[], None]) -> None:
        self._start = start
        self._pid: int | None = None
        self._lock = threading.Lock()

    def ensure(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._start()
