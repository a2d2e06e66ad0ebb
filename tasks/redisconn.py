"""The one place Redis clients are made: the job store's (and through it the token streams,
the queues, the waiter's pub/sub, the reaper, metrics) and the broker's URL and options.

``MODELBAY_REDIS_URL`` is one server (``redis://``) or a Sentinel set (``sentinel://``, with
``MODELBAY_REDIS_SENTINEL_MASTER``; :mod:`tasks.redisurl`). With Sentinel every client asks
the Sentinels for the current master on each new connection (redis-py's
``SentinelManagedConnection``; kombu's Sentinel transport for the broker), so after a
failover the next reconnect reaches the promoted replica, with no restart. A connection to a
demoted master answers ``READONLY``: redis-py turns that into a ``ConnectionError`` and
reconnects, and the store's retry covers it like a restart.
"""
from __future__ import annotations

import redis
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from tasks.broker import SENTINEL_TRANSPORT, TRANSPORT
from tasks.redisurl import RedisTarget, RedisUrlError, parse_redis_target
from tasks.sentinelconn import FollowingConnection
from tasks.settings import Settings, SettingsError

# What a client may see while Redis restarts or fails over: retried, and answered 503
# ``store_unavailable`` by the web when the retries run out (MasterNotFoundError is a
# ConnectionError; ReadOnlyError a demoted master still answering).
FAILOVER_ERRORS: tuple[type[redis.RedisError], ...] = (redis.ConnectionError, redis.TimeoutError,
                                                      redis.ReadOnlyError, MasterNotFoundError)
# Sentinels are asked at each connect: a dead one must not hold the asker long (seconds).
SENTINEL_SOCKET_TIMEOUT_S = 0.5
# A data node that does not accept a connection in this long counts as down (seconds).
CONNECT_TIMEOUT_S = 2.0
# The longest a client waits for a reply (seconds). Set here, not left to redis-py: its default
# went from none to 5 s in redis-py 8.0. A blocking command (BRPOP, XREAD BLOCK, WAIT) must block
# for clearly less (BLOCK_MAX_S): a reply that comes after the client gave up is lost, and the
# reply to a BRPOP is a message the server has already taken off its queue (a message lost at
# each such timeout: Valkey times a BRPOP out up to 100 ms late, so a BRPOP of exactly the
# reply timeout timed out on the client every time it was idle).
SOCKET_TIMEOUT_S = 5.0
BLOCK_MAX_S = SOCKET_TIMEOUT_S - 2.0


def redis_target(settings: Settings) -> RedisTarget:
    """Where Redis is, per ``settings``; :class:`SettingsError` if that cannot work."""
    try:
        return parse_redis_target(settings.redis_url, settings.redis_sentinel_master, settings.redis_password,
                                  settings.redis_sentinel_password)
    except RedisUrlError as exc:
        raise SettingsError(exc.problems) from None


def make_client(settings: Settings, retry: Retry | None = None) -> redis.Redis:
    """A client (``decode_responses``) of the server, or of the Sentinels' current master.
    ``retry``: how connection errors are retried before they surface."""
    target = redis_target(settings)
    common: dict[str, object] = {"decode_responses": True, "health_check_interval": 30, "socket_keepalive": True,
                                 "socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S}
    if retry is not None:
        common.update(retry=retry, retry_on_error=list(FAILOVER_ERRORS))
    if not target.sentinel:
        return redis.Redis.from_url(target.url, **common)
    sentinel_kwargs: dict[str, object] = {"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
                                          "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(target.master, redis_class=redis.Redis, db=target.db, username=target.username,
                               password=target.password, connection_class=FollowingConnection, **common)


def broker_url(settings: Settings) -> str:
    """Celery's broker URL: the server's, or ``sentinel://`` entries (kombu's convention)."""
    return redis_target(settings).broker_url()


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """The kombu transport options that depend on where Redis is: the master name and the
    Sentinels' password (kombu's ``master_name``/``sentinel_kwargs``), and the replica wait
    of :mod:`tasks.broker`."""
    target = redis_target(settings)
    options: dict[str, object] = {"wait_replicas": settings.redis_wait_replicas,
                                  "wait_timeout_ms": settings.redis_wait_timeout_ms}
    if target.sentinel:
        sentinel_kwargs: dict[str, object] = {"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
                                              "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S}
        if target.sentinel_password:
            sentinel_kwargs["password"] = target.sentinel_password
        options.update(master_name=target.master, sentinel_kwargs=sentinel_kwargs)
    return options


def broker_transport(settings: Settings) -> str:
    """The kombu transport class (``module:Class``) for Celery's ``broker_transport``."""
    return SENTINEL_TRANSPORT if redis_target(settings).sentinel else TRANSPORT
