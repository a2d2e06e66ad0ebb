"""Fetching a file over HTTP(S) into an :class:`~workers.staging.output.Output`.

Plain-HTTP bodies of known length move socket → pipe → file with ``splice``; TLS and
chunked bodies go through a reused buffer. The output hashes as the file grows.

HTTP uses the standard library's ``http.client``: redirects and ``Range`` resumes need full
control, and its socket is reachable for ``splice``. Proxies come from the usual
``http_proxy``/``https_proxy``/``no_proxy`` environment variables.

The SSRF guard (unless ``allow_private``, the ``MODELBAY_ALLOW_PRIVATE_SOURCES`` setting):
before every connection, each redirect hop and each retry included, the URL's host is
resolved with ``getaddrinfo`` and refused (``source_rejected``) when any of its addresses is
loopback, private, link-local or otherwise not public (:func:`tasks.netguard.blocked_address`).
The connection then goes to those vetted addresses, not to a second lookup, so a DNS answer
that changes in between (rebinding) cannot redirect it; the ``Host`` header, TLS SNI and
certificate verification still use the host name. Through a proxy the host is vetted all the
same (a name that does not resolve here is let through to the proxy), but the proxy
resolves it again and connects: only a proxy that refuses private destinations itself closes
that gap.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import http.client
import os
import re
import select
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from tasks.errors import ErrorCode
from tasks.netguard import blocked_address
from tasks.settings import env_name
from workers.staging import output
from workers.staging.output import (UNSUPPORTED_ERRNOS, Cancelled, OnBytes, Output, StagingError,
                            check_cancelled, write_failed)

RETRIES = 3                    # retries of a failed HTTP attempt that made no progress
BACKOFF_BASE_S = 0.2           # retry n waits BACKOFF_BASE_S * 2**(n-1) seconds
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0          # the longest a socket read may stall
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

# getaddrinfo's (family, type, proto, sockaddr) of one address, canonname dropped
Address = tuple[int, int, int, tuple]


class _Retry(Exception):
    """A failed attempt that may be retried."""


def vetted_addresses(url: str, host: str, port: int) -> list[Address]:
    """``host``'s addresses for TCP ``port``, each checked with
    :func:`~tasks.netguard.blocked_address`. Raises :class:`StagingError`
    (``source_rejected``) when any of them is refused, so a name with one public and one
    private address is refused too; a failed lookup raises ``socket.gaierror`` (an OSError,
    retried as for an unreachable host)."""
    vetted: list[Address] = []
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(sockaddr[0]).split("%", 1)[0]
        reason = blocked_address(ip)
        if reason:
            where = host if host == ip else f"{host} ({ip})"
            raise StagingError(ErrorCode.SOURCE_REJECTED,
                               f"{url}: {where} is {reason}; staging from loopback, private and link-local "
                               f"addresses is refused unless {env_name('allow_private_sources')} is set")
        vetted.append((family, kind, proto, sockaddr))
    return vetted


def _connect_to(addresses: list[Address], _address: tuple[str, int], timeout: float | None,
                source_address: tuple[str, int] | None = None) -> socket.socket:
    """Like ``socket.create_connection`` but to the first of ``addresses`` that answers,
    without resolving ``_address`` (host, port) again; ``timeout`` in seconds."""
    error: OSError | None = None
    for family, kind, proto, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address to connect to for {_address[0]}")


def _pin(conn: http.client.HTTPConnection, addresses: list[Address]) -> None:
    """Make ``conn`` connect to ``addresses`` instead of looking its host up again.
    ``HTTPConnection.connect`` opens its socket through the instance attribute
    ``_create_connection`` (kept replaceable by http.client on purpose); everything else,
    the ``Host`` header and HTTPS's ``server_hostname`` (SNI, certificate check), still
    uses ``conn.host``."""
    conn._create_connection = functools.partial(_connect_to, addresses)  # type: ignore[attr-defined]


def _connect(url: str, start: int, auth: str | None, if_range: str | None,
             allow_private: bool = False) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host, port = parts.hostname or "", parts.port or (443 if https else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and urllib.request.proxy_bypass(host):
        proxy = None
    addresses = None
    if not allow_private:
        try:
            addresses = vetted_addresses(url, host, port)
        except socket.gaierror:
            if not proxy:
                raise
            # a name only the proxy can resolve: it is the proxy's to refuse (module docstring)
    target = parts.path or "/"
    target += f"?{parts.query}" if parts.query else ""
    conn: http.client.HTTPConnection
    if proxy:
        pparts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        phost, pport = pparts.hostname or "", pparts.port or 80
        if https:
            conn = http.client.HTTPSConnection(phost, pport, timeout=CONNECT_TIMEOUT_S, context=_ssl_context())
            conn.set_tunnel(host, port)
        else:
            conn = http.client.HTTPConnection(phost, pport, timeout=CONNECT_TIMEOUT_S)
            target = url.split("#", 1)[0]
    elif https:
        conn = http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT_S, context=_ssl_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT_S)
    if addresses is not None and not proxy:  # through a proxy, the proxy connects (module docstring)
        _pin(conn, addresses)
    headers = {"Accept-Encoding": "identity", "User-Agent": "modelbay-stager"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if if_range:  # the server sends the whole file (200) if it changed since the first try
            headers["If-Range"] = if_range
    if auth:
        headers["Authorization"] = auth
    try:
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(READ_TIMEOUT_S)
        conn.request("GET", target, headers=headers)
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The system's CAs, plus certifi's bundle when it is installed (as requests does)."""
    context = ssl.create_default_context()
    with contextlib.suppress(ImportError, OSError):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


def _open(url: str, start: int, if_range: str | None = None,
          allow_private: bool = False) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET ``url`` from byte ``start``, following at most MAX_REDIRECTS http(s) redirects;
    every hop's host is vetted (module docstring) unless ``allow_private``."""
    parts = urlsplit(url)
    auth = None
    if parts.username is not None:  # credentials in the URL go to that URL only, not a redirect
        creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(creds.encode()).decode()
    for _ in range(MAX_REDIRECTS + 1):
        conn, resp = _connect(url, start, auth, if_range, allow_private)
        if resp.status not in _REDIRECTS:
            return conn, resp
        location = resp.getheader("Location")
        conn.close()
        if not location:
            raise StagingError(ErrorCode.SOURCE_UNREACHABLE, f"{url} answered {resp.status} without a Location")
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            raise StagingError(ErrorCode.SOURCE_REJECTED,
                               f"{url} redirects to a {scheme or 'relative'} URL, which is refused")
        if urlsplit(url).scheme.lower() == "https" and scheme == "http":
            raise StagingError(ErrorCode.SOURCE_REJECTED, f"{url} redirects from https to http, which is refused")
        url, auth = target, None
    raise StagingError(ErrorCode.SOURCE_UNREACHABLE, f"more than {MAX_REDIRECTS} redirects")


def download(url: str, out_path: Path, on_size: Callable[[int], None], on_bytes: OnBytes,
             cancelled: Cancelled, max_bytes: int | None = None, allow_private: bool = False) -> tuple[int, str]:
    """Stream ``url`` to the new file ``out_path``, fsync'd; ``(size_bytes, sha256_hex)``.

    Resumes with ``Range`` (and ``If-Range``) after a broken connection, from the bytes
    already written; a server that answers 200 instead is read again from byte 0.
    ``on_size(total_bytes)`` is called once the server tells the size; ``on_bytes`` after each
    read. More than ``max_bytes`` (the manifest's size) fails with ``hash_mismatch``. A 4xx
    (but 408/425/429) fails at once; other failures are retried RETRIES times with exponential
    backoff, the count starting over whenever an attempt made progress. Unless
    ``allow_private``, a host (first or after a redirect) with a loopback, private,
    link-local or other non-public address fails with ``source_rejected`` (module docstring)."""
    out = Output(out_path)
    try:
        failures = 0
        validator: dict[str, str] = {}  # If-Range: the first response's strong ETag or Last-Modified
        while True:
            check_cancelled(cancelled)
            start = out.size
            try:
                if _attempt(url, out, on_size, on_bytes, cancelled, max_bytes, validator, allow_private):
                    return out.finish()
                failure: Exception = _Retry("the connection closed early")
            except ssl.SSLCertVerificationError as exc:  # retrying cannot help
                raise StagingError(ErrorCode.SOURCE_REJECTED, f"{url}: {exc}") from exc
            except (_Retry, OSError, http.client.HTTPException) as exc:
                failure = exc
            failures = 0 if out.size > start else failures + 1
            if failures > RETRIES:
                raise StagingError(ErrorCode.SOURCE_UNREACHABLE,
                                   f"downloading {url} failed after {RETRIES} retries: {failure}")
            deadline = time.monotonic() + BACKOFF_BASE_S * 2 ** max(0, failures - 1)
            while time.monotonic() < deadline:
                check_cancelled(cancelled)
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    finally:
        out.close()


def _attempt(url: str, out: Output, on_size: Callable[[int], None], on_bytes: OnBytes,
             cancelled: Cancelled, max_bytes: int | None, validator: dict[str, str],
             allow_private: bool = False) -> bool:
    """One GET from byte ``out.size``; True when the whole body arrived."""
    start = out.size
    conn, resp = _open(url, start, validator.get("value"), allow_private)
    try:
        if resp.status in _RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status} {resp.reason}")
        total: int | None = None
        if start and resp.status == 206:
            match = _CONTENT_RANGE.fullmatch((resp.getheader("Content-Range") or "").strip())
            if match is None or int(match.group(1)) != start:
                raise StagingError(ErrorCode.SOURCE_UNREACHABLE, f"{url} answered a bad Content-Range")
            total = None if match.group(3) == "*" else int(match.group(3))
        elif resp.status == 200 or (start and resp.status == 416):
            if start:
                out.reset()  # no resume: start over from byte 0
                if resp.status == 416:
                    raise _Retry("the server refused the range")
            length = resp.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
            etag = resp.getheader("ETag") or ""
            validator["value"] = etag if etag.startswith('"') else resp.getheader("Last-Modified") or ""
        else:
            raise StagingError(ErrorCode.SOURCE_UNREACHABLE, f"{url} answered HTTP {resp.status} {resp.reason}")
        if total is not None:
            if max_bytes is not None and total != max_bytes:
                raise StagingError(ErrorCode.HASH_MISMATCH,
                                   f"size mismatch: the manifest says {max_bytes} bytes, {url} has {total}")
            on_size(total)
            if not resp.chunked and not isinstance(conn.sock, ssl.SSLSocket) and hasattr(os, "splice"):
                done = _splice_body(conn, resp, out, total, on_bytes, cancelled)
                if done is not None:
                    return done
        view = memoryview(bytearray(output.READ_BYTES))
        while True:
            check_cancelled(cancelled)
            limit = output.READ_BYTES if total is None else min(output.READ_BYTES, total - out.size)
            if limit <= 0:
                return True
            n = resp.readinto(view[:limit])
            if not n:
                return total is None  # EOF: whole only when the length was never known
            out.write(view[:n])
            on_bytes(n, out.size)
            if max_bytes is not None and out.size > max_bytes:
                raise StagingError(ErrorCode.HASH_MISMATCH, f"size mismatch: {url} sent more than {max_bytes} bytes")
    finally:
        conn.close()


def _splice_body(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, out: Output, total: int,
                 on_bytes: OnBytes, cancelled: Cancelled) -> bool | None:
    """Move a plain-HTTP body of known length from the socket into ``out`` in the kernel
    (socket → pipe → file); True when all of it arrived, False at an early EOF, None where the
    kernel cannot splice from this socket (then the rest is to be read from ``resp``)."""
    if conn.sock is None or resp.fp is None:
        return None
    sock = conn.sock.fileno()
    # first what http.client has read ahead: read1 returns its buffer, then that is empty
    buffered = resp.fp.read1(min(65536, total - out.size)) if out.size < total else b""
    if buffered:
        out.write(memoryview(buffered))
        on_bytes(len(buffered), out.size)
    rpipe, wpipe = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # the default 64 KiB pipe works too
            fcntl.fcntl(wpipe, fcntl.F_SETPIPE_SZ, 1 << 20)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        spliced = False
        while out.size < total:
            check_cancelled(cancelled)
            try:
                n = os.splice(sock, wpipe, min(output.READ_BYTES, total - out.size), flags=os.SPLICE_F_MOVE)
            except BlockingIOError:  # the socket has a timeout, so it is non-blocking
                if not poller.poll(READ_TIMEOUT_S * 1000):
                    raise TimeoutError(f"no data for {READ_TIMEOUT_S} s") from None
                continue
            except OSError as exc:
                if exc.errno in UNSUPPORTED_ERRNOS and not spliced:
                    return None  # the caller reads on from the same response
                raise
            spliced = True
            if not n:
                return False
            _drain(rpipe, out, n)
            on_bytes(n, out.size)
        return True
    finally:
        os.close(rpipe)
        os.close(wpipe)


def _drain(rpipe: int, out: Output, n: int) -> None:
    """Move exactly ``n`` bytes from the pipe into ``out``."""
    moved = 0
    try:
        while moved < n:
            try:
                k = os.splice(rpipe, out.fd, n - moved, flags=os.SPLICE_F_MOVE)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise
                data = memoryview(os.read(rpipe, n - moved))  # a filesystem that cannot splice
                out.write(data)
                moved += len(data)
                continue
            out.wrote(k)
            moved += k
    except OSError as exc:
        raise write_failed(exc) from exc
