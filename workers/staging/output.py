"""Writing a file while hashing it (:class:`Output`), from a local file or a stream.

Every path writes the file first, and a second thread hashes the file as it grows, reading
back what was written while it is still in the page cache: the hash is of exactly the bytes
in the file, each byte is hashed once, and hashing overlaps the transfer (hashlib and file
I/O release the GIL). Writing keeps the data in the kernel where it can
(``copy_file_range`` for local files, :func:`copy_local`; ``splice`` for HTTP bodies,
workers/staging/fetch.py). Writeback to disk is started as the file grows (``sync_file_range``), so
the final fsync is short.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.errors import ErrorCode, JobFailed

READ_BYTES = 256 << 10         # one socket read or splice, or one read of a file (bytes): the HTTP progress step
HASH_LAG_BYTES = 32 << 20      # how far writing may run ahead of hashing (bytes)
WRITEBACK_BYTES = 8 << 20      # start writing to disk every this many bytes written (bytes)
COPY_CHUNK_BYTES = 8 << 20     # one copy_file_range call: the local-copy progress step (bytes)
# what copy_file_range and splice fail with where a kernel or filesystem cannot do them
UNSUPPORTED_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM,
                                errno.EBADF})

Cancelled = Callable[[], bool]
OnBytes = Callable[[int, int], None]  # (bytes just moved, bytes of this file so far)


class StagingError(JobFailed):
    """Staging failed. ``code``: ``hash_mismatch`` (size or sha256 differ from the manifest),
    ``source_unreachable``, ``source_rejected``, ``staging_failed`` or ``cancelled``."""


def check_cancelled(cancelled: Cancelled) -> None:
    if cancelled():
        raise StagingError(ErrorCode.CANCELLED, "staging was cancelled")


def write_failed(exc: OSError) -> StagingError:
    return StagingError(ErrorCode.STAGING_FAILED, f"writing the file failed: {exc}")


class _Hasher:
    """SHA-256 of the file at ``path`` up to where :meth:`advance` says it is written, in a
    thread that reads it back (from the page cache) at most HASH_LAG_BYTES behind."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._digest = hashlib.sha256()
        self._cond = threading.Condition()
        self._pos = self._end = 0
        self._closing = self._idle = self._waiting = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="modelbay-sha256", daemon=True)
        self._thread.start()

    def advance(self, end: int) -> None:
        """The file is written up to byte ``end``. When hashing lags more than HASH_LAG_BYTES
        behind, waits until it is down to half that (few wake-ups, each worth many bytes)."""
        with self._cond:
            self._end = end
            if self._idle:
                self._cond.notify_all()
            if end - self._pos > HASH_LAG_BYTES and self._error is None:
                self._waiting = True
                self._cond.wait_for(lambda: end - self._pos <= HASH_LAG_BYTES // 2 or self._error is not None)
                self._waiting = False

    def _run(self) -> None:
        view = memoryview(bytearray(READ_BYTES))
        while True:
            with self._cond:
                self._idle = True
                self._cond.wait_for(lambda: self._end > self._pos or self._closing)
                self._idle = False
                if self._end <= self._pos or self._error is not None:
                    return
                pos, end = self._pos, self._end
            try:
                n = os.preadv(self._fd, [view[:min(len(view), end - pos)]], pos)
                if not n:
                    raise OSError(errno.EIO, "the file is shorter than what was written to it")
                self._digest.update(view[:n])
            except OSError as exc:
                n, self._error = 0, exc
            with self._cond:
                self._pos += n
                if self._waiting and (self._end - self._pos <= HASH_LAG_BYTES // 2 or self._error is not None):
                    self._cond.notify_all()

    def finish(self) -> str:
        """Hash the rest; the hex digest."""
        self.close()
        if self._error is not None:
            raise StagingError(ErrorCode.STAGING_FAILED, f"reading back the file failed: {self._error}")
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


try:  # Linux sync_file_range(2): start writing a range to disk without waiting for it
    _SYNC_FILE_RANGE: Any = ctypes.CDLL(None, use_errno=True).sync_file_range
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):
    _SYNC_FILE_RANGE = None


class Output:
    """A new file at ``path`` being filled from offset 0, hashed as it grows (``size`` bytes
    so far). :meth:`finish` fsyncs it and returns ``(size_bytes, sha256_hex)``; always
    :meth:`close` it (idempotent). Write errors raise :class:`StagingError`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.size = self._queued = 0
        self._hasher = _Hasher(path)

    def wrote(self, n: int) -> None:
        """``n`` more bytes were written to ``fd`` (by the kernel, say)."""
        self.size += n
        if self.size - self._queued >= WRITEBACK_BYTES and _SYNC_FILE_RANGE is not None:
            # SYNC_FILE_RANGE_WRITE: the disk works while we hash, and the final fsync is short
            _SYNC_FILE_RANGE(self.fd, self._queued, self.size - self._queued, 2)
            self._queued = self.size
        self._hasher.advance(self.size)

    def write(self, view: memoryview) -> None:
        n = len(view)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise write_failed(exc) from exc
        self.wrote(n)

    def reset(self) -> None:
        """Start over: an empty file and a fresh hash."""
        self._hasher.close()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.size = self._queued = 0
        self._hasher = _Hasher(self.path)

    def finish(self) -> tuple[int, str]:
        os.fsync(self.fd)  # while the hash thread catches up
        return self.size, self._hasher.finish()

    def close(self) -> None:
        self._hasher.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def copy_local(path: str, out_path: Path, on_bytes: OnBytes,
                cancelled: Callable[[], bool]) -> tuple[int, str]:
    """Copy the regular file ``path`` (already resolved and allowed) to the new file
    ``out_path``, fsync'd; ``(size_bytes, sha256_hex)``. The kernel copies
    (``copy_file_range``: no trip through user space) where it can; else read and write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise StagingError(ErrorCode.SOURCE_UNREACHABLE, f"{path} does not exist") from None
    except OSError as exc:
        code = ErrorCode.SOURCE_REJECTED if isinstance(exc, (PermissionError, IsADirectoryError)) or \
            exc.errno == errno.ELOOP else ErrorCode.SOURCE_UNREACHABLE  # ELOOP: a symlink swapped in
        raise StagingError(code, f"cannot open {path}: {exc}") from exc
    out = None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StagingError(ErrorCode.SOURCE_REJECTED, f"{path} is not a regular file")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        out = Output(out_path)
        kernel = True
        view = memoryview(bytearray(READ_BYTES))
        while True:
            check_cancelled(cancelled)
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(fd, out.fd, COPY_CHUNK_BYTES)
                    if n:
                        out.wrote(n)
                except OSError as exc:
                    if out.size or exc.errno not in UNSUPPORTED_ERRNOS:
                        raise write_failed(exc) from exc
                kernel = bool(n) or bool(out.size)  # nothing copied this way: read and write
            if not kernel:
                try:
                    n = os.readv(fd, [view])
                except OSError as exc:
                    raise StagingError(ErrorCode.SOURCE_UNREACHABLE, f"reading {path} failed: {exc}") from exc
                out.write(view[:n])
            if not n:
                return out.finish()
            on_bytes(n, out.size)
    finally:
        if out is not None:
            out.close()
        os.close(fd)
