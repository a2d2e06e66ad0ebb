"""The broker's queues as the reaper sees them: the part of :class:`tasks.store.Store` reached
as ``store.queues``.

Celery's queues are lists of kombu's Redis transport (LPUSH to send, BRPOP to take), and a
message taken but not acknowledged waits in ``unacked`` (:mod:`tasks.keys`). Here are their
depths and messages, and the reaper's own marks next to them: the models whose queue may
have lost its last consumer (``mb:orphans``), the window in which taken messages are looked
at (``mb:rescue``), the nodes found gone (``mb:gone``) and the round's lock (``mb:reaper``).
What the marks mean, and when they are written, is :mod:`workers.node.stranded`'s.
"""
from __future__ import annotations

from collections.abc import Iterable

import redis

from tasks.keys import GONE, ORPHANS, REAPER_LOCK, RESCUE, UNACKED, UNACKED_INDEX


class QueueStore:
    """Reads and surgery on the broker's queues, and the reaper's marks."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    # ---- the queues -------------------------------------------------------------------

    def depths(self, queues: list[str]) -> list[int]:
        """The number of messages waiting in each of ``queues``, in one round trip."""
        if not queues:
            return []
        with self._r.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            return [int(n) for n in pipe.execute()]

    def depths_and_oldest(self, keys: list[str]) -> list[tuple[int, str | None]]:
        """(messages waiting, the oldest one raw or None) of each list in ``keys``: LLEN and
        LINDEX -1 of each, in one pipeline (one round trip, no scan; the operations page's
        ``GET /api/queues``). Not a transaction: a message taken between the two reads may
        leave a depth of 1 next to no message. ``/metrics`` reads the model queues with it too."""
        if not keys:
            return []
        with self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
                pipe.lindex(key, -1)
            replies = pipe.execute()
        return [(int(replies[i]), replies[i + 1]) for i in range(0, len(replies), 2)]

    def push(self, key: str, message: bytes) -> None:
        """Send: ``message`` onto the list ``key``, as kombu's Redis transport does (LPUSH; its
        consumers BRPOP). See :mod:`tasks.publish`."""
        self._r.lpush(key, message)

    def messages(self, queue: str) -> list[str]:
        """The raw messages waiting in ``queue``, newest first, as stored (one LRANGE)."""
        raws: list[str] = self._r.lrange(queue, 0, -1)
        return raws

    def remove_message(self, queue: str, raw: str) -> None:
        """Remove one copy of the message ``raw`` from ``queue`` (LREM)."""
        self._r.lrem(queue, 1, raw)

    def taken_before(self, cutoff_s: float) -> list[tuple[str, str | None]]:
        """(delivery tag, raw ``unacked`` entry or None) of the messages taken, and not
        acknowledged, at or before ``cutoff_s`` (epoch seconds)."""
        tags: list[str] = self._r.zrangebyscore(UNACKED_INDEX, "-inf", cutoff_s)
        return list(zip(tags, self._r.hmget(UNACKED, tags) if tags else []))

    def pop(self, keys: list[str], timeout_s: float) -> tuple[str, str] | None:
        """(list, message) taken from the first non-empty list of ``keys`` (BRPOP), blocking
        for up to ``timeout_s`` seconds; None when none had a message in that time."""
        got: tuple[str, str] | None = self._r.brpop(keys, timeout=timeout_s)
        return got

    def note_taken(self, tag: str, entry: str, at_s: float, read: str | None = None) -> str | None:
        """Record a message taken at ``at_s`` (epoch seconds) and not yet acknowledged, as
        kombu's Redis transport does (``entry``: the JSON ``[message, exchange, routing
        key]``): the reaper rescues it, and kombu restores it, if its taker dies (one MULTI).
        ``read``: a key read in the same round trip; its value is returned (None without)."""
        with self._r.pipeline() as pipe:
            pipe.zadd(UNACKED_INDEX, {tag: at_s})
            pipe.hset(UNACKED, tag, entry)
            if read is not None:
                pipe.get(read)
            replies = pipe.execute()
        value: str | None = replies[2] if read is not None else None
        return value

    def wake(self, keys: list[str], ttl_s: int = 60) -> None:
        """One entry on each of ``keys`` (expiring after ``ttl_s`` seconds): a thread blocked
        in :meth:`pop` on one of them returns (one round trip)."""
        with self._r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.lpush(key, "1")
                pipe.expire(key, ttl_s)
            pipe.execute()

    def drop_taken(self, tag: str) -> None:
        """Forget a taken message, so kombu never restores it: its acknowledgement (one MULTI)."""
        with self._r.pipeline() as pipe:
            pipe.hdel(UNACKED, tag)
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.execute()

    # ---- models whose queue may have no consumer (mb:orphans) -------------------------

    def mark_orphaned(self, models: Iterable[str], at_s: float) -> None:
        """Note that a node stopped holding ``models`` at ``at_s`` (epoch seconds); an entry
        only moves later (ZADD GT)."""
        self._r.zadd(ORPHANS, {m: at_s for m in models}, gt=True)

    def orphaned_before(self, cutoff_s: float, limit: int) -> list[tuple[str, float]]:
        """At most ``limit`` entries (model, epoch seconds) marked at or before ``cutoff_s``,
        oldest first."""
        return [(str(m), float(s)) for m, s in
                self._r.zrangebyscore(ORPHANS, "-inf", cutoff_s, start=0, num=limit, withscores=True)]

    def postpone_orphan(self, model: str, at_s: float) -> None:
        """Move ``model``'s entry to ``at_s`` (epoch seconds) if it is still there and earlier."""
        self._r.zadd(ORPHANS, {model: at_s}, xx=True, gt=True)

    def forget_orphan(self, model: str, marked_s: float) -> None:
        """Remove ``model``'s entry unless it was marked again after ``marked_s`` (epoch
        seconds); WATCH keeps a mark written meanwhile."""
        with self._r.pipeline() as pipe:
            try:
                pipe.watch(ORPHANS)
                score = pipe.zscore(ORPHANS, model)
                if score is not None and float(score) <= marked_s:
                    pipe.multi()
                    pipe.zrem(ORPHANS, model)
                    pipe.execute()
                else:
                    pipe.unwatch()
            except redis.WatchError:
                pass  # the set changed meanwhile: keep the entry, the next round looks again

    # ---- lost workers and gone nodes ---------------------------------------------------

    def open_rescue(self, ttl_ms: int) -> None:
        """Look at taken messages for the next ``ttl_ms`` milliseconds (``mb:rescue``)."""
        self._r.set(RESCUE, "1", px=ttl_ms)

    def rescuing(self) -> bool:
        """True while taken messages are to be looked at."""
        return bool(self._r.exists(RESCUE))

    def note_gone(self, node_ids: list[str], now_s: float) -> tuple[list[bool], list[str | None]]:
        """Stamp ``now_s`` (epoch seconds) on the ``node_ids`` not yet found gone, in one
        MULTI. Returns, per node, whether it was just found gone, and since when it is gone
        (epoch seconds, as stored)."""
        if not node_ids:
            return [], []
        with self._r.pipeline() as pipe:
            for node_id in node_ids:
                pipe.hsetnx(GONE, node_id, now_s)
            pipe.hmget(GONE, node_ids)
            *new, since = pipe.execute()
        return [bool(n) for n in new], list(since)

    def forget_gone(self, node_id: str) -> None:
        self._r.hdel(GONE, node_id)

    def claim_round(self, holder: str, ttl_s: int) -> bool:
        """Take the reaper's lock for ``ttl_s`` seconds; False when another holds it."""
        return bool(self._r.set(REAPER_LOCK, holder, nx=True, ex=ttl_s))
