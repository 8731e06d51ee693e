"""All I/O goes through here: any fsspec URL (plain paths, file://, s3://, ...) to files and listings.

Transient errors are retried with capped exponential backoff; permanent ones surface as
``StorageError`` naming the URL.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import random
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

from .errors import StorageError

T = TypeVar("T")

TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    version: str  # mtime or ETag: changes when the object changes


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: S3 endpoint from AUDIOARC_S3_ENDPOINT / AWS_ENDPOINT_URL."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AUDIOARC_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict = {}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **storage_options(url))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *[p.strip("/") for p in parts])


def _unstrip(fs, url: str, path: str) -> str:
    """Turn an fs-internal path back into a URL of the same scheme as ``url``."""
    if is_local(url):
        return path
    proto = url.split("://", 1)[0]
    return f"{proto}://{path}"


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__
    text = str(exc)
    if name in {"ServerDisconnectedError", "ClientOSError", "ClientConnectorError", "EndpointConnectionError",
                "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "ResponseStreamingError"}:
        return True
    return any(s in text for s in ("SlowDown", "Throttl", "InternalError", "ServiceUnavailable",
                                   "503", "500 Internal", "RequestTimeout", "Connection reset"))


def retry(fn: Callable[[], T], what: str, attempts: int = 6, base: float = 0.2, cap: float = 5.0) -> T:
    """Call ``fn``; retry known-transient errors with capped exponential backoff and jitter."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e) or i == attempts - 1:
                if is_transient(e):
                    raise StorageError(f"{what}: still failing after {attempts} attempts: {e}") from e
                raise
            from .metrics import note_retry
            note_retry(what.split(" ", 1)[0])  # op: reading|writing|listing|...
            time.sleep(min(cap, base * 2 ** i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return retry(lambda: fs.exists(path), f"checking {url}")


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    try:
        return retry(lambda: fs.cat_file(path), f"reading {url}")
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file or object") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. Local files are written to a temp name and renamed (atomic)."""
    fs, path = fs_and_path(url)
    if is_local(url):
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    retry(lambda: fs.pipe_file(path, data), f"writing {url}")


def open_write(url: str) -> BinaryIO:
    fs, path = fs_and_path(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, "wb")


def open_read(url: str) -> BinaryIO:
    fs, path = fs_and_path(url)
    try:
        return retry(lambda: fs.open(path, "rb"), f"opening {url}")
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file or object") from None


def move(src: str, dst: str) -> None:
    fs, p1 = fs_and_path(src)
    _, p2 = fs_and_path(dst)
    if is_local(src):
        os.makedirs(os.path.dirname(p2), exist_ok=True)
        os.replace(p1, p2)
        return
    retry(lambda: fs.mv(p1, p2), f"moving {src} to {dst}")


def remove(url: str, recursive: bool = False) -> None:
    fs, path = fs_and_path(url)
    with contextlib.suppress(FileNotFoundError):
        retry(lambda: fs.rm(path, recursive=recursive), f"removing {url}")


def list_dir(url: str) -> list[str]:
    """Immediate children of ``url`` (URLs); empty if it does not exist."""
    fs, path = fs_and_path(url)
    try:
        entries = retry(lambda: fs.ls(path, detail=False), f"listing {url}")
    except FileNotFoundError:
        return []
    return sorted(_unstrip(fs, url, e) for e in entries)


def walk_files(url: str, extensions: tuple[str, ...]) -> Iterator[ObjectInfo]:
    """Every object under ``url`` (or ``url`` itself if it is an object) whose name ends in ``extensions``.

    Yields in sorted order, one directory at a time (the listing is not held in memory at once).
    """
    fs, root = fs_and_path(url)
    try:
        info = retry(lambda: fs.info(root), f"reading {url}")
    except FileNotFoundError:
        raise StorageError(f"{url}: source does not exist; check the path or URL") from None
    if info.get("type") != "directory":
        yield _object_info(fs, url, info)
        return
    for dirpath, dirs, files in fs.walk(root, detail=True):
        dirs_sorted = sorted(dirs) if isinstance(dirs, list) else sorted(dirs.keys())
        if isinstance(dirs, list):
            dirs[:] = dirs_sorted
        for name in sorted(files):
            if not name.lower().endswith(extensions) or name.startswith("."):
                continue
            finfo = files[name] if isinstance(files, dict) else fs.info(posixpath.join(dirpath, name))
            yield _object_info(fs, url, finfo)


def _object_info(fs, url: str, info: dict) -> ObjectInfo:
    name = info["name"]
    version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
    return ObjectInfo(_unstrip(fs, url, name), int(info.get("size") or 0), version)


def relpath(root: str, uri: str) -> str:
    """Path of ``uri`` relative to the source root ``root`` (its base name if root is the object)."""
    r = local_path(root).rstrip("/")
    u = local_path(uri)
    if u == r:
        return posixpath.basename(u)
    if u.startswith(r + "/"):
        return u[len(r) + 1:]
    return posixpath.basename(u)


@contextlib.contextmanager
def open_input(uri: str, chunk: int = 1 << 20) -> Iterator[tuple[str | BinaryIO, str]]:
    """Open a source object for decoding; yields ``(file, sha256 hex)``.

    Local files are hashed in place and decoded from disk. Remote objects are streamed once into a
    local temp file while hashing (one GET, bounded memory), and decoded from there.
    """
    if is_local(uri):
        path = local_path(uri)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(chunk):
                h.update(b)
        yield path, h.hexdigest()
        return
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(prefix="audioarc-in-", suffix=posixpath.splitext(uri)[1]) as tmp:
        def fetch():
            nonlocal h
            tmp.seek(0)
            tmp.truncate()
            h = hashlib.sha256()
            with open_read(uri) as src:
                while b := src.read(chunk):
                    h.update(b)
                    tmp.write(b)
            tmp.flush()
        retry(fetch, f"reading {uri}")
        yield tmp.name, h.hexdigest()
