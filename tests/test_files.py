"""Files: the file store (a local directory and a real S3 server, SeaweedFS) and OpenAI's
``/v1/files`` through the official SDK against a real gunicorn, for both stores.

Every test here runs twice, once per store (the ``files_url`` fixture)."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import fakeredis
import openai
import pytest
import requests

from modelbay.services import descendants
from modelbay.stack import LocalStack
from tasks.errors import FileStoreUnavailable, FileTooLarge, NotFound
from tasks.filestore import FileStore, open_filestore
from tasks.files import FileIndex, FileObject, content_key, new_file_id, save_file
from tasks.settings import load_settings

KEY = "files-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_FILE_MB = 64
PART_MB = 5  # S3's least part size: a file of a few MiB is a multipart upload
MiB = 1 << 20
T = TypeVar("T")


@pytest.fixture
def fs(files_url: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FileStore:
    for name, value in files_url.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)  # boto3 reads its credentials from the environment
    return open_filestore(load_settings(files_url, s3_part_mb=PART_MB))


def _chunks(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    return (data[i:i + size] for i in range(0, len(data), size))


# ---- the store ------------------------------------------------------------------------------

def test_a_stream_goes_in_and_comes_back_byte_for_byte(fs: FileStore) -> None:
    data = os.urandom(12 * MiB) + b"\nsecond line\n\nlast line"  # 3 parts on S3
    assert fs.put_stream("files/big", _chunks(data), max_bytes=13 * MiB) == len(data)
    assert fs.size("files/big") == len(data)
    assert b"".join(fs.iter_bytes("files/big", chunk_bytes=MiB)) == data
    assert list(fs.iter_lines("files/big"))[-3:] == [b"second line", b"", b"last line"]
    fs.put_bytes("files/small", b'{"a": 1}\n{"b": 2}\n')
    assert list(fs.iter_lines("files/small")) == [b'{"a": 1}', b'{"b": 2}']
    fs.put_bytes("files/empty", b"")
    assert fs.size("files/empty") == 0 and list(fs.iter_lines("files/empty")) == []


def test_over_the_limit_nothing_is_kept(fs: FileStore, files_url: dict[str, str], request) -> None:
    for size, limit in [(2 * MiB, MiB), (12 * MiB, 11 * MiB)]:  # on S3: in the first part; after two parts
        with pytest.raises(FileTooLarge) as caught:
            fs.put_stream("files/too-big", _chunks(os.urandom(size)), max_bytes=limit)
        assert caught.value.status == 413 and caught.value.code == "file_too_large"
        assert fs.size("files/too-big") is None and fs.list_keys("files/too-big") == []
    assert fs.put_stream("files/exact", _chunks(b"x" * MiB), max_bytes=MiB) == MiB  # the limit itself is fine
    if files_url["MODELBAY_FILES_URL"].startswith("s3://"):
        assert request.getfixturevalue("s3_server").uploads_in_progress() == []  # aborted, not left


def test_listing_and_deleting(fs: FileStore) -> None:
    for key in ["batches/b1/parts/000001.out.jsonl", "batches/b1/parts/000000.out.jsonl",
                "batches/b1/parts/000000.err.jsonl", "batches/b10/parts/000000.out.jsonl", "files/f1"]:
        fs.put_bytes(key, b"{}\n")
    assert fs.list_keys("batches/b1/") == ["batches/b1/parts/000000.err.jsonl", "batches/b1/parts/000000.out.jsonl",
                                           "batches/b1/parts/000001.out.jsonl"]
    assert fs.list_keys("batches/b1") == [*fs.list_keys("batches/b1/"), "batches/b10/parts/000000.out.jsonl"]
    fs.delete_prefix("batches/b1/")
    assert fs.list_keys("batches/") == ["batches/b10/parts/000000.out.jsonl"]
    fs.delete("files/f1")
    fs.delete("files/f1")  # again: nothing to do
    assert fs.size("files/f1") is None and fs.list_keys("nothing/") == []
    with pytest.raises(NotFound):
        fs.iter_bytes("files/f1")  # at once, before the first chunk is asked for
    for bad in ["", "/abs", "a/../b", "a//b", "a/./b"]:
        with pytest.raises(ValueError):
            fs.put_bytes(bad, b"")


def test_the_index_lists_pages_and_forgets() -> None:
    index = FileIndex(fakeredis.FakeRedis(decode_responses=True))
    objs = [FileObject(id=new_file_id(), bytes=i, created_at=1_700_000_000 + i, filename=f"f{i}.jsonl",
                       purpose="batch" if i % 2 else "batch_output") for i in range(5)]
    for obj in objs:
        index.put(obj)
    ids = [o.id for o in objs]
    assert [o.id for o in index.list()] == ids[::-1]
    assert [o.id for o in index.list(order="asc", limit=2)] == ids[:2]
    assert [o.id for o in index.list(order="asc", after=ids[1])] == ids[2:]
    assert [o.id for o in index.list(purpose="batch")] == [ids[3], ids[1]]
    assert index.list(after="file-unknown") == []
    assert index.get(ids[0]) == objs[0] and index.get("file-nope") is None
    assert index.delete(ids[0]) and not index.delete(ids[0])
    assert [o.id for o in index.list(order="asc")] == ids[1:]


def test_save_file_writes_bytes_then_record(fs: FileStore) -> None:
    index = FileIndex(fakeredis.FakeRedis(decode_responses=True))
    obj = save_file(fs, index, filename="out.jsonl", purpose="batch_output", chunks=[b"a\n", b"b\n"])
    assert obj.id.startswith("file-") and obj.bytes == 4 and obj.status == "processed"
    assert index.get(obj.id) == obj and b"".join(fs.iter_bytes(content_key(obj.id))) == b"a\nb\n"
    with pytest.raises(FileTooLarge):
        save_file(fs, index, filename="x", purpose="batch", chunks=[b"x" * 10], max_bytes=5)
    assert index.list() == [obj]


# ---- /v1/files ------------------------------------------------------------------------------

@dataclass
class FilesWeb:
    url: str
    store: FileStore
    sdk: openai.OpenAI
    pid: int  # gunicorn's one worker process


@pytest.fixture(scope="module")
def files_web(local_stack: LocalStack, stack_env: dict[str, str], files_url: dict[str, str]) -> Iterator[FilesWeb]:
    """gunicorn (one worker process) with an API key, files in the store of ``files_url``,
    a 64 MiB file limit."""
    env = {**stack_env, **files_url, "MODELBAY_API_KEYS": KEY, "MODELBAY_MAX_FILE_MB": str(MAX_FILE_MB),
           "MODELBAY_S3_PART_MB": str(PART_MB)}
    kind = files_url["MODELBAY_FILES_URL"].split(":", 1)[0]
    web = local_stack.start_web(env=env, log_name=f"web-files-{kind}.log")
    saved = {name: os.environ.get(name) for name in files_url if name.startswith("AWS_")}
    os.environ.update({name: files_url[name] for name in saved})
    try:
        store = open_filestore(load_settings(env))
        (pid,) = descendants(web.proc.pid)
        yield FilesWeb(web.url, store, openai.OpenAI(base_url=f"{web.url}/v1", api_key=KEY, max_retries=0), pid)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        local_stack.stop(web)


def test_the_sdk_round_trip(files_web: FilesWeb) -> None:
    sdk = files_web.sdk
    data = os.urandom(7 * MiB)  # two parts on S3
    created = sdk.files.create(file=("requests.jsonl", data), purpose="batch")
    assert created.id.startswith("file-") and created.object == "file" and created.bytes == len(data)
    assert (created.filename, created.purpose, created.status) == ("requests.jsonl", "batch", "processed")
    assert sdk.files.retrieve(created.id) == created
    assert sdk.files.content(created.id).content == data
    small = sdk.files.create(file=("données 文件.jsonl", b'{"x": 1}\n'), purpose="batch")
    assert small.filename == "données 文件.jsonl"
    got = requests.get(f"{files_web.url}/v1/files/{small.id}/content", headers=AUTH, timeout=30)
    assert got.content == b'{"x": 1}\n' and "filename*=UTF-8''donn%C3%A9es%20" in got.headers["Content-Disposition"]
    listed = sdk.files.list(limit=1)
    assert [f.id for f in listed.data] == [small.id] and listed.has_more
    assert created.id in [f.id for f in sdk.files.list(purpose="batch", order="asc")]
    raw = requests.get(f"{files_web.url}/v1/files", params={"limit": 1, "after": small.id}, headers=AUTH,
                       timeout=30).json()
    assert raw["object"] == "list" and raw["first_id"] == raw["last_id"] == created.id
    for file_id in (created.id, small.id):
        deleted = sdk.files.delete(file_id)
        assert (deleted.id, deleted.deleted) == (file_id, True)
        assert files_web.store.size(content_key(file_id)) is None
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.delete(created.id)


def _upload(url: str, body, headers: dict[str, str] | None = None, **fields: str) -> requests.Response:
    return requests.post(f"{url}/v1/files", files={"file": ("big.jsonl", body)}, data=fields,
                         headers={**AUTH, **(headers or {})}, timeout=120)


def _error(resp: requests.Response, status: int, code: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] == param, error


def test_a_file_over_the_limit_is_413_and_leaves_nothing(files_web: FilesWeb) -> None:
    before = files_web.store.list_keys("files/")
    too_big = os.urandom(MAX_FILE_MB * MiB + 1)
    _error(_upload(files_web.url, too_big, purpose="batch"), 413, "file_too_large", "file")
    with pytest.raises(openai.APIStatusError) as caught:
        files_web.sdk.files.create(file=("big.jsonl", too_big), purpose="batch")
    assert caught.value.status_code == 413
    assert files_web.store.list_keys("files/") == before
    assert requests.get(f"{files_web.url}/healthz", timeout=10).status_code == 200


def test_a_chunked_upload_is_counted_as_it_arrives(files_web: FilesWeb) -> None:
    """No Content-Length: the body is read to its end (gunicorn ends chunked input), the
    file's bytes counted on the way."""
    before = files_web.store.list_keys("files/")
    for size, status in [(MiB, 200), (MAX_FILE_MB * MiB + 1, 413)]:
        prepared = requests.Request("POST", f"{files_web.url}/v1/files", headers=AUTH,
                                    files={"purpose": (None, "batch"), "file": ("c.jsonl", b"y" * size)}).prepare()
        body = prepared.body
        resp = requests.post(prepared.url, data=(body[i:i + MiB] for i in range(0, len(body), MiB)),
                             headers={**AUTH, "Content-Type": prepared.headers["Content-Type"]}, timeout=120)
        assert resp.status_code == status, resp.text
        if status == 200:
            assert resp.json()["bytes"] == size
            requests.delete(f"{files_web.url}/v1/files/{resp.json()['id']}", headers=AUTH, timeout=30)
        else:
            assert resp.json()["error"]["code"] == "file_too_large"
    assert files_web.store.list_keys("files/") == before


def test_a_body_shorter_than_its_content_length_says_is_400(files_web: FilesWeb) -> None:
    """A Content-Length that lies short: the form ends early (its closing boundary is never
    read), 400, and nothing is kept."""
    before = files_web.store.list_keys("files/")
    prepared = requests.Request("POST", f"{files_web.url}/v1/files", headers=AUTH,
                                files={"purpose": (None, "batch"), "file": ("c.jsonl", b"z" * 100_000)}).prepare()
    host, port = files_web.url.removeprefix("http://").split(":")
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: {prepared.headers['Content-Type']}\r\nContent-Length: 50000\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + prepared.body[:50_000])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b'"invalid_request"' in answer
    assert files_web.store.list_keys("files/") == before


def test_bad_uploads_are_400_or_415(files_web: FilesWeb) -> None:
    url = files_web.url
    before = files_web.store.list_keys("files/")
    _error(_upload(url, b"{}\n", purpose="fine-tune"), 400, "invalid_request", "purpose")
    _error(_upload(url, b"{}\n"), 400, "invalid_request", "purpose")
    _error(requests.post(f"{url}/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")}, headers=AUTH,
                         timeout=30), 400, "invalid_request", "file")
    _error(requests.post(f"{url}/v1/files", json={"purpose": "batch"}, headers=AUTH, timeout=30), 415,
           "unsupported_media_type")
    # The purpose after the file: the file is read, then dropped.
    late = requests.Request("POST", f"{url}/v1/files", headers=AUTH,
                            files=[("file", ("a.jsonl", b"{}\n")), ("purpose", (None, "assistants"))]).prepare()
    _error(requests.Session().send(late, timeout=30), 400, "invalid_request", "purpose")
    with pytest.raises(openai.BadRequestError):
        files_web.sdk.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    assert files_web.store.list_keys("files/") == before


def test_the_routes_need_the_key_and_unknown_ids_are_404(files_web: FilesWeb) -> None:
    url = files_web.url
    assert requests.get(f"{url}/v1/files", timeout=30).status_code == 401
    assert requests.post(f"{url}/v1/files", files={"file": ("a", b"1")}, data={"purpose": "batch"},
                         timeout=30).status_code == 401
    for method, path in [("GET", "/v1/files/file-nope"), ("GET", "/v1/files/file-nope/content"),
                         ("DELETE", "/v1/files/file-nope")]:
        resp = requests.request(method, f"{url}{path}", headers=AUTH, timeout=30)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", (method, path, resp.text)
    _error(requests.get(f"{url}/v1/files", params={"limit": 0}, headers=AUTH, timeout=30), 400, "invalid_request",
           "limit")
    _error(requests.get(f"{url}/v1/files", params={"order": "up"}, headers=AUTH, timeout=30), 400,
           "invalid_request", "order")


def test_a_missing_bucket_is_made_on_the_first_write(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh S3 server of one's own (compose's SeaweedFS) has no bucket: the store makes it."""
    env = {**s3_server.env(), "MODELBAY_FILES_URL": f"s3://fresh-{new_file_id()[5:17]}/files"}
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    fs = open_filestore(load_settings(env))
    fs.put_bytes("files/a", b"hello")
    assert b"".join(fs.iter_bytes("files/a")) == b"hello" and fs.list_keys("") == ["files/a"]


def _memory_mib(pid: int, field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of ``pid``, in MiB."""
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith(f"{field}:"))
    return int(line.split()[1]) // 1024


def test_no_whole_file_is_held_in_the_web_process(files_web: FilesWeb) -> None:
    """A 60 MiB upload and its download raise the web worker's peak memory by less than half
    the file: the bytes stream (a local store holds one read, S3 about one part of 5 MiB,
    and the S3 client's copies of it)."""
    size = 60 * MiB
    warm = files_web.sdk.files.create(file=("warm.jsonl", b"{}\n"), purpose="batch")  # the S3 client is made
    files_web.sdk.files.delete(warm.id)
    data = os.urandom(size)

    def peak_growth(action: Callable[[], T]) -> tuple[int, T]:
        with open(f"/proc/{files_web.pid}/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the current RSS
        before = _memory_mib(files_web.pid, "VmRSS")
        result = action()
        return _memory_mib(files_web.pid, "VmHWM") - before, result

    grew, created = peak_growth(lambda: files_web.sdk.files.create(file=("big.jsonl", data), purpose="batch"))
    assert created.bytes == size and grew < size // MiB // 2, f"upload: peak +{grew} MiB"
    grew, got = peak_growth(lambda: requests.get(f"{files_web.url}/v1/files/{created.id}/content", headers=AUTH,
                                                 timeout=120).content)
    assert got == data and grew < size // MiB // 2, f"download: peak +{grew} MiB"
    files_web.sdk.files.delete(created.id)


def test_an_unreachable_s3_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at the endpoint: every call is FileStoreUnavailable (503, Retry-After),
    not a 500; a key that is not one is still a ValueError."""
    from modelbay.services import free_port
    from s3server import CREDENTIALS

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    fs = open_filestore(load_settings({"MODELBAY_FILES_URL": "s3://nowhere/files",
                                       "MODELBAY_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}))
    for call in (lambda: fs.put_bytes("files/a", b"x"), lambda: fs.size("files/a"),
                 lambda: fs.iter_bytes("files/a"), lambda: fs.list_keys("files/"), lambda: fs.delete("files/a"),
                 lambda: fs.put_stream("files/a", [b"x"])):
        with pytest.raises(FileStoreUnavailable) as caught:
            call()
        assert caught.value.status == 503 and caught.value.headers["Retry-After"]
    with pytest.raises(ValueError):
        fs.size("../a")
