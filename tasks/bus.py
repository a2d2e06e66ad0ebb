"""NATS from threaded code: one background thread with its own asyncio loop per process.

Used by workers (publishing progress) and by each web process (subscribing to it). The
thread connects and reconnects forever; :meth:`Bus.publish` never blocks and never raises,
so progress degrades when NATS is down and no task fails because of it (architecture §5).
Start a bus after fork (gunicorn workers each start their own).

``MODELBAY_NATS_URL`` may name several servers of one NATS cluster, comma-separated
(``nats://a:4222,nats://b:4222``): the client connects to one of them (in random order, so
processes spread over the cluster) and, when it is lost, reconnects to another, forever.
nats-py sends the subscriptions again on every reconnect; the callbacks given to
:meth:`Bus.on_reconnect` run after it (workers re-publish the state of their live
operations there, so no web replica waits for the next tick or keepalive).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import nats
from nats.aio.client import Client
from nats.errors import SlowConsumerError

log = logging.getLogger("modelbay.bus")

Handler = Callable[[str, bytes], None]


class Bus:
    """A NATS connection owned by a daemon thread. ``subscriptions`` are (re)made on every
    connect; handlers run on the bus thread and must be quick."""

    def __init__(self, url: str, name: str, reconnect_wait_s: float = 0.5,
                 pending_mb: float = 8.0) -> None:
        self.url = url
        self.servers = servers(url)
        self.name = name
        self.reconnect_wait_s = reconnect_wait_s
        self.pending_bytes = int(pending_mb * 1024 * 1024)
        self.loop = asyncio.new_event_loop()
        self.nc: Client | None = None
        self.connected = threading.Event()
        self._subscriptions: list[tuple[str, Handler]] = []
        self._reconnected: list[Callable[[], None]] = []
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"modelbay-bus-{name}", daemon=True)

    def start(self) -> Bus:
        self._thread.start()
        return self

    def subscribe(self, subject: str, handler: Handler) -> None:
        """Plain subscription (not a queue group): every process gets every message."""
        self._subscriptions.append((subject, handler))
        if self.nc is not None and self.nc.is_connected:
            asyncio.run_coroutine_threadsafe(self._subscribe(subject, handler), self.loop)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the bus thread; it must be quick and may :meth:`publish`)
        after every reconnect, once the subscriptions are live again, and after the first
        connect when it came late (what was published before it was dropped)."""
        self._reconnected.append(callback)

    def publish(self, subject: str, data: bytes) -> None:
        """Fire and forget, from any thread. Drops the message when NATS is unavailable."""
        nc = self.nc
        if nc is None or nc.is_closed:
            self._drop()
            return
        try:
            asyncio.run_coroutine_threadsafe(self._publish(nc, subject, data), self.loop)
        except RuntimeError:  # the loop is gone (process shutting down)
            self._drop()

    def close(self, timeout_s: float = 2.0) -> None:
        """Close the connection, waiting at most ``timeout_s`` seconds (a NATS that is gone
        must not hold up a stopping process)."""
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        try:
            asyncio.run_coroutine_threadsafe(nc.close(), self.loop).result(timeout_s)
        except Exception as exc:  # timed out, or the loop is gone: the process ends anyway
            log.info("bus %s: close did not finish (%s)", self.name, type(exc).__name__)

    async def _publish(self, nc: Client, subject: str, data: bytes) -> None:
        try:
            await nc.publish(subject, data)
        except Exception:  # buffer full while reconnecting, closed, ...: progress degrades
            self._drop()

    def _drop(self) -> None:
        self._dropped += 1
        if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
            log.warning("bus %s: NATS unavailable, %d progress message(s) dropped so far", self.name, self._dropped)

    async def _subscribe(self, subject: str, handler: Handler) -> None:
        async def deliver(msg: nats.aio.msg.Msg) -> None:
            try:
                handler(msg.subject, msg.data)
            except Exception:  # one bad message must not end the subscription
                log.exception("bus %s: handler failed for %s", self.name, msg.subject)

        if self.nc is not None:
            await self.nc.subscribe(subject, cb=deliver, pending_msgs_limit=65536)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._connect_forever())
        self.loop.run_forever()

    async def _connect_forever(self) -> None:
        wait_s = self.reconnect_wait_s
        while True:
            try:
                self.nc = await nats.connect(
                    servers=self.servers, name=f"modelbay-{self.name}", connect_timeout=2,
                    ping_interval=5, max_outstanding_pings=2,  # a silent dead link is seen in ~10 s
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=self.reconnect_wait_s,
                    pending_size=self.pending_bytes, error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect, reconnected_cb=self._on_reconnect)
                break
            except Exception as exc:  # not reachable yet: keep trying, quietly after the first
                if wait_s == self.reconnect_wait_s:
                    log.warning("bus %s: cannot reach NATS at %s (%s); retrying", self.name,
                                ", ".join(_safe(u) for u in self.servers), exc)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, 5.0)
        for subject, handler in self._subscriptions:
            await self._subscribe(subject, handler)
        self.connected.set()
        log.info("bus %s: connected to NATS", self.name)
        if self._dropped:
            self._run_callbacks()

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            log.warning("bus %s: slow consumer, NATS dropped messages for %s", self.name, exc.subject)
        else:
            log.warning("bus %s: %s", self.name, exc)

    async def _on_disconnect(self) -> None:
        self.connected.clear()
        log.warning("bus %s: disconnected from NATS; reconnecting", self.name)

    async def _on_reconnect(self) -> None:
        self.connected.set()
        nc = self.nc
        log.info("bus %s: reconnected to NATS at %s", self.name,
                 _safe(str(nc.connected_url.geturl())) if nc is not None and nc.connected_url else "?")
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        for callback in self._reconnected:
            try:
                callback()
            except Exception:  # one callback must not stop the others
                log.exception("bus %s: reconnect callback failed", self.name)


def servers(url: str) -> list[str]:
    """The servers named by a ``MODELBAY_NATS_URL``: one URL, or several comma-separated."""
    found = [part.strip() for part in url.split(",") if part.strip()]
    return found or [url]


def _safe(url: str) -> str:
    """The URL without credentials, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
