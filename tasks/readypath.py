"""The ready path: a new inference job for a model that a live node holds ready, in one round trip.

That is the common case of every submission, and the slow path (:meth:`Dispatcher.route
<tasks.dispatch.Dispatcher.route>`) takes three: the placement script (every live node's whole
heartbeat, parsed), the record's write and the message's LPUSH. One script does the same
reads and writes here, and answers "not ready" without writing anything when no live node
(the pinned one, for a pinned job) that takes new work holds the model ``ready``; the caller
then takes the slow path, which places a load.

Decided: the script reads a node's record only for a node whose state of the model is
``ready``, and stops at the first such node that is not draining. The queue place (the cap,
the job's number) is taken exactly as the placement script takes it (:mod:`tasks.modelstats`).

A message for a model queue carries the record as queued (``modelbay_record``, a top-level
key of kombu's message that kombu and Celery leave alone), up to ``RECORD_IN_MESSAGE_MAX_BYTES``:
the taker then needs no read before the job's first write, which records the take too
(workers/node/taker.py). A pinned job's message (``node.<id>``, Celery's consumer) carries none.
"""
from __future__ import annotations

import time

import redis

from tasks.keys import CATALOG, JOBS, NODES, job_key, model_counts_key, node_key, node_models_key
from tasks.modelstats import ModelStats, Slot
from tasks.nodestore import QueueFull
from tasks.schemas import JobRecord
from tasks.settings import Settings

# KEYS: nodes set, the model's counters, the job's key, the recent-jobs index, the queue's list,
# the catalog.
# ARGV: node key prefix, node-models key prefix, model, cap (0: none), pinned node ('': any),
# the record's JSON without queue_seq and its closing "}", TTL (s), now (epoch s), recent-jobs
# cap, job id, the message, the model's manifest as the caller has it ('': not checked), the
# largest record the message carries (bytes; 0: none).
# Returns {-2} when the stored manifest is another (nothing written), {0} when no live node
# holds the model ready or the id is taken (nothing written), {-1, queued} at the cap, else
# {the job's number, the jobs queued before it}.
_SUBMIT_READY = """
if ARGV[12] ~= '' and redis.call('HGET', KEYS[6], ARGV[3]) ~= ARGV[12] then return {-2} end
local ids
if ARGV[5] ~= '' then ids = {ARGV[5]} else ids = redis.call('SMEMBERS', KEYS[1]) end
local ready = false
for _, id in ipairs(ids) do
  local state = redis.call('HGET', ARGV[2] .. id, ARGV[3])
  if state and string.find(state, '"state":"ready"', 1, true) then
    local node = redis.call('GET', ARGV[1] .. id)
    if node and not cjson.decode(node).draining then
      ready = true
      break
    end
  end
end
if not ready or redis.call('EXISTS', KEYS[3]) == 1 then return {0} end
local c = redis.call('HMGET', KEYS[2], 'enq', 'started', 'gone')
local queued = (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0) - (tonumber(c[3]) or 0)
if tonumber(ARGV[4]) > 0 and queued >= tonumber(ARGV[4]) then return {-1, queued} end
local seq = redis.call('HINCRBY', KEYS[2], 'enq', 1)
local record = ARGV[6] .. ',"queue_seq":' .. seq .. '}'
redis.call('SET', KEYS[3], record, 'EX', ARGV[7])
redis.call('ZADD', KEYS[4], ARGV[8], ARGV[10])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[9]) - 1)
local message = ARGV[11]
if #record <= tonumber(ARGV[13]) then
  message = string.sub(message, 1, -2) .. ',"modelbay_record":' .. cjson.encode(record) .. '}'
end
redis.call('LPUSH', KEYS[5], message)
return {seq, queued}
"""


RECORD_IN_MESSAGE_MAX_BYTES = 16 * 1024
"""The largest job record a model queue's message carries (bytes); a larger one is read."""


class StaleManifest(Exception):
    """The manifest a submission was decided on is no longer the stored one (internal: the
    dispatcher reads it again and decides again)."""


class ReadyPath(ModelStats):
    """The ready path, a mixin of :class:`tasks.store.Store`."""

    _r: redis.Redis
    settings: Settings
    _submit_ready: redis.commands.core.Script | None = None

    def manifest_raw(self, name: str) -> str | None:
        """A model's manifest as stored (JSON), or None (:class:`tasks.catalog.CatalogCache`)."""
        raw: str | None = self._r.hget(CATALOG, name)
        return raw

    def submit_ready(self, record: JobRecord, slot: Slot, queue_list: str, message: bytes,
                     manifest_raw: str | None = None, carry: bool = False) -> bool:
        """Create ``record`` (``queued``, routed once, its queue number from ``slot``) and push
        ``message`` onto ``queue_list``, if a live node holds its model ready; True when done.
        False, with nothing written, when none does (or the id is taken). Raises
        :class:`tasks.nodestore.QueueFull` (429) at the model's cap, as placement does, and
        :class:`StaleManifest`, with nothing written, when ``manifest_raw`` (the manifest the
        caller decided on) is no longer the stored one. ``carry``: the message carries the
        record (a model queue's message; see the module)."""
        if self._submit_ready is None:
            self._submit_ready = self._r.register_script(_SUBMIT_READY)
        record.status, record.load_job, record.routed, record.queue_seq = "queued", None, 1, 0
        head = record.model_dump_json(exclude={"queue_seq"})[:-1]
        out = self._submit_ready(
            keys=[NODES, model_counts_key(record.model), job_key(record.id), JOBS, queue_list, CATALOG],
            args=[node_key(""), node_models_key(""), record.model, slot.cap, record.node or "", head,
                  self.settings.job_ttl_s * 7, time.time(), self.settings.jobs_recent_max, record.id, message,
                  manifest_raw or "", RECORD_IN_MESSAGE_MAX_BYTES if carry else 0])
        if int(out[0]) == -2:
            raise StaleManifest(record.model)
        if int(out[0]) < 0:
            raise QueueFull(record.model, int(out[1]), self)
        if int(out[0]) == 0:
            return False
        slot.seq, slot.queued = int(out[0]), int(out[1])
        record.queue_seq = slot.seq
        return True
