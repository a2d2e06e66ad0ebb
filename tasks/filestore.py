"""Where file bytes live (uploads, batch outputs): a local directory or an S3-compatible store.

Never in Valkey, and never a whole file in one process's memory: writes stream
(:meth:`FileStore.put_stream`), reads stream (:meth:`FileStore.iter_bytes`,
:meth:`FileStore.iter_lines`). ``MODELBAY_FILES_URL`` picks the store (:func:`open_filestore`):

- a path or ``file:///path``: :class:`LocalFileStore`, a directory (one machine, or a shared
  mount). A write goes to a temp file beside its object, renamed into place when complete.
- ``s3://bucket/prefix``: :class:`S3FileStore` (boto3), any S3-compatible store; credentials
  and region from the standard ``AWS_*`` variables, the endpoint from
  ``MODELBAY_S3_ENDPOINT_URL`` (unset: AWS). A write is one PUT when it fits in one part
  (``MODELBAY_S3_PART_MB``), else a multipart upload, aborted on any error.

Keys are ``/``-separated relative names (``files/<file id>``,
``batches/<batch id>/parts/000001.out.jsonl``); a key with ``..``, a leading ``/`` or an empty
segment is refused with ``ValueError``.
"""
from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, ParamSpec, Protocol, TypeVar
from urllib.parse import unquote, urlparse

from tasks.errors import FileStoreUnavailable, FileTooLarge, NotFound
from tasks.settings import Settings

if TYPE_CHECKING:
    from botocore.client import BaseClient as S3Client
    from botocore.response import StreamingBody

CHUNK_BYTES = 1 << 20
_TMP_MARK = ".tmp-"  # local temp files: "<name>.tmp-<hex>", never listed


class FileStore(Protocol):
    url: str

    def put_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> int: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def iter_bytes(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]: ...
    def iter_lines(self, key: str) -> Iterator[bytes]: ...
    def size(self, key: str) -> int | None: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...


def check_key(key: str) -> str:
    """``key`` if it is a safe relative name, else ``ValueError``."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key \
            or "\x00" in key or _TMP_MARK in parts[-1]:
        raise ValueError(f"not a file store key: {key!r}")
    return key


def too_large(key: str, max_bytes: int) -> FileTooLarge:
    return FileTooLarge(f"the file is over the limit of {max_bytes} bytes "
                        f"({max_bytes / (1 << 20):g} MiB, MODELBAY_MAX_FILE_MB)", param="file",
                        extra={"limit_bytes": max_bytes})


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Each line of the byte stream without its ``b"\\n"`` (a last line without one too);
    holds one line at a time."""
    rest = b""
    for chunk in chunks:
        if not chunk:
            continue
        rest += chunk
        if b"\n" not in chunk:
            continue
        *lines, rest = rest.split(b"\n")
        yield from lines
    if rest:
        yield rest


class LocalFileStore:
    """Objects as files under one directory; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        written = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    written += len(chunk)
                    if max_bytes is not None and written > max_bytes:
                        raise too_large(key, max_bytes)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put_stream(key, [data])

    def iter_bytes(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The object's bytes in chunks; raises :class:`NotFound` at once (not on the first
        ``next``) when there is none."""
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"no object {key!r} in the file store") from None
        return _read_file(f, chunk_bytes)

    def iter_lines(self, key: str) -> Iterator[bytes]:
        return split_lines(self.iter_bytes(key))

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list_keys(prefix):
            self.delete(key)

    def list_keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (a plain string prefix), sorted."""
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, names in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in names:
                key = name if rel == "." else f"{rel}/{name}"
                if _TMP_MARK not in name and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


def _read_file(f: IO[bytes], chunk_bytes: int) -> Iterator[bytes]:
    with f:
        while chunk := f.read(chunk_bytes):
            yield chunk


P = ParamSpec("P")
R = TypeVar("R")


def _reachable(method: Callable[P, R]) -> Callable[P, R]:
    """S3 unreachable, timing out or answering 5xx becomes :class:`FileStoreUnavailable`
    (503, retry later); its other errors (a 403, say) stay what they are."""
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(*args, **kwargs)
        except ClientError as exc:
            if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500) >= 500:
                raise FileStoreUnavailable(f"the file store failed: {exc}") from exc
            raise
        except BotoCoreError as exc:  # no connection, a timeout, no credentials
            raise FileStoreUnavailable(f"the file store is unreachable: {exc}") from exc
    return call


class S3FileStore:
    """Objects in one bucket under a prefix, through boto3 (whose clients are thread-safe).
    Its calls raise :class:`FileStoreUnavailable` when S3 cannot be reached."""

    def __init__(self, url: str, client: S3Client, bucket: str, prefix: str, part_bytes: int = 8 << 20) -> None:
        self.url = url
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes
        self._bucket_checked = False
        self._lock = threading.Lock()

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing, once per store (before its first write): a
        fresh S3 server of one's own (compose's SeaweedFS) starts with none. Credentials that
        may not look at or create buckets leave it to the write to fail, naming its error."""
        from botocore.exceptions import ClientError

        with self._lock:
            if self._bucket_checked:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    try:
                        self.client.create_bucket(Bucket=self.bucket)
                    except ClientError:
                        pass  # made meanwhile by another process, or not ours to make
            self._bucket_checked = True

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @_reachable
    def put_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> int:
        """One PUT for an object that fits in a part; else a multipart upload whose parts
        are ``part_bytes`` or a chunk more (one part in memory at a time), aborted on any
        error."""
        full = self._key(key)
        self.ensure_bucket()
        buffer = bytearray()
        written = 0
        upload: _Multipart | None = None
        try:
            for chunk in chunks:
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise too_large(key, max_bytes)
                buffer += chunk
                if len(buffer) >= self.part_bytes:  # a part is the buffer as it is: no copy
                    upload = upload or _Multipart(self.client, self.bucket, full)
                    upload.send(buffer)
                    buffer = bytearray()
            if upload is None:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=buffer)
            else:
                if buffer:
                    upload.send(buffer)
                upload.complete()
                upload = None
        finally:
            if upload is not None:
                upload.abort()
        return written

    @_reachable
    def put_bytes(self, key: str, data: bytes) -> None:
        self.ensure_bucket()
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    @_reachable
    def iter_bytes(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The object's bytes in chunks, streamed from one GET; raises :class:`NotFound` at
        once when there is none."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise NotFound(f"no object {key!r} in the file store") from None
        return _read_body(body, chunk_bytes)

    def iter_lines(self, key: str) -> Iterator[bytes]:
        return split_lines(self.iter_bytes(key))

    @_reachable
    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    @_reachable
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    @_reachable
    def delete_prefix(self, prefix: str) -> None:
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    @_reachable
    def list_keys(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)


def _read_body(body: StreamingBody, chunk_bytes: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk_bytes)
    finally:
        body.close()


class _Multipart:
    """One S3 multipart upload in progress."""

    def __init__(self, client: S3Client, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self.parts: list[dict[str, object]] = []

    def send(self, data: bytes | bytearray) -> None:
        number = len(self.parts) + 1
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=number, Body=data)["ETag"]
        self.parts.append({"ETag": etag, "PartNumber": number})

    def complete(self) -> None:
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception:  # the error that made us abort is the one to report
            pass


def open_filestore(settings: Settings) -> FileStore:
    """The store ``settings.files_url`` names: ``s3://bucket/prefix``, ``file:///path`` or a
    path. Raises ``ValueError`` for another scheme or an S3 URL without a bucket."""
    url = settings.files_url.strip()
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"MODELBAY_FILES_URL={url!r}: an s3:// URL needs a bucket (s3://bucket/prefix)")
        import boto3
        from botocore.config import Config

        endpoint = settings.s3_endpoint_url or None
        # Path-style URLs for a store of one's own (its endpoint seldom resolves bucket names).
        config = Config(s3={"addressing_style": "path" if endpoint else "auto"},
                        retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        return S3FileStore(url, client, parsed.netloc, unquote(parsed.path), settings.s3_part_mb << 20)
    if parsed.scheme == "file":
        root = Path(unquote(parsed.netloc + parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        root = Path(url)
    else:
        raise ValueError(f"MODELBAY_FILES_URL={url!r}: expected s3://bucket/prefix, file:///path or a path")
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return LocalFileStore(url, root)


__all__ = ["FileStore", "LocalFileStore", "S3FileStore", "open_filestore", "split_lines", "check_key",
           "CHUNK_BYTES"]
