"""The file store as the batch runner reaches it: one per worker process and ``files_url``
(an S3 client is made once and shared by the task threads)."""
from __future__ import annotations

import threading

from tasks.filestore import FileStore, open_filestore
from tasks.settings import Settings

_lock = threading.Lock()
_stores: dict[str, FileStore] = {}


def filestore(settings: Settings) -> FileStore:
    with _lock:
        fs = _stores.get(settings.files_url)
        if fs is None:
            fs = _stores[settings.files_url] = open_filestore(settings)
        return fs
