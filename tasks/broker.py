"""The Redis transport modelbay uses as Celery's broker: kombu's, with two changes that let a
worker survive a broker restart (a Valkey restart; both failures otherwise end the worker
with an ``AttributeError``, kombu#582/#970):

- On a connection loss Celery 5.7 collects the connection and then closes it; closing a
  channel restores its unacknowledged messages, which needs the client the collect just
  released. Here a closing channel only remembers them (their delivery tags), and the
  process's next channel, on the new connection (the restarted Valkey, or the master a
  Sentinel failover promoted), puts them back in their queues (:func:`restore_orphans`).
  Celery drops the requests it had reserved and not started when the connection goes, so
  without this their jobs would wait for the visibility timeout (hours). Those of tasks
  still running come back too, and do nothing: a job's message runs only while the job is
  ``queued`` (or ``loading``) with the message's route, and a result is written once. A
  worker that really died leaves its messages to the visibility timeout, and the reaper
  (:mod:`workers.node.reaper`) requeues their jobs much sooner.
- A task that started before the loss and ends after it acks on the old, closed channel.
  Here that ack is dropped with a warning: the message was put back at the reconnect
  (above) or comes back after the visibility timeout, and finds its job already ended,
  which does nothing.

And one for cost: kombu builds a new ``redis.Redis`` object for every ack and every
unacked-index write (``conn_or_acquire``), about a tenth of a worker's CPU per small job.
A channel here keeps one per connection pool (clients are thread-safe; the pool is what
holds connections, and a new pool after a reconnect gets a new client).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Message
from kombu.utils.json import dumps

from tasks.sentinelconn import FollowingConnection

log = logging.getLogger("modelbay.broker")


# This process's taken, unacked messages whose broker connection went (delivery tag ->
# payload, exchange, routing key), put back by the next channel (:func:`restore_orphans`).
_orphaned: dict[str, tuple[dict[str, object], str, str]] = {}
_orphaned_lock = threading.Lock()


def _remember(messages: Mapping[str, Message]) -> None:
    with _orphaned_lock:
        for tag, message in messages.items():
            info = message.delivery_info
            _orphaned[tag] = (message._raw, info.get("exchange", ""), info.get("routing_key", ""))


class QoS(kombu_redis.QoS):
    restore_at_shutdown = False

    def append(self, message: Message, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except redis.RedisError:  # taken from the queue, not yet in the unacked hash: keep it
            _remember({delivery_tag: message})
            raise

    def restore_unacked_once(self, stderr: object = None) -> None:
        """On close: remember the messages taken and not acked, for the next channel."""
        _remember(self._delivered)
        super().restore_unacked_once(stderr)


def restore_orphans(channel: kombu_redis.Channel) -> None:
    """Put the messages this process had taken and not acked when its broker connection
    went back in their queues, from memory: after a failover the unacked hash on the new
    master may lack them (replication is asynchronous), as may a queue that had replicated
    their pop. Each is also cleared from the unacked hash, so it is not restored twice."""
    with _orphaned_lock:
        orphans = dict(_orphaned)
        _orphaned.clear()
    done = 0
    try:
        for tag, (payload, exchange, routing_key) in orphans.items():
            with channel.client.pipeline() as pipe:
                channel.qos._remove_from_indices(tag, pipe)
                channel._do_restore_message(payload, exchange, routing_key, pipe)
                pipe.execute()
            done += 1
    except redis.RedisError as exc:
        with _orphaned_lock:
            for tag in list(orphans)[done:]:
                _orphaned.setdefault(tag, orphans[tag])
        log.warning("putting back taken messages after a broker reconnect failed (%s); the next channel tries", exc)
    if done:
        log.warning("put back %d messages taken before the broker connection was lost", done)


class _Surviving:
    """What modelbay's channels change in kombu's (see the module doc), for the one-server
    and the Sentinel channel alike. Also the replica wait: with ``wait_replicas`` (a
    transport option) a published message is followed, on the same connection, by
    ``WAIT wait_replicas wait_timeout_ms``, so the publish returns once that many replicas
    have it, and with it every earlier write (the job record): replication is one ordered
    stream. Fewer replicas in time is logged, and the publish still counts (Redis cannot
    take a write back); docs/reliability.md "Failover"."""

    QoS = QoS
    _sync_client: tuple[redis.ConnectionPool, redis.Redis] | None = None
    wait_replicas = 0
    wait_timeout_ms = 1000

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        restore_orphans(self)

    def _create_client(self, asynchronous: bool = False) -> redis.Redis:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached = self._sync_client
        if cached is None or cached[0] is not pool:
            cached = self._sync_client = (pool, super()._create_client())
        return cached[1]

    def _put(self, queue: str, message: dict[str, object], **kwargs: object) -> None:
        replicas = int(self.wait_replicas)
        if replicas <= 0 or kwargs.get("_publish_batch") is not None or queue in (self._expires or {}):
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                pipe.lpush(key, dumps(message))
                pipe.execute_command("WAIT", replicas, int(self.wait_timeout_ms))
                _, acked = pipe.execute()
        if int(acked) < replicas:
            log.warning("message for %s reached %s of %d replicas within %d ms: a failover now could lose it",
                        queue, acked, replicas, self.wait_timeout_ms)

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        if self.closed or self.connection is None:
            log.warning("ack of message %s dropped: its broker channel closed (the broker restarted)", delivery_tag)
            return
        super().basic_ack(delivery_tag, multiple)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self.closed or self.connection is None:
            log.warning("reject of message %s dropped: its broker channel closed", delivery_tag)
            return
        super().basic_reject(delivery_tag, requeue)


class Channel(_Surviving, kombu_redis.Channel):
    from_transport_options = kombu_redis.Channel.from_transport_options + ("wait_replicas", "wait_timeout_ms")


class SentinelChannel(_Surviving, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel: each new connection asks the Sentinels for the master
    (also a reconnect from a command: :mod:`tasks.sentinelconn`)."""

    connection_class = FollowingConnection

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + ("wait_replicas",
                                                                                   "wait_timeout_ms")


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"
