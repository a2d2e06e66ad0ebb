"""The webhook deliverer: each worker's threads that post due end events (:mod:`tasks.webhooks`).

Every ``webhook_poll_s`` seconds a deliverer claims the due entries of the outbox (each leased
for one round: a worker killed while posting leaves its entry to come due again when the lease
ends), and for each: a job or batch still running is looked at again ``webhook_recheck_s``
later; one that ended gets its event posted to every target not yet done; the outcome goes into
the record's ``webhook`` and the entry is rescheduled (with backoff) or dropped in one MULTI.

A post to a ``callback_url`` resolves its host and connects to the address it checked (the SSRF
guard of :mod:`tasks.netguard`, as staging does, so DNS rebinding cannot turn it to a private
address; ``MODELBAY_ALLOW_PRIVATE_WEBHOOKS`` turns it off); the operator's own URLs
(``MODELBAY_WEBHOOK_URLS``) are trusted, private ones included. A post waits
``webhook_timeout_s``, follows no redirect and uses no proxy. A 2xx delivers; a 5xx, 408,
429, a timeout or a connection error is retried; any other answer stops the retries (``failed``).
"""
from __future__ import annotations

import http.client
import logging
import random
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from celery import Celery, bootsteps
from celery.signals import worker_ready, worker_shutting_down

from tasks.netguard import blocked_address
from tasks.schemas import JobRecord
from tasks.settings import Settings, env_name
from tasks.webhooks import Outbox, advance, batch_event, body_of, ended, headers, job_event, retryable, targets

log = logging.getLogger("modelbay.webhooks")

Outcome = tuple[bool, str | None]  # (retry, error): error None when the target took the event


class Refused(Exception):
    """A target the SSRF guard refuses (not retried)."""


def _connect(host: str, port: int, timeout_s: float, allow_private: bool) -> socket.socket:
    """A TCP connection to ``host``, to an address the guard allows (each is checked)."""
    error: OSError | None = None
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not allow_private:
        for *_, sockaddr in infos:
            reason = blocked_address(str(sockaddr[0]).split("%", 1)[0])
            if reason:
                raise Refused(f"{host} ({sockaddr[0]}) is {reason}; set {env_name('allow_private_webhooks')} "
                              "to allow it")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout_s)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address for {host}")


def post(url: str, body: bytes, head: dict[str, str], timeout_s: float, allow_private: bool) -> Outcome:
    """POST ``body`` to ``url`` once; see the module docstring for what is retried."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host, port = parts.hostname or "", parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(host, port, timeout=timeout_s)
    try:
        sock = _connect(host, port, timeout_s, allow_private)
        conn.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host) if https else sock
        conn.request("POST", target, body=body, headers=head)
        resp = conn.getresponse()
        resp.read(65536)
    except (Refused, ValueError) as exc:  # a guarded address, a URL that cannot be posted to
        return False, f"{url}: {exc}" if isinstance(exc, ValueError) else str(exc)
    except (OSError, http.client.HTTPException) as exc:  # timeouts, refused connections, TLS
        return True, f"{url}: {type(exc).__name__}: {exc}"
    finally:
        conn.close()
    if 200 <= resp.status < 300:
        return False, None
    return retryable(resp.status), f"{url} answered {resp.status} {resp.reason}".rstrip()


class Deliverer:
    """One worker's delivery threads (``webhook_deliverers`` of them)."""

    def __init__(self, settings: Settings, outbox: Outbox) -> None:
        self.settings = settings
        self.outbox = outbox
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rand = random.Random()

    def start(self) -> Deliverer:
        for i in range(self.settings.webhook_deliverers):
            thread = threading.Thread(target=self._loop, name=f"webhooks-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    def lease_s(self) -> float:
        """Long enough for a round: every target's post timing out, and some slack."""
        return self.settings.webhook_timeout_s * (2 + len(self.settings.webhook_url_list)) + 5

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.webhook_poll_s):
            try:  # one entry at a time: each lease covers one round of posts
                while not self._stop.is_set() and (claimed := self.outbox.claim(time.time(), self.lease_s(), 1)):
                    self.deliver(claimed[0])
            except Exception:  # Valkey away, a bug: the entry comes due again when its lease ends
                log.exception("webhook round failed")

    def deliver(self, member: str) -> None:
        """One round for ``member`` (see the module docstring)."""
        record = self.outbox.record(member)
        state = record.webhook if record is not None else None
        if record is None or state is None or state.status != "pending":
            self.outbox.settle(member, None, None)
            return
        if not ended(record):
            self.outbox.settle(member, None, time.time() + self.settings.webhook_recheck_s, running=True)
            return
        event = job_event(record) if isinstance(record, JobRecord) else batch_event(record)
        body = body_of(event)
        urls = targets(record.callback_url, self.settings)
        outcomes: dict[int, Outcome] = {}
        first_operator = len(urls) - len(self.settings.webhook_url_list)  # the operator's URLs are trusted
        for index, url in enumerate(urls):
            if index not in state.done and index not in state.refused:
                head = headers(event["id"], body, self.settings.webhook_secret)
                outcomes[index] = post(url, body, head, self.settings.webhook_timeout_s,
                                       self.settings.allow_private_webhooks or index >= first_operator)
        new, next_s = advance(state, outcomes, event["created_at"], time.time(), self.settings, self._rand.random)
        self.outbox.settle(member, new, next_s)
        log.log(logging.DEBUG if new.status == "delivered" else logging.INFO, "webhook %s %s: %s after %d attempt(s)%s",
                event["type"], event["id"], new.status, new.attempts, f" ({new.last_error})" if new.last_error else "")


class WebhookStep(bootsteps.Step):
    """A worker bootstep: the deliverer starts once the worker consumes (on the node's store)
    and stops on SIGTERM (a round in progress finishes or its lease runs out)."""

    def __init__(self, worker: object, **kwargs: object) -> None:
        super().__init__(worker, **kwargs)
        app: Celery = getattr(worker, "app")
        box: dict[str, Deliverer] = {}

        def ready(**_: object) -> None:
            rt = getattr(app, "modelbay_runtime")
            box["d"] = Deliverer(rt.settings, rt.store.webhooks).start()

        def stopping(**_: object) -> None:
            if "d" in box:
                box["d"].stop()

        worker_ready.connect(ready, weak=False)
        worker_shutting_down.connect(stopping, weak=False)
