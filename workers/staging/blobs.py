"""The content-addressed blob store under ``models_dir/.blobs`` (see workers/staging/stage.py):
per-blob locks, the records that let a blob be reused without rehashing, hard links into
model directories, and the sweep of temp files left by dead stagers."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tasks.schemas import FileSpec
from workers.staging.output import check_cancelled

LOCK_POLL_S = 0.05      # how often a stager waiting for a blob's lock looks again


@contextlib.contextmanager
def locked(path: Path, cancelled: Callable[[], bool]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting for it while not cancelled."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                check_cancelled(cancelled)
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def blob_key(spec: FileSpec) -> str:
    return spec.sha256 or "uri-" + hashlib.sha256(spec.uri.encode()).hexdigest()


def reusable(blob: Path, meta: Path, spec: FileSpec, src: os.stat_result | None) -> int | None:
    """The blob's size when it can stand for ``spec`` without a transfer, else None."""
    try:
        record = json.loads(meta.read_text())
        st = blob.stat()
        if st.st_size != record["size"] or st.st_mtime_ns != record["mtime_ns"]:
            return None
        if spec.size is not None and spec.size != st.st_size:
            return None
        if spec.sha256 is not None:
            return st.st_size if record["sha256"] == spec.sha256 else None
        if record["uri"] != spec.uri:
            return None
        if src is not None and (record.get("source_size"), record.get("source_mtime_ns")) != \
                (src.st_size, src.st_mtime_ns):
            return None
        return st.st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None


def link(blob: Path, dest: Path) -> None:
    """Make ``dest`` the blob: a hard link, or a copy with the blob's mtime where linking fails."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    bst = blob.stat()
    try:
        dst = os.stat(dest, follow_symlinks=False)
        if os.path.samestat(bst, dst) or (dst.st_nlink == 1 and (dst.st_size, dst.st_mtime_ns)
                                          == (bst.st_size, bst.st_mtime_ns)):
            return
    except FileNotFoundError:
        pass
    tmp = dest.with_name(f".{dest.name}.mbtmp-{secrets.token_hex(6)}")
    try:
        try:
            os.link(blob, tmp)
        except OSError:  # another filesystem, or no hard links there: copy
            shutil.copyfile(blob, tmp)
            os.utime(tmp, ns=(bst.st_atime_ns, bst.st_mtime_ns))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep(models_dir: Path | str) -> int:
    """Remove the temp files that dead stagers left in the blob store (call it when a worker
    starts); the number removed. A blob whose lock is held (a live stager, here or in another
    process) is left alone."""
    blobs = Path(models_dir) / ".blobs"
    removed = 0
    for key in sorted({p.name.split(".tmp-")[0].removesuffix(".json") for p in blobs.glob("*.tmp-*")}):
        fd = os.open(blobs / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            for stale in [*blobs.glob(f"{key}.tmp-*"), *blobs.glob(f"{key}.json.tmp-*")]:
                stale.unlink(missing_ok=True)
                removed += 1
        finally:
            os.close(fd)
    return removed
