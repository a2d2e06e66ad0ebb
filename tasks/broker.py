"""The Redis transport modelbay uses as Celery's broker: kombu's, with two changes that let a
worker survive a broker restart (a Valkey restart; both failures otherwise end the worker
with an ``AttributeError``, kombu#582/#970):

- On a connection loss Celery 5.7 collects the connection and then closes it; closing a
  channel restores its unacknowledged messages, which needs the client the collect just
  released. Here a closing channel leaves its unacked messages where they are: those of
  tasks still running must not be redelivered anyway (the task goes on), and those of a
  worker that really died come back through the visibility timeout, while the reaper
  (:mod:`workers.node.reaper`) requeues their jobs much sooner.
- A task that started before the loss and ends after it acks on the old, closed channel.
  Here that ack is dropped with a warning: the message comes back after the visibility
  timeout and finds its job already ended, which does nothing.

And one for cost: kombu builds a new ``redis.Redis`` object for every ack and every
unacked-index write (``conn_or_acquire``), about a tenth of a worker's CPU per small job.
A channel here keeps one per connection pool (clients are thread-safe; the pool is what
holds connections, and a new pool after a reconnect gets a new client).
"""
from __future__ import annotations

import logging

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger("modelbay.broker")


class QoS(kombu_redis.QoS):
    restore_at_shutdown = False


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: tuple[redis.ConnectionPool, redis.Redis] | None = None

    def _create_client(self, asynchronous: bool = False) -> redis.Redis:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached = self._sync_client
        if cached is None or cached[0] is not pool:
            cached = self._sync_client = (pool, super()._create_client())
        return cached[1]

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


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
