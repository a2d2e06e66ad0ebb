"""OpenAI's ``/v1/files``: upload (multipart), list, retrieve, content, delete.

An upload streams: the multipart body is parsed from ``request.stream`` as it arrives
(werkzeug's sans-IO ``MultipartDecoder``, not its form parser, which would spool the file to a
temp file first), and the file part's bytes go straight into the file store
(:func:`tasks.filestore.FileStore.put_stream`), one read (64 KiB) at a time; the web process
never holds more than that, or one S3 part. The limit is ``MODELBAY_MAX_FILE_MB``, counted on
the bytes of the file as they arrive, so a ``Content-Length`` that is absent (chunked) or wrong
does not get past it; the whole body may be at most 1 MiB more (the other fields). Past the
limit the answer is 413 ``file_too_large`` and nothing is kept. A ``purpose`` other than
``batch`` is refused before the file is read when it comes first (as the SDK sends it), else
after, and the bytes are dropped. Contents stream back from the store.
"""
from __future__ import annotations

import hashlib
import threading
import time
from urllib.parse import quote
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Literal

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Event, Field, File, MultipartDecoder, NeedData, Preamble

from tasks.errors import FileTooLarge, InvalidRequest, ModelbayError, NotFound, UnsupportedMediaType
from tasks.filestore import FileStore, open_filestore, too_large
from tasks.files import UPLOAD_PURPOSES, FileIndex, FileObject, content_key, delete_file, new_file_id
from web.errors import drain_body, respond
from web.extensions import mb
from web.idempotent import REPLAYED, claim, once
from web.openapi import PATH_PARAMETERS, Ok, documented

bp = Blueprint("files", __name__, url_prefix="/v1")

READ_BYTES = 1 << 16         # one read of the request body
FIELD_BYTES = 1 << 16        # the largest form field (purpose) kept
FORM_SLACK_BYTES = 1 << 20   # the body's allowance past the file: other fields, part headers
MAX_LIST = 10000
EXTENSION = "modelbay.files"
_lock = threading.Lock()
PutFile = Callable[[Iterable[bytes]], int]  # stores a file's chunks, returns its size

PATH_PARAMETERS.setdefault("file_id", {"description": "the file's id", "schema": {"type": "string"},
                                       "example": "file-" + "0" * 32})


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def filestore() -> FileStore:
    """This app's file store (``MODELBAY_FILES_URL``), opened on first use."""
    app = current_app
    with _lock:
        fs = app.extensions.get(EXTENSION)
        if fs is None:
            fs = app.extensions[EXTENSION] = open_filestore(mb().settings)
        return fs


def index() -> FileIndex:
    return mb().store.files


@bp.post("/files")
@documented("openai", "Upload a file (OpenAI-compatible; multipart/form-data with `file` and `purpose=batch`)",
            Ok(200, FileObject, "the file", headers=("Idempotent-Replayed",)), errors=(400, 409, 413, 415, 422, 503),
            idempotent=True)
def upload():
    limit = mb().settings.max_file_bytes
    boundary = _boundary()
    request.max_content_length = limit + FORM_SLACK_BYTES
    file_id = new_file_id()
    key = content_key(file_id)
    fs = filestore()
    digest = hashlib.sha256()  # of the file's bytes as they are stored: an Idempotency-Key's request hash
    try:
        fields, saved = _read_form(request.stream, boundary,
                                   lambda chunks: fs.put_stream(key, _hashing(chunks, digest), limit))
        purpose = _purpose(fields.get("purpose"))
        if saved is None:
            raise InvalidRequest("the form has no file part named `file`", param="file")
        obj = FileObject(id=file_id, bytes=saved[1], created_at=int(time.time()), filename=saved[0],
                         purpose=purpose)
        # With an Idempotency-Key: keyed on the filename, purpose, size and bytes' hash (known only
        # once stored, so a retry stores its copy, then drops it and answers the first file).
        obj, replayed = once(lambda: _indexed(obj), index().get, lambda f: f.id, take=lambda: claim(
            obj.filename.encode(), obj.purpose.encode(), str(obj.bytes).encode(), digest.digest()))
        if replayed:
            fs.delete(key)
    except (FileTooLarge, RequestEntityTooLarge):
        fs.delete(key)
        return _too_large(limit)
    except BaseException as exc:
        fs.delete(key)  # whatever was stored of it (nothing, unless the form was bad after the file)
        if isinstance(exc, ModelbayError):
            drain_body(limit + FORM_SLACK_BYTES)  # so that the client reads the answer
        raise
    return jsonify(obj.model_dump()), 200, REPLAYED if replayed else {}


def _indexed(obj: FileObject) -> FileObject:
    index().put(obj)
    return obj


def _hashing(chunks: Iterable[bytes], digest: hashlib._Hash) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


@bp.get("/files")
@documented("openai", "List files (OpenAI-compatible)", Ok(200, FileList, "the files, newest first by default"),
            errors=(400, 503), query={
                "purpose": {"schema": {"type": "string"}, "description": "only files of this purpose"},
                "after": {"schema": {"type": "string"}, "description": "the files after this file id"},
                "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": MAX_LIST}},
                "order": {"schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
                          "description": "by creation time"}})
def list_files():
    args = request.args
    try:
        limit = int(args.get("limit", MAX_LIST))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIST}", param="limit")
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order")
    found = index().list(purpose=args.get("purpose"), after=args.get("after"), limit=limit + 1, order=order)
    page = found[:limit]
    body = FileList(data=page, has_more=len(found) > limit, first_id=page[0].id if page else None,
                    last_id=page[-1].id if page else None)
    return jsonify(body.model_dump())


@bp.get("/files/<file_id>")
@documented("openai", "Retrieve a file (OpenAI-compatible)", Ok(200, FileObject, "the file"), errors=(404, 503))
def retrieve(file_id: str):
    return jsonify(_get(file_id).model_dump())


@bp.get("/files/<file_id>/content")
@documented("openai", "A file's content (OpenAI-compatible), streamed",
            Ok(200, None, "the file's bytes", media="application/octet-stream"), errors=(404, 503))
def content(file_id: str):
    obj = _get(file_id)
    chunks = filestore().iter_bytes(content_key(file_id))  # NotFound (404) before any byte is sent
    headers = {"Content-Length": str(obj.bytes), "Content-Disposition": _disposition(obj.filename)}
    return Response(chunks, mimetype="application/octet-stream", headers=headers)


@bp.delete("/files/<file_id>")
@documented("openai", "Delete a file (OpenAI-compatible)", Ok(200, FileDeleted, "deleted"), errors=(404, 503))
def delete(file_id: str):
    if not delete_file(filestore(), index(), file_id):
        raise NotFound(f"no file {file_id!r}", param="file_id")
    return jsonify(FileDeleted(id=file_id, deleted=True).model_dump())


def _get(file_id: str) -> FileObject:
    obj = index().get(file_id)
    if obj is None:
        raise NotFound(f"no file {file_id!r}", param="file_id")
    return obj


def _disposition(name: str) -> str:
    """``attachment`` with the name in ASCII and, per RFC 6266, in UTF-8 (``filename*``)."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


def _too_large(limit: int) -> Response:
    """413 ``file_too_large``, once the rest of the body is read (so the client sees it)."""
    drain_body(limit + FORM_SLACK_BYTES)
    response = respond(too_large("file", limit))
    response.headers["Connection"] = "close"
    return response


def _boundary() -> bytes:
    mimetype, options = parse_options_header(request.headers.get("Content-Type", ""))
    if mimetype != "multipart/form-data":
        raise UnsupportedMediaType("an upload is multipart/form-data with the fields `file` and `purpose`")
    boundary = options.get("boundary", "")
    if not boundary:
        raise InvalidRequest("the multipart/form-data content type has no boundary")
    return boundary.encode("latin-1")


def _purpose(value: str | None) -> str:
    if value is None:
        raise InvalidRequest("the form has no `purpose` field", param="purpose")
    if value not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"purpose {value!r} is not supported; use one of {sorted(UPLOAD_PURPOSES)}",
                             param="purpose")
    return value


def _read_form(stream: IO[bytes], boundary: bytes, put: PutFile) -> tuple[dict[str, str], tuple[str, int] | None]:
    """Parse the form as it arrives: the fields (small) and the one file part ``file``, whose
    bytes ``put`` stores as they come. Returns the fields and (filename, size) of the file."""
    fields: dict[str, str] = {}
    saved: tuple[str, int] | None = None
    events = _events(stream, boundary)
    for event in events:
        if isinstance(event, Epilogue):
            break
        if isinstance(event, Preamble):
            continue
        if isinstance(event, File) and event.name == "file":
            if saved is not None:
                raise InvalidRequest("the form has more than one part named `file`", param="file")
            if "purpose" in fields:
                _purpose(fields["purpose"])  # refuse before reading the file
            saved = (_filename(event.filename), put(_part_data(events)))
        elif isinstance(event, (Field, File)):
            fields[event.name] = _field_value(events, event.name)
        else:
            raise InvalidRequest("the multipart body is malformed")
    return fields, saved


def _filename(raw: str | None) -> str:
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:255] or "upload"


def _events(stream: IO[bytes], boundary: bytes) -> Iterator[Event]:
    """The multipart events of the body, reading it ``READ_BYTES`` at a time; 400 if it ends
    before its closing boundary or is malformed."""
    decoder = MultipartDecoder(boundary, max_parts=64)
    while True:
        try:
            event = decoder.next_event()
        except ValueError:
            raise InvalidRequest("the multipart body is malformed or ended early") from None
        if isinstance(event, NeedData):
            chunk = stream.read(READ_BYTES)
            decoder.receive_data(chunk or None)
            continue
        yield event
        if isinstance(event, Epilogue):
            return


def _part_data(events: Iterator[Event]) -> Iterator[bytes]:
    for event in events:
        if not isinstance(event, Data):
            raise InvalidRequest("the multipart body is malformed")
        if event.data:
            yield event.data
        if not event.more_data:
            return
    raise InvalidRequest("the multipart body ended early")


def _field_value(events: Iterator[Event], name: str) -> str:
    value = bytearray()
    for chunk in _part_data(events):
        value += chunk
        if len(value) > FIELD_BYTES:
            raise InvalidRequest(f"the form field {name!r} is over {FIELD_BYTES} bytes", param=name)
    return value.decode("utf-8", "replace").strip()
