"""Nodes and the models they hold, in Redis: the part of :class:`tasks.store.Store` that
the heartbeats write and placement reads: ``mb:node:<id>``, ``mb:nodes`` and
``mb:nodemodels:<id>`` (:mod:`tasks.keys`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import redis

from tasks.errors import ErrorCode, ModelbayError
from tasks.keys import GONE, NODES, model_counts_key, node_key, node_models_key
from tasks.idempotency import IdempotencyKeys
from tasks.modelstats import ModelStats, Slot
from tasks.schemas import ModelNode, NodeRecord
from tasks.settings import Settings


# Every node id's record, and one model's state on that node, in one round trip (the keys are
# built in the script from their prefixes: modelbay runs on one Redis, never a cluster). With a
# counters key (ARGV[4]), first a queue place for a new job: refused ({-1, queued}) at the cap
# ARGV[5] (0: none), else the job's number and the jobs queued before it (tasks.modelstats).
_PLACEMENT = """
local out = {}
if ARGV[4] ~= '' then
  local c = redis.call('HMGET', ARGV[4], 'enq', 'started', 'gone')
  local queued = (tonumber(c[1]) or 0) - (tonumber(c[2]) or 0) - (tonumber(c[3]) or 0)
  if tonumber(ARGV[5]) > 0 and queued >= tonumber(ARGV[5]) then return {-1, queued} end
  out[1] = redis.call('HINCRBY', ARGV[4], 'enq', 1)
  out[2] = queued
else
  out[1] = 0
  out[2] = 0
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local node = redis.call('GET', ARGV[1] .. id)
  if node then
    out[#out + 1] = node
    out[#out + 1] = redis.call('HGET', ARGV[2] .. id, ARGV[3]) or ''
  end
end
return out
"""


class QueueFull(ModelbayError):
    """429 ``queue_full``: ``queued`` jobs wait for ``model``, its cap. ``Retry-After``: the
    time the excess takes at the model's recent rate (5 s without one), 1 to 300 s."""

    code = ErrorCode.QUEUE_FULL

    def __init__(self, model: str, queued: int, stats: ModelStats) -> None:
        rate = stats.model_throughput(model)["jobs_per_s"]
        retry_s = min(300, max(1, math.ceil(1 / rate))) if isinstance(rate, float) and rate > 0 else 5
        super().__init__(f"{queued} jobs already wait for model {model!r}, its limit: retry later",
                         param="model", headers={"Retry-After": str(retry_s)})


class NodeStore(ModelStats, IdempotencyKeys):
    """Node records and per-node model states (a mixin of :class:`tasks.store.Store`)."""

    _r: redis.Redis
    settings: Settings
    _placement: redis.commands.core.Script | None = None

    def placement_view(self, model: str, slot: Slot | None = None) -> tuple[list[NodeRecord], list[ModelNode]]:
        """The live nodes that take new work (not draining), sorted by id, and ``model``'s
        state on each of them that has one: what placement reads, in one round trip. Each
        record is the whole heartbeat, per-GPU budgets included (``NodeRecord.gpus``).
        With ``slot``, first a place in ``model``'s queue (filled into it), or a 429
        ``queue_full`` (:class:`QueueFull`) when ``slot.cap`` jobs already wait."""
        if self._placement is None:
            self._placement = self._r.register_script(_PLACEMENT)
        counts = model_counts_key(model) if slot is not None else ""
        out = self._placement(keys=[NODES], args=[node_key(""), node_models_key(""), model, counts,
                                                   slot.cap if slot is not None else 0])
        if slot is not None:
            if int(out[0]) < 0:
                raise QueueFull(model, int(out[1]), self)
            slot.seq, slot.queued = int(out[0]), int(out[1])
        nodes: list[NodeRecord] = []
        states: list[ModelNode] = []
        for raw_node, raw_state in zip(out[2::2], out[3::2]):
            node = NodeRecord.model_validate_json(raw_node)
            if node.draining:
                continue
            nodes.append(node)
            if raw_state:
                states.append(ModelNode.model_validate_json(raw_state))
        nodes.sort(key=lambda n: n.id)
        states.sort(key=lambda m: m.node)
        return nodes, states

    def heartbeat(self, node: NodeRecord) -> None:
        ttl_ms = int(self.settings.node_ttl_s * 1000)
        with self._r.pipeline() as pipe:
            pipe.set(node_key(node.id), node.model_dump_json(), px=ttl_ms)
            pipe.sadd(NODES, node.id)
            pipe.hdel(GONE, node.id)  # back (or never gone): see workers.node.stranded
            pipe.pexpire(node_models_key(node.id), ttl_ms * 4)
            pipe.execute()

    def release_slot(self, model: str) -> None:
        """Give back a queue place taken for a job that was then not created (its placement failed)."""
        self._r.hincrby(model_counts_key(model), "gone", 1)

    def queue_counts(self, model: str) -> dict[str, str]:
        """``model``'s queue counters (``enq``, ``started``, ``gone``; see :mod:`tasks.modelstats`)."""
        return self._r.hgetall(model_counts_key(model))

    def remove_node(self, node_id: str) -> None:
        """A graceful stop. The id and the model states stay until the reaper has marked the
        models' queues and failed what is still pinned to the node (:meth:`gone_nodes`,
        :meth:`forget_node`); placement reads only live nodes' states."""
        self._r.delete(node_key(node_id))

    def gone_nodes(self, alive: Iterable[str]) -> list[str]:
        """Node ids in ``mb:nodes`` that are not in ``alive`` (their heartbeat expired, or
        they stopped) and not yet forgotten."""
        live = set(alive)
        return sorted(i for i in self._r.smembers(NODES) if i not in live)

    def forget_node(self, node_id: str) -> None:
        """Drop a gone node's model states and its id (a heartbeat adds them back)."""
        with self._r.pipeline() as pipe:
            pipe.delete(node_models_key(node_id))
            pipe.srem(NODES, node_id)
            pipe.execute()

    def get_node(self, node_id: str) -> NodeRecord | None:
        raw = self._r.get(node_key(node_id))
        return NodeRecord.model_validate_json(raw) if raw else None

    def live_nodes(self, include_draining: bool = False) -> list[NodeRecord]:
        """Nodes whose heartbeat has not expired; draining ones (stopping) only if asked:
        placement never uses them."""
        ids = sorted(self._r.smembers(NODES))
        if not ids:
            return []
        raws = self._r.mget([node_key(i) for i in ids])
        nodes = [NodeRecord.model_validate_json(raw) for raw in raws if raw]
        return nodes if include_draining else [n for n in nodes if not n.draining]

    def set_model_state(self, state: ModelNode) -> None:
        key = node_models_key(state.node)
        with self._r.pipeline() as pipe:
            pipe.hset(key, state.model, state.model_dump_json())
            pipe.pexpire(key, int(self.settings.node_ttl_s * 4000))
            pipe.execute()

    def clear_node_models(self, node_id: str) -> None:
        self._r.delete(node_models_key(node_id))

    def delete_model_state(self, node_id: str, model: str) -> None:
        self._r.hdel(node_models_key(node_id), model)

    def node_models(self, node_id: str) -> dict[str, ModelNode]:
        return {k: ModelNode.model_validate_json(v)
                for k, v in sorted(self._r.hgetall(node_models_key(node_id)).items())}

    def model_nodes(self, model: str, nodes: list[NodeRecord] | None = None) -> list[ModelNode]:
        """The state of ``model`` on every live node that has one."""
        live = self.live_nodes() if nodes is None else nodes
        if not live:
            return []
        with self._r.pipeline(transaction=False) as pipe:  # one round trip, whatever the count
            for node in live:
                pipe.hget(node_models_key(node.id), model)
            raws = pipe.execute()
        return [ModelNode.model_validate_json(raw) for raw in raws if raw]
