"""Moving a source's bytes into a file while hashing them: local files and HTTP(S).

:class:`HashingWriter` reads into a few large reused buffers; the calling thread writes each
full buffer to the file while a second thread feeds the same buffer to SHA-256 (hashlib and
file I/O release the GIL), so every byte is read once, hashed once and written once, and the
hash is of exactly the bytes written. :func:`copy_local` and :func:`download` fill it.

HTTP uses the standard library's ``http.client``: ``readinto`` lands socket data straight in
the buffer, and redirects and ``Range`` resumes need full control anyway. Proxies come from
the usual ``http_proxy``/``https_proxy``/``no_proxy`` environment variables.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import os
import queue
import re
import ssl
import stat
import threading
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import unquote, urljoin, urlsplit

CHUNK_BYTES = 256 << 10        # one buffer: the unit read, hashed and written (bytes)
BUFFERS = 4                    # buffers in flight: 1 MiB in all, which stays in a core's L2 cache
READ_BYTES = 256 << 10         # at most this much per socket read: the HTTP progress step (bytes)
RETRIES = 3                    # retries of a failed HTTP attempt that made no progress
BACKOFF_BASE_S = 0.2           # retry n waits BACKOFF_BASE_S * 2**(n-1) seconds
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0          # the longest a socket read may stall
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

Cancelled = Callable[[], bool]
OnBytes = Callable[[int], None]


class StagingError(Exception):
    """Staging failed. ``code``: ``hash_mismatch`` (size or sha256 differ from the manifest),
    ``source_unreachable``, ``source_rejected``, ``staging_failed`` or ``cancelled``."""

    def __init__(self, message: str, code: str = "staging_failed") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_cancelled(cancelled: Cancelled) -> None:
    if cancelled():
        raise StagingError("staging was cancelled", "cancelled")


class HashingWriter:
    """Appends to the open file ``fd`` and hashes what it writes, in a second thread.

    Fill it with :meth:`read_from`; :meth:`finish` returns ``(size_bytes, sha256_hex)`` once
    everything is written and fsync'd. Always :meth:`close` it (idempotent)."""

    def __init__(self, fd: int, size_hint: int | None = None) -> None:
        self._fd = fd
        chunk = CHUNK_BYTES if size_hint is None else max(64 << 10, min(CHUNK_BYTES, size_hint))
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(chunk))
        self._cur: bytearray | None = None
        self._filled = 0
        self.written = 0
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        self._hash = hashlib.sha256()
        self._todo: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(self._hash, self._todo),
                                        name="modelbay-sha256", daemon=True)
        self._thread.start()

    def _run(self, digest: hashlib._Hash, todo: queue.SimpleQueue[tuple[bytearray, int] | None]) -> None:
        while (item := todo.get()) is not None:
            buf, n = item
            digest.update(memoryview(buf)[:n])
            self._free.put(buf)

    def _stop(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    @property
    def received(self) -> int:
        """Bytes taken in so far, written or still in the current buffer."""
        return self.written + self._filled

    def read_from(self, readinto: Callable[[memoryview], int | None], limit: int) -> int:
        """Call ``readinto`` once with room for at most ``limit`` bytes; the count it read."""
        if self._cur is None:
            self._cur, self._filled = self._free.get(), 0
        room = min(limit, len(self._cur) - self._filled)
        n = readinto(memoryview(self._cur)[self._filled:self._filled + room]) or 0
        self._filled += n
        if self._filled == len(self._cur):
            self.flush()
        return n

    def flush(self) -> None:
        """Write (and hash) the current buffer, even if it is not full."""
        buf, n = self._cur, self._filled
        if buf is None:
            return
        self._cur, self._filled = None, 0
        if n == 0:
            self._free.put(buf)
            return
        self._todo.put((buf, n))  # the hasher may return buf early: only this thread reuses it
        view = memoryview(buf)[:n]
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise StagingError(f"writing the file failed: {exc}", "staging_failed") from exc
        self.written += n

    def reset(self) -> None:
        """Forget everything: an empty file and a fresh hash (a restart from byte 0)."""
        if self._cur is not None:
            self._filled = 0
            self.flush()
        self._stop()
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.written = 0
        self._start()

    def finish(self) -> tuple[int, str]:
        """Write the rest, fsync the file; ``(size_bytes, sha256_hex)``."""
        self.flush()
        self._stop()
        os.fsync(self._fd)
        return self.written, self._hash.hexdigest()

    def close(self) -> None:
        self._cur = None
        self._stop()


def copy_local(path: str, writer: HashingWriter, on_bytes: OnBytes, cancelled: Cancelled) -> None:
    """Copy the regular file ``path`` (already resolved and allowed) into ``writer``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise StagingError(f"{path} does not exist", "source_unreachable") from None
    except OSError as exc:
        code = "source_rejected" if isinstance(exc, (PermissionError, IsADirectoryError)) or \
            exc.errno == errno.ELOOP else "source_unreachable"  # ELOOP: a symlink swapped in
        raise StagingError(f"cannot open {path}: {exc}", code) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StagingError(f"{path} is not a regular file", "source_rejected")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while True:
            check_cancelled(cancelled)
            try:
                n = writer.read_from(lambda view: os.readv(fd, [view]), CHUNK_BYTES)
            except OSError as exc:
                raise StagingError(f"reading {path} failed: {exc}", "source_unreachable") from exc
            if not n:
                return
            on_bytes(n)
    finally:
        os.close(fd)


class _Retry(Exception):
    """A failed attempt that may be retried."""


def _connect(url: str, start: int, auth: str | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host, port = parts.hostname or "", parts.port or (443 if https else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and urllib.request.proxy_bypass(host):
        proxy = None
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
    headers = {"Accept-Encoding": "identity", "User-Agent": "modelbay-stager"}
    if start:
        headers["Range"] = f"bytes={start}-"
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


_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """The system's CAs, plus certifi's bundle when it is installed (as requests does)."""
    global _CONTEXT
    if _CONTEXT is None:
        context = ssl.create_default_context()
        try:
            import certifi

            context.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
        _CONTEXT = context
    return _CONTEXT


def _open(url: str, start: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET ``url`` from byte ``start``, following at most MAX_REDIRECTS http(s) redirects."""
    parts = urlsplit(url)
    auth = None
    if parts.username is not None:  # credentials in the URL go to that URL only, not a redirect
        creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(creds.encode()).decode()
    for _ in range(MAX_REDIRECTS + 1):
        conn, resp = _connect(url, start, auth)
        if resp.status not in _REDIRECTS:
            return conn, resp
        location = resp.getheader("Location")
        conn.close()
        if not location:
            raise StagingError(f"{url} answered {resp.status} without a Location", "source_unreachable")
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            raise StagingError(f"{url} redirects to a {scheme or 'relative'} URL, which is refused",
                               "source_rejected")
        if parts.scheme == "https" and scheme == "http":
            raise StagingError(f"{url} redirects from https to http, which is refused", "source_rejected")
        url, auth = target, None
    raise StagingError(f"more than {MAX_REDIRECTS} redirects", "source_unreachable")


def download(url: str, writer: HashingWriter, on_size: Callable[[int], None], on_bytes: OnBytes,
             cancelled: Cancelled, max_bytes: int | None = None) -> None:
    """Stream ``url`` into ``writer``, resuming with ``Range`` after a broken connection.

    ``on_size(total_bytes)`` is called once the server tells the size; ``on_bytes(n)`` after
    each read. More than ``max_bytes`` (the manifest's size) fails with ``hash_mismatch``.
    A 4xx (but 408/425/429) fails at once; other failures are retried RETRIES times with
    exponential backoff, the count starting over whenever an attempt made progress."""
    failures = 0
    while True:
        check_cancelled(cancelled)
        writer.flush()
        start = writer.written
        try:
            if _attempt(url, start, writer, on_size, on_bytes, cancelled, max_bytes):
                return
            failure: Exception = _Retry("the connection closed early")
        except (_Retry, OSError, http.client.HTTPException) as exc:
            failure = exc
        writer.flush()  # keep what arrived before the break
        failures = 0 if writer.written > start else failures + 1
        if failures > RETRIES:
            raise StagingError(f"downloading {url} failed after {RETRIES} retries: {failure}",
                               "source_unreachable")
        deadline = time.monotonic() + BACKOFF_BASE_S * 2 ** max(0, failures - 1)
        while time.monotonic() < deadline:
            check_cancelled(cancelled)
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _attempt(url: str, start: int, writer: HashingWriter, on_size: Callable[[int], None], on_bytes: OnBytes,
             cancelled: Cancelled, max_bytes: int | None) -> bool:
    """One GET from ``start``; True when the whole body arrived."""
    conn, resp = _open(url, start)
    try:
        if resp.status in _RETRY_STATUS:
            raise _Retry(f"HTTP {resp.status} {resp.reason}")
        total: int | None = None
        if start and resp.status == 206:
            match = _CONTENT_RANGE.fullmatch((resp.getheader("Content-Range") or "").strip())
            if match is None or int(match.group(1)) != start:
                raise StagingError(f"{url} answered a bad Content-Range", "source_unreachable")
            total = None if match.group(3) == "*" else int(match.group(3))
        elif resp.status == 200 or (start and resp.status == 416):
            if start:
                writer.reset()  # no resume: start over from byte 0
                if resp.status == 416:
                    raise _Retry("the server refused the range")
            length = resp.getheader("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise StagingError(f"{url} answered HTTP {resp.status} {resp.reason}", "source_unreachable")
        if total is not None:
            if max_bytes is not None and total != max_bytes:
                raise StagingError(f"size mismatch: the manifest says {max_bytes} bytes, {url} has {total}",
                                   "hash_mismatch")
            on_size(total)
        while True:
            check_cancelled(cancelled)
            limit = READ_BYTES if total is None else min(READ_BYTES, total - writer.received)
            if limit <= 0:
                return True
            n = writer.read_from(resp.readinto, limit)
            if not n:
                return total is None  # EOF: whole only when the length was never known
            on_bytes(n)
            if max_bytes is not None and writer.received > max_bytes:
                raise StagingError(f"size mismatch: {url} sent more than {max_bytes} bytes", "hash_mismatch")
    finally:
        conn.close()
