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
"""
from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger("modelbay.broker")


class QoS(kombu_redis.QoS):
    restore_at_shutdown = False


class Channel(kombu_redis.Channel):
    QoS = QoS

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
