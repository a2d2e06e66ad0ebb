"""The connection class of every Sentinel-managed Redis client (the store's and the broker's).

redis-py's ``SentinelManagedConnection`` asks the Sentinels for the master in ``connect()``.
But redis-py 8 reconnects a dropped connection from ``send_packed_command`` through
``connect_check_health``, which retries the address the connection had: after a failover
every command retry then knocks on the dead master until its retries run out (a worker's
60 s), and the command fails although a new master is up. Here a reconnect from there goes
through ``connect()`` as well, so each attempt asks the Sentinels again.
"""
from __future__ import annotations

from redis.sentinel import SentinelManagedConnection


class FollowingConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that follows the master on every reconnect."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        # retry_socket_connect is False only on the way from connect() (connect_to), which
        # has just asked the Sentinels; True on a reconnect from a command.
        if self._sock is None and retry_socket_connect:
            self.connect()
            return
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)
