"""All I/O goes through here: any fsspec URL (plain paths, file://, s3://, ...) to files and listings.

Transient errors are retried with capped exponential backoff; permanent ones surface as
``StorageError`` naming the URL.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
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


#: environment variables that configure object storage; passed on to Ray workers (values never logged)
STORAGE_ENV_VARS = ("AUDIOARC_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
                    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
                    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")

CREDENTIALS_HINT = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the endpoint "
                    "(AWS_ENDPOINT_URL / --s3-endpoint)")


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def s3_endpoint() -> str | None:
    return (os.environ.get("AUDIOARC_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: S3 endpoint from AUDIOARC_S3_ENDPOINT / AWS_ENDPOINT_URL.

    Credentials are left to botocore's standard chain (env vars, AWS_PROFILE / shared config, instance
    roles). Listings are not cached: workers in other processes write under the same prefixes.
    """
    if is_s3(url):
        opts: dict = {"use_listings_cache": False}
        endpoint = s3_endpoint()
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def delta_location(url: str) -> tuple[str, dict[str, str]]:
    """``(table uri, storage options)`` for a Delta Lake table at ``url`` (deltalake / delta-rs): a local
    path made absolute, or the object-store URL with the endpoint and credentials of the environment."""
    if is_local(url):
        return os.path.abspath(local_path(url)), {}
    opts: dict[str, str] = {}
    endpoint = s3_endpoint()
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        if os.environ.get(k):
            opts[k] = os.environ[k]
    opts["AWS_REGION"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return url.replace("s3a://", "s3://", 1), opts


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **storage_options(url))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def absolute(url: str) -> str:
    """A local path made absolute (``file://`` kept as a plain path); URLs unchanged."""
    return os.path.abspath(local_path(url)) if is_local(url) else url


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *[p.strip("/") for p in parts])


def _unstrip(fs, url: str, path: str) -> str:
    """Turn an fs-internal path back into a URL of the same scheme as ``url``."""
    if is_local(url):
        return path
    proto = url.split("://", 1)[0]
    return f"{proto}://{path}"


TRANSIENT_TYPE_NAMES = {
    # aiohttp
    "ServerDisconnectedError", "ClientOSError", "ClientConnectorError", "ClientConnectionError",
    "ClientPayloadError", "ServerTimeoutError", "ClientConnectionResetError",
    # botocore
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "HTTPClientError", "IncompleteReadError", "ProxyConnectionError",
    # fsspec / asyncio
    "FSTimeoutError", "IncompleteRead",
}
TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "InternalError",
                      "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed", "500", "502", "503", "504"}
# errnos s3fs gives 5xx / throttling responses (EREMOTEIO: InternalError / 500; EBUSY: SlowDown / 503)
TRANSIENT_ERRNOS |= {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """Timeouts, connection failures, 5xx and throttling: worth retrying. 4xx and bad data are not."""
    for e in _chain(exc):
        if isinstance(e, (PermissionError, FileNotFoundError, FileExistsError)):
            return False
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        if type(e).__name__ in TRANSIENT_TYPE_NAMES:
            return True
        resp = getattr(e, "response", None)  # botocore ClientError
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in TRANSIENT_S3_CODES or int(status) >= 500 or int(status) == 429:
                return True
            return False
    text = str(exc)
    return any(s in text for s in ("SlowDown", "Throttl", "ServiceUnavailable", "RequestTimeout",
                                   "Connection reset", "Server disconnected"))


def _is_precondition_failed(exc: BaseException) -> bool:
    text = " ".join(str(e) for e in _chain(exc))
    return "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text


def check_bucket(url: str) -> None:
    """Fail fast, naming the bucket, when ``url`` is on an object store and its bucket does not exist
    (some servers would create it on the first write; AWS would fail every write)."""
    b = _bucket(url)
    if not b:
        return
    fs, _ = fs_and_path(url)
    try:
        if is_s3(url):  # HEAD bucket: 403 is a credentials problem, 404 a missing bucket
            retry(lambda: fs.call_s3("head_bucket", Bucket=b), f"checking bucket of {url}")
            return
        ok = retry(lambda: fs.exists(b), f"checking bucket of {url}")
    except FileNotFoundError:
        ok = False
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise translate(e, url, f"checking bucket of {url}") from e
    if not ok:
        raise StorageError(f"bucket {b!r} does not exist (URL {url}); create it or fix the URL")


def _is_auth_error(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, PermissionError):
            return True
        text = str(e)
        if any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                                   "NoCredentialsError", "Unable to locate credentials")):
            return True
        if type(e).__name__ in {"NoCredentialsError", "PartialCredentialsError"}:
            return True
    return False


def _bucket(url: str) -> str | None:
    if "://" not in url or is_local(url):
        return None
    return url.split("://", 1)[1].split("/", 1)[0]


def _missing_bucket(exc: BaseException, url: str) -> bool:
    """True when ``exc`` (a not-found) is about the bucket itself rather than a key in it."""
    text = " ".join(str(e) for e in _chain(exc))
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return True
    b = _bucket(url)
    if not b:
        return False
    try:
        check_bucket(url)
        return False
    except StorageError as e:
        return "does not exist" in str(e)
    except Exception:  # noqa: BLE001 - best effort
        return False


def translate(exc: BaseException, url: str, what: str) -> BaseException:
    """A permanent storage failure as a StorageError that names ``url`` and the likely fix."""
    if isinstance(exc, StorageError):
        return exc
    if _is_auth_error(exc):
        return StorageError(f"{what}: access denied by the object store for {url}; {CREDENTIALS_HINT} "
                            f"({type(exc).__name__}: {exc})")
    if isinstance(exc, FileNotFoundError) and _bucket(url) and _missing_bucket(exc, url):
        return StorageError(f"{what}: bucket {_bucket(url)!r} does not exist (URL {url}); create it or fix the URL")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url}: no such file or object")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


def retry(fn: Callable[[], T], what: str, attempts: int | None = None, base: float = 0.2, cap: float = 5.0,
          url: str | None = None) -> T:
    """Call ``fn``; retry known-transient errors with capped exponential backoff and jitter.

    FileNotFoundError passes through (callers decide what missing means), except a missing bucket,
    which becomes a StorageError naming it when ``url`` is given. Other permanent errors fail at once;
    with ``url`` they become StorageErrors naming it (access denied: a hint to check credentials).
    Attempts: ``attempts`` or $AUDIOARC_STORAGE_ATTEMPTS (default 8: about 15 s of backoff in all).
    """
    if attempts is None:
        attempts = max(1, int(os.environ.get("AUDIOARC_STORAGE_ATTEMPTS", "8")))
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError as e:
            if url is not None and _bucket(url) and _missing_bucket(e, url):
                raise translate(e, url, what) from None
            raise
        except (StorageError, FileExistsError):
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_precondition_failed(e):  # a conditional create found the object there
                raise FileExistsError(f"{what}: already exists") from e
            if not is_transient(e) or i == attempts - 1:
                if is_transient(e):
                    raise StorageError(f"{what}: still failing after {attempts} attempts: "
                                       f"{type(e).__name__}: {e}") from e
                if url is not None:
                    raise translate(e, url, what) from e
                raise
            from .telemetry import note_retry
            note_retry(what.split(" ", 1)[0])  # op: reading|writing|listing|...
            time.sleep(min(cap, base * 2 ** i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return retry(lambda: fs.exists(path), f"checking {url}", url=url)


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    try:
        return retry(lambda: fs.cat_file(path), f"reading {url}", url=url)
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file or object") from None


def write_bytes(url: str, data: bytes, exclusive: bool = False) -> None:
    """Write a whole object. Local files are written to a temp name and renamed (atomic); an object
    store gets one PUT (atomic too: readers see the old object or the new one).

    ``exclusive``: fail with FileExistsError if the object already exists. On S3 this is a conditional
    PUT (If-None-Match: *); a server that does not support it gets a check-then-put instead.
    """
    fs, path = fs_and_path(url)
    if is_local(url):
        d = os.path.dirname(path) or "."
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the modes any other file gets
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if exclusive:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            finally:
                os.unlink(tmp)
            return
        os.replace(tmp, path)
        return
    if not exclusive:
        retry(lambda: fs.pipe_file(path, data), f"writing {url}", url=url)
        return
    if is_s3(url):
        try:
            retry(lambda: fs.pipe_file(path, data, mode="create"), f"writing {url}", url=url)
            return
        except FileExistsError:
            raise
        except StorageError as e:
            if not _conditional_unsupported(e):
                raise
        except (OSError, NotImplementedError, TypeError) as e:
            if not _conditional_unsupported(e):
                raise
    # fallback: not atomic against a concurrent writer, but catches the common case
    if retry(lambda: fs.exists(path), f"checking {url}", url=url):
        raise FileExistsError(f"{url}: already exists")
    retry(lambda: fs.pipe_file(path, data), f"writing {url}", url=url)


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def _conditional_unsupported(exc: BaseException) -> bool:
    text = " ".join(f"{type(e).__name__} {e}" for e in _chain(exc))
    return isinstance(exc, (NotImplementedError, TypeError)) or any(
        s in text for s in ("NotImplemented", "ENOSYS", "not implemented", "IfNoneMatch", "501"))


class _SpoolThenUpload(io.BufferedRandom):
    """A local temp file that is uploaded (one retried PUT or multipart upload) when closed without error.

    A whole-object upload can be retried after a dropped connection or a restarted server; a
    streaming multipart writer cannot. Nothing is uploaded if the ``with`` block raises.
    """

    def __init__(self, url: str):
        self._url = url
        fd, self._tmp = tempfile.mkstemp(prefix="audioarc-out-")
        super().__init__(io.FileIO(fd, "w+b"))
        self._failed = False

    def __exit__(self, exc_type, exc, tb):
        self._failed = exc_type is not None
        return super().__exit__(exc_type, exc, tb)

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
            if not self._failed:
                fs, path = fs_and_path(self._url)
                retry(lambda: fs.put_file(self._tmp, path), f"writing {self._url}", url=self._url)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)


def open_write(url: str) -> BinaryIO:
    """A writer for ``url``; on an object store the bytes are spooled locally and uploaded on close."""
    fs, path = fs_and_path(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return fs.open(path, "wb")
    return _SpoolThenUpload(url)


#: open_read options for reading a few byte ranges of a big object (Parquet footers and row groups)
RANGE_READ = {"block_size": 1 << 18, "cache_type": "readahead"}


def open_read(url: str, **kwargs) -> BinaryIO:
    """A seekable reader. On S3 this reads byte ranges on demand (``kwargs``: block_size, cache_type, size)."""
    fs, path = fs_and_path(url)
    if is_local(url):
        kwargs = {}
    try:
        return retry(lambda: fs.open(path, "rb", **kwargs), f"opening {url}", url=url)
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file or object") from None


def size(url: str) -> int:
    fs, path = fs_and_path(url)
    try:
        return int(retry(lambda: fs.size(path), f"reading size of {url}", url=url))
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file or object") from None


def move(src: str, dst: str) -> None:
    """Rename. On an object store this is copy then delete (each retried); it is idempotent: a retry
    after the copy or the delete already happened finishes the job rather than failing."""
    fs, p1 = fs_and_path(src)
    _, p2 = fs_and_path(dst)
    if is_local(src):
        os.makedirs(os.path.dirname(p2), exist_ok=True)
        os.replace(p1, p2)
        return
    try:
        retry(lambda: fs.copy(p1, p2), f"copying {src} to {dst}", url=src)
    except FileNotFoundError:
        if not retry(lambda: fs.exists(p2), f"checking {dst}", url=dst):
            raise StorageError(f"moving {src} to {dst}: source is gone and the target does not exist") from None
        return  # an earlier attempt copied and deleted it
    with contextlib.suppress(FileNotFoundError):
        retry(lambda: fs.rm_file(p1), f"removing {src}", url=src)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = fs_and_path(url)
    with contextlib.suppress(FileNotFoundError):
        retry(lambda: fs.rm(path, recursive=recursive), f"removing {url}", url=url)


def list_dir(url: str) -> list[str]:
    """Immediate children of ``url`` (URLs with the scheme of ``url``); empty if it does not exist."""
    fs, path = fs_and_path(url)
    try:
        entries = retry(lambda: fs.ls(path, detail=False), f"listing {url}", url=url)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        if e.rstrip("/") == path.rstrip("/"):  # some stores list a directory marker as its own child
            continue
        out.append(_unstrip(fs, url, e.rstrip("/")))
    return sorted(out)


def walk_files(url: str, extensions: tuple[str, ...]) -> Iterator[ObjectInfo]:
    """Every object under ``url`` (or ``url`` itself if it is an object) whose name ends in ``extensions``.

    Yields in sorted order without holding the listing in memory: S3 is listed one page (1000 keys)
    at a time in key order; other filesystems one directory at a time.
    """
    if is_s3(url):
        yield from _walk_s3(url, extensions)
        return
    fs, root = fs_and_path(url)
    try:
        info = retry(lambda: fs.info(root), f"reading {url}", url=url)
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


def _walk_s3(url: str, extensions: tuple[str, ...]) -> Iterator[ObjectInfo]:
    fs, root = fs_and_path(url)
    proto = url.split("://", 1)[0]
    bucket, _, key = root.partition("/")
    prefix = key.rstrip("/") + "/" if key.rstrip("/") else ""
    found = False
    if key and not key.endswith("/"):  # maybe a single object
        try:
            info = retry(lambda: fs.info(root), f"reading {url}", url=url)
            if info.get("type") != "directory":
                yield _object_info(fs, url, info)
                return
        except FileNotFoundError:
            pass
    token = None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            kw["ContinuationToken"] = token
        page = retry(lambda: fs.call_s3("list_objects_v2", **kw), f"listing {url}", url=url)
        for obj in page.get("Contents", []) or []:
            k = obj["Key"]
            found = True
            name = k.rsplit("/", 1)[-1]
            if k.endswith("/") or name.startswith(".") or not name.lower().endswith(extensions):
                continue
            yield ObjectInfo(f"{proto}://{bucket}/{k}", int(obj.get("Size") or 0),
                             str(obj.get("ETag") or obj.get("LastModified") or ""))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            break
    if not found:
        raise StorageError(f"{url}: source does not exist or holds no objects; check the path or URL")


def _object_info(fs, url: str, info: dict) -> ObjectInfo:
    name = info["name"]
    version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
    return ObjectInfo(_unstrip(fs, url, name), int(info.get("size") or 0), version)


def _normalized(url: str) -> str:
    """A comparable form of ``url``: local paths absolute and normalised, ``s3a://`` as ``s3://``."""
    if is_local(url):
        return os.path.normpath(os.path.abspath(local_path(url)))
    scheme, rest = url.split("://", 1)
    scheme = "s3" if scheme == "s3a" else scheme
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def relpath(root: str, uri: str) -> str:
    """Path of ``uri`` relative to the source root ``root`` however either was typed (relative, absolute,
    ``file://``, ``s3://``): its base name if root is the object itself; the full key (no leading slash) of an
    input that is not under root (an input list's)."""
    r, u = _normalized(root).rstrip("/"), _normalized(uri)
    if u == r:
        return posixpath.basename(u)
    if u.startswith(r + "/"):
        return u[len(r) + 1:]
    return u.split("://", 1)[-1].lstrip("/")


@contextlib.contextmanager
def open_input(uri: str, chunk: int = 1 << 20) -> Iterator[tuple[str | BinaryIO, str]]:
    """Open a source object for decoding; yields ``(file, sha256 hex)``.

    Local files are hashed in place and decoded from disk. Remote objects are downloaded once into a
    local temp file (one GET for objects up to the fs block size; bounded memory), hashed from there,
    and decoded from there. A missing object is a StorageError naming it.
    """
    if is_local(uri):
        path = local_path(uri)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(chunk):
                h.update(b)
        yield path, h.hexdigest()
        return
    fs, rpath = fs_and_path(uri)
    with tempfile.TemporaryDirectory(prefix="audioarc-in-") as d:
        local = os.path.join(d, "input" + posixpath.splitext(uri)[1])
        try:
            retry(lambda: fs.get_file(rpath, local), f"reading {uri}", url=uri)
        except FileNotFoundError:
            raise StorageError(f"{uri}: no such object (deleted after it was listed?)") from None
        h = hashlib.sha256()
        with open(local, "rb") as f:
            while b := f.read(chunk):
                h.update(b)
        yield local, h.hexdigest()
