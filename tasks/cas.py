"""A job record's compare-and-set in one round trip (a Lua script), with its side effects.

The record is replaced only when it is still, byte for byte, what the writer read; the
indexes that follow a job's status (the operations set and its version, the in-flight set,
the model's queue counters of :mod:`tasks.modelstats`) change with it, and the new status
(with a small terminal record, the record: :func:`event_of`) is published on the job's
channel, all atomically. A writer whose read is stale gets the current record back and
decides again: so a terminal state is never overwritten, as with WATCH/MULTI, in two round
trips fewer.

The same round trip can carry a taken message's bookkeeping in kombu's ``unacked``
(:mod:`workers.node.taker`): its record as taken (``note``, made whether or not the record is
replaced) or its acknowledgement (``ack``, made only with the replacement: a job's final write
acknowledges the message that ran it).
"""
from __future__ import annotations

from dataclasses import dataclass

import redis

from tasks.keys import (EVENT_RECORD_MAX_BYTES, INFLIGHT, OPS, OPS_VER, UNACKED, UNACKED_INDEX, job_channel, job_key,
                        model_counts_key)
from tasks.schemas import JobRecord

_SCRIPT = """
if ARGV[11] ~= '' then
  redis.call('ZADD', KEYS[7], ARGV[13], ARGV[11])
  redis.call('HSET', KEYS[6], ARGV[11], ARGV[12])
end
local cur = redis.call('GET', KEYS[1])
if cur ~= ARGV[1] then
  if cur then return {0, cur} end
  return {0}
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[4] == '1' then
  redis.call('SREM', KEYS[2], ARGV[7])
  redis.call('INCR', KEYS[3])
end
if ARGV[5] == 'add' then
  redis.call('SADD', KEYS[4], ARGV[7])
elseif ARGV[5] == 'rem' then
  redis.call('SREM', KEYS[4], ARGV[7])
end
if ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[8], ARGV[6])
end
if ARGV[9] ~= '' then
  redis.call('HINCRBY', KEYS[5], ARGV[9], 1)
end
if ARGV[10] ~= '' then
  redis.call('HDEL', KEYS[6], ARGV[10])
  redis.call('ZREM', KEYS[7], ARGV[10])
end
return {1}
"""


@dataclass(frozen=True)
class Note:
    """A message recorded as taken and not yet acknowledged, as kombu's Redis transport
    records it: ``entry`` (the JSON ``[message, exchange, routing key]``) under ``tag`` in
    ``unacked``, the time it was taken (``at_s``, epoch seconds) in ``unacked_index``."""

    tag: str
    entry: str
    at_s: float


@dataclass(frozen=True)
class Write:
    """One replacement of a job record and what follows from it."""

    job_id: str
    expected: str         # the record as read (its JSON)
    new: str              # the new record's JSON
    ttl_s: int            # the key's new expiry, seconds
    leaves_ops: bool      # a load or unload that ends: out of the operations set
    inflight: str         # "add" (starts running), "rem" (stops running) or ""
    publish: str          # what the job's channel is sent (event_of), else ""
    count: str = ""       # the model's queue counter it moves: "started", "gone" (tasks.modelstats) or ""
    model: str = ""       # the job's model (whose counters ``count`` moves)
    ack: str = ""         # a taken message's tag: acknowledged with the replacement (kombu's unacked)
    note: Note | None = None  # a message to record as taken first, replaced or not


def event_of(current: JobRecord, new: JobRecord, new_raw: str) -> str:
    """What a write publishes on the job's channel: "" when the status did not change, else
    the new status, and for a terminal record of at most ``EVENT_RECORD_MAX_BYTES`` a
    newline and the record's JSON (a waiter then answers without reading it back).

    A step on the way (queued, loading, running) is published only for a streamed job: the
    only waiter that stops before the end is a stream's, waiting for ``running``
    (web/openai/serving.py); every other waiter wants the end, and each event is delivered to
    every web process."""
    if new.status == current.status or not (new.terminal or new.stream):
        return ""
    if new.terminal and len(new_raw) <= EVENT_RECORD_MAX_BYTES:
        return f"{new.status}\n{new_raw}"
    return new.status


def parse_event(data: str) -> tuple[str, str | None]:
    """``(status, record JSON or None)`` of a message :func:`event_of` made."""
    status, _, raw = data.partition("\n")
    return status, raw or None


class JobCas:
    """The compare-and-set script, registered once per client (EVALSHA; EVAL after a restart
    of Redis, which forgets scripts)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_SCRIPT)

    def __call__(self, w: Write) -> tuple[bool, str | None]:
        """``(True, None)`` when written; else ``(False, current JSON or None if gone)``."""
        counts = model_counts_key(w.model) if w.count else OPS_VER  # an unused key when nothing moves
        note = w.note or Note("", "", 0.0)
        out = self._script(keys=[job_key(w.job_id), OPS, OPS_VER, INFLIGHT, counts, UNACKED, UNACKED_INDEX],
                           args=[w.expected, w.new, w.ttl_s, "1" if w.leaves_ops else "0", w.inflight, w.publish,
                                 w.job_id, job_channel(w.job_id), w.count, w.ack, note.tag, note.entry, note.at_s])
        if out[0] == 1:
            return True, None
        return False, out[1] if len(out) > 1 else None
