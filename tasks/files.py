"""File objects: OpenAI's ``file`` records, kept in Valkey; their bytes are in the file store.

A file's record is ``mb:file:<id>`` (JSON) and its id is in ``mb:files``, a sorted set by
creation time (epoch seconds), which the listing pages through. Its content is the file
store's object ``files/<id>`` (:func:`content_key`). :func:`save_file` writes both, the bytes
first, so a record never names bytes that are not there; :func:`delete_file` removes both.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Literal

import redis
from pydantic import BaseModel

from tasks.filestore import FileStore
from tasks.keys import FILES, file_key

PURPOSES = frozenset({"batch", "batch_output"})  # what modelbay stores; uploads take "batch"
UPLOAD_PURPOSES = frozenset({"batch"})
LIST_PAGE = 200  # records read per round trip while listing


class FileObject(BaseModel):
    """OpenAI's file object. ``bytes`` is its size; ``created_at`` is epoch seconds."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def content_key(file_id: str) -> str:
    """The file store key of a file's bytes."""
    return f"files/{file_id}"


class FileIndex:
    """The file records in Valkey (``store.files``)."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client

    def put(self, obj: FileObject) -> None:
        """Write (or overwrite) the record; a new id is listed at the time of its first put."""
        with self._r.pipeline() as pipe:
            pipe.set(file_key(obj.id), obj.model_dump_json())
            pipe.zadd(FILES, {obj.id: time.time()}, nx=True)
            pipe.execute()

    def get(self, file_id: str) -> FileObject | None:
        raw = self._r.get(file_key(file_id))
        return FileObject.model_validate_json(raw) if raw else None

    def list(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
             order: str = "desc") -> list[FileObject]:
        """At most ``limit`` records, newest first (``order="desc"``) or oldest first, starting
        after the file ``after`` (none when it is not listed), of one ``purpose`` or all."""
        desc = order != "asc"
        start = 0
        if after is not None:
            rank = self._r.zrevrank(FILES, after) if desc else self._r.zrank(FILES, after)
            if rank is None:
                return []
            start = int(rank) + 1
        found: list[FileObject] = []
        while len(found) < limit:
            ids = self._r.zrange(FILES, start, start + LIST_PAGE - 1, desc=desc)
            if not ids:
                break
            start += len(ids)
            for file_id, raw in zip(ids, self._r.mget([file_key(i) for i in ids])):
                if raw is None:  # a record gone without its index entry
                    self._r.zrem(FILES, file_id)
                    start -= 1
                    continue
                obj = FileObject.model_validate_json(raw)
                if purpose is None or obj.purpose == purpose:
                    found.append(obj)
        return found[:limit]

    def delete(self, file_id: str) -> bool:
        """Remove the record; False if there was none."""
        with self._r.pipeline() as pipe:
            pipe.delete(file_key(file_id))
            pipe.zrem(FILES, file_id)
            removed, _ = pipe.execute()
        return bool(removed)


def save_file(fs: FileStore, index: FileIndex, *, filename: str, purpose: str,
              chunks: Iterable[bytes], max_bytes: int | None = None) -> FileObject:
    """Stream ``chunks`` into ``files/<new id>``, then write its record. Over ``max_bytes``
    it raises :class:`tasks.errors.FileTooLarge` and keeps nothing."""
    file_id = new_file_id()
    size = fs.put_stream(content_key(file_id), chunks, max_bytes)
    obj = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose)
    try:
        index.put(obj)
    except BaseException:
        fs.delete(content_key(file_id))
        raise
    return obj


def delete_file(fs: FileStore, index: FileIndex, file_id: str) -> bool:
    """Remove a file's record, then its bytes; False if there was no record."""
    if not index.delete(file_id):
        return False
    fs.delete(content_key(file_id))
    return True
