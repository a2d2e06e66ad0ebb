"""The per-process operations table: live progress events merged by the rules of architecture §5.

Each web process feeds the events its NATS subscriber decodes to :meth:`OpsTable.apply`, and
the events of operations it runs itself to :meth:`OpsTable.local`. Request threads read
:meth:`OpsTable.snapshot` and :meth:`OpsTable.get`; SSE streams block
in :meth:`OpsTable.wait_change`.

Rules:

1. An op this process originated (``local``) is authoritative: remote events for it, its own
   echo included, are ignored, whatever their seq. Local events replace the row as they come.
2. A mirrored op is created by its first event with a status and replaced only by a higher
   ``seq``; a duplicate or an older event changes nothing.
3. ``complete`` removes the row and leaves a tombstone (op → seq) for ``ttl_s``, so a late
   lower-seq event does not bring it back (a row that expires leaves one too).
4. ``error`` keeps the row (status, ``error``, ``message``) for ``error_grace_s``.
5. An event without a status changes nothing, not even the expiry.
6. A mirrored row expires ``ttl_s`` after its last accepted event. A ``keepalive`` refreshes
   the expiry even when its seq is not newer (then the data stay); not that of an error row.
   A local row does not expire by TTL: its origin is this process, which ends it.
7. A malformed event (not a dict, no ``op``, no int ``seq``) is ignored and never raises.

Times: ``clock`` is monotonic seconds (expiry, grace, pruning); ``wall`` is unix seconds (the
``updated_at`` stamp, ISO 8601 UTC with milliseconds, as :func:`tasks.schemas.utcnow`).

The hot path keeps dicts: an accepted remote event dict *is* the stored row (its ``v`` popped,
``updated_at`` and ``origin_local`` added), so :meth:`apply` takes ownership of the dict it is
given. Stored rows are never mutated afterwards, so readers copy them outside the lock.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]
_INF = float("inf")


class _Op:
    """One op's state. ``row is None`` is a tombstone; ``until`` is its clock deadline (s)."""

    __slots__ = ("at", "local", "row", "seq", "until")

    def __init__(self, row: Row | None, seq: int, until: float, local: bool, at: float) -> None:
        self.row = row
        self.seq = seq
        self.until = until
        self.local = local
        self.at = at  # clock time (s) of the last accepted event


class OpsTable:
    """Live operations of one process, merged from local and remote progress events.

    ``ttl_s``: seconds a mirrored row lives after its last accepted event, and how long a
    tombstone is kept. ``error_grace_s``: seconds an ``error`` row stays visible.
    ``prune_every_s``: the least clock time between two lazy pruning scans.
    """

    def __init__(self, ttl_s: float = 60.0, error_grace_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 prune_every_s: float = 0.5) -> None:
        self.ttl_s = float(ttl_s)
        self.error_grace_s = float(error_grace_s)
        self._clock = clock
        self._wall = wall
        self._prune_every_s = float(prune_every_s)
        self._ops: dict[str, _Op] = {}
        self._lock = threading.Lock()  # guards everything below; wait_change waits on _cond
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        self._version = 0
        self._next_prune = -_INF
        self._iso_sec = -1
        self._iso_prefix = ""
        self._iso_ms = -1
        self._iso_last = ""

    # ---- writes -------------------------------------------------------------------------

    def apply(self, event: Any) -> bool:
        """Merge a remote event (rules 1-7). True when this event changed the visible rows
        (pruning that happens on the way bumps the version but not the answer).

        Takes ownership of ``event``: when accepted it becomes the stored row."""
        if type(event) is not dict:
            return False
        op, seq, status = event.get("op"), event.get("seq"), event.get("status")
        if type(op) is not str or not op or type(seq) is not int or type(status) is not str or not status:
            return False
        now = self._clock()
        with self._lock:
            pruned = now >= self._next_prune and self._prune(now) > 0
            ent = self._ops.get(op)
            if ent is not None and ent.until <= now:  # lapsed since the last scan: settle it
                pruned = self._lapse(op, ent, now) or pruned
                ent = self._ops.get(op)
            changed = False
            if ent is None or not (ent.local or seq <= ent.seq):
                changed = self._put(op, seq, status, event, False, now, ent)
            elif status == "keepalive" and not ent.local and ent.row is not None \
                    and ent.row.get("status") != "error":
                ent.until = now + self.ttl_s  # a stale keepalive still proves the op alive
            if changed or pruned:
                self._bump()
            return changed

    def local(self, event: dict[str, Any]) -> bool:
        """Record an event of an op this process runs: authoritative, whatever its seq.

        ``complete`` removes the row, ``error`` keeps it ``error_grace_s``; other statuses
        keep it until the next local event (no TTL). The event is copied (shallow)."""
        if type(event) is not dict:
            return False
        op, seq, status = event.get("op"), event.get("seq"), event.get("status")
        if type(op) is not str or not op or type(status) is not str or not status:
            return False
        if type(seq) is not int:
            seq = 0
        now = self._clock()
        with self._lock:
            pruned = now >= self._next_prune and self._prune(now) > 0
            changed = self._put(op, seq, status, dict(event), True, now, self._ops.get(op))
            if changed or pruned:
                self._bump()
            return changed

    def expire(self) -> int:
        """Prune lapsed rows and tombstones now; the number of rows that went."""
        with self._lock:
            gone = self._prune(self._clock())
            if gone:
                self._bump()
            return gone

    # ---- reads --------------------------------------------------------------------------

    def snapshot(self) -> list[Row]:
        """Copies of the live rows, sorted by ``started_at`` (missing first), then ``op``."""
        now = self._clock()
        with self._lock:
            if self._maybe_prune(now):
                self._bump()
            rows = [e.row for e in self._ops.values() if e.row is not None and e.until > now]
        rows.sort(key=_order)
        return [dict(r) for r in rows]

    def live_rows(self) -> list[Row]:
        """The live rows themselves, unsorted and NOT copied: read them, never change them
        (stored rows are replaced, never mutated, so reading outside the lock is safe)."""
        now = self._clock()
        with self._lock:
            if self._maybe_prune(now):
                self._bump()
            return [e.row for e in self._ops.values() if e.row is not None and e.until > now]

    def get(self, op: str) -> Row | None:
        """A copy of the live row of ``op``, or None."""
        now = self._clock()
        with self._lock:
            ent = self._ops.get(op)
            row = ent.row if ent is not None and ent.until > now else None
        return dict(row) if row is not None else None

    def version(self) -> int:
        """A counter that grows on every visible change, expiry pruning included."""
        with self._lock:
            return self._version

    def wait_change(self, since: int, timeout_s: float) -> int:
        """Block until ``version() > since`` or ``timeout_s`` (real seconds) pass; the version.

        Wakes at least every ``prune_every_s`` to prune, so expiries are signalled too."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            while True:
                if self._maybe_prune(self._clock()):
                    self._bump()
                if self._version > since:
                    return self._version
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._version
                self._waiting += 1
                try:
                    self._cond.wait(min(left, self._prune_every_s))
                finally:
                    self._waiting -= 1

    # ---- internals (lock held) ----------------------------------------------------------

    def _put(self, op: str, seq: int, status: str, row: Row, local: bool, now: float,
             ent: _Op | None) -> bool:
        """Store ``row`` as the accepted event of ``op``; True when the visible rows changed."""
        had_row = ent is not None and ent.row is not None
        if status == "complete":
            stored, until = None, now + self.ttl_s
        else:
            stored = row
            row.pop("v", None)
            row["updated_at"] = self._iso(self._wall())
            row["origin_local"] = local
            if status == "error":
                until = now + self.error_grace_s
            else:
                until = _INF if local else now + self.ttl_s
        if ent is None:
            self._ops[op] = _Op(stored, seq, until, local, now)
        else:  # in place: readers only look at entries under the lock
            ent.row, ent.seq, ent.until, ent.local, ent.at = stored, seq, until, local, now
        return had_row or stored is not None

    def _lapse(self, op: str, ent: _Op, now: float) -> bool:
        """Settle an entry past its deadline: a row becomes a tombstone, a tombstone goes.
        True when a row went."""
        if ent.row is None:
            if ent.until <= now:
                del self._ops[op]
            return False
        ent.row = None
        ent.until = ent.until + self.ttl_s
        if ent.until <= now:
            del self._ops[op]
        return True

    def _maybe_prune(self, now: float) -> bool:
        if now < self._next_prune:
            return False
        return self._prune(now) > 0

    def _prune(self, now: float) -> int:
        self._next_prune = now + self._prune_every_s
        gone = 0
        for op, ent in [(k, e) for k, e in self._ops.items() if e.until <= now]:
            gone += self._lapse(op, ent, now)
        return gone

    def _bump(self) -> None:
        self._version += 1
        if self._waiting:
            self._cond.notify_all()

    def _iso(self, t: float) -> str:
        """``t`` (unix s) as ISO 8601 UTC with milliseconds and ``Z``, cached per millisecond."""
        ms = int(t * 1000)
        if ms != self._iso_ms:
            sec = ms // 1000
            if sec != self._iso_sec:
                self._iso_sec = sec
                self._iso_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._iso_ms = ms
            self._iso_last = f"{self._iso_prefix}.{ms - sec * 1000:03d}Z"
        return self._iso_last


def _order(row: Row) -> tuple[str, str]:
    return (row.get("started_at") or "", row["op"])
