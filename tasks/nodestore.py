"""Nodes and the models they hold, in Redis: the part of :class:`tasks.store.Store` that
the heartbeats write and placement reads.

- ``mb:node:<id>``        node record JSON, expires ``node_ttl_s`` after the last heartbeat
- ``mb:nodes``            set of node ids seen and not yet found gone by the reaper
                          (:meth:`NodeStore.gone_nodes`; filtered by the records' liveness)
- ``mb:nodemodels:<id>``  hash model name → :class:`ModelNode` JSON for that node
"""
from __future__ import annotations

from collections.abc import Iterable

import redis

from tasks.schemas import ModelNode, NodeRecord
from tasks.settings import Settings

P = "mb:"


class NodeStore:
    """Node records and per-node model states (a mixin of :class:`tasks.store.Store`)."""

    r: redis.Redis
    settings: Settings

    def heartbeat(self, node: NodeRecord) -> None:
        ttl_ms = int(self.settings.node_ttl_s * 1000)
        with self.r.pipeline() as pipe:
            pipe.set(f"{P}node:{node.id}", node.model_dump_json(), px=ttl_ms)
            pipe.sadd(f"{P}nodes", node.id)
            pipe.hdel(f"{P}gone", node.id)  # back (or never gone): see workers.node.stranded
            pipe.pexpire(f"{P}nodemodels:{node.id}", ttl_ms * 4)
            pipe.execute()

    def remove_node(self, node_id: str) -> None:
        """A graceful stop. The id and the model states stay until the reaper has marked the
        models' queues and failed what is still pinned to the node (:meth:`gone_nodes`,
        :meth:`forget_node`); placement reads only live nodes' states."""
        self.r.delete(f"{P}node:{node_id}")

    def gone_nodes(self, alive: Iterable[str]) -> list[str]:
        """Node ids in ``mb:nodes`` that are not in ``alive`` (their heartbeat expired, or
        they stopped) and not yet forgotten."""
        live = set(alive)
        return sorted(i for i in self.r.smembers(f"{P}nodes") if i not in live)

    def forget_node(self, node_id: str) -> None:
        """Drop a gone node's model states and its id (a heartbeat adds them back)."""
        with self.r.pipeline() as pipe:
            pipe.delete(f"{P}nodemodels:{node_id}")
            pipe.srem(f"{P}nodes", node_id)
            pipe.execute()

    def get_node(self, node_id: str) -> NodeRecord | None:
        raw = self.r.get(f"{P}node:{node_id}")
        return NodeRecord.model_validate_json(raw) if raw else None

    def live_nodes(self, include_draining: bool = False) -> list[NodeRecord]:
        """Nodes whose heartbeat has not expired; draining ones (stopping) only if asked:
        placement never uses them."""
        ids = sorted(self.r.smembers(f"{P}nodes"))
        if not ids:
            return []
        raws = self.r.mget([f"{P}node:{i}" for i in ids])
        nodes = [NodeRecord.model_validate_json(raw) for raw in raws if raw]
        return nodes if include_draining else [n for n in nodes if not n.draining]

    def set_model_state(self, state: ModelNode) -> None:
        key = f"{P}nodemodels:{state.node}"
        with self.r.pipeline() as pipe:
            pipe.hset(key, state.model, state.model_dump_json())
            pipe.pexpire(key, int(self.settings.node_ttl_s * 4000))
            pipe.execute()

    def clear_node_models(self, node_id: str) -> None:
        self.r.delete(f"{P}nodemodels:{node_id}")

    def delete_model_state(self, node_id: str, model: str) -> None:
        self.r.hdel(f"{P}nodemodels:{node_id}", model)

    def node_models(self, node_id: str) -> dict[str, ModelNode]:
        return {k: ModelNode.model_validate_json(v)
                for k, v in sorted(self.r.hgetall(f"{P}nodemodels:{node_id}").items())}

    def model_nodes(self, model: str, nodes: list[NodeRecord] | None = None) -> list[ModelNode]:
        """The state of ``model`` on every live node that has one."""
        live = self.live_nodes() if nodes is None else nodes
        if not live:
            return []
        with self.r.pipeline(transaction=False) as pipe:  # one round trip, whatever the count
            for node in live:
                pipe.hget(f"{P}nodemodels:{node.id}", model)
            raws = pipe.execute()
        return [ModelNode.model_validate_json(raw) for raw in raws if raw]
