"""What a job encodes: SRC listed (or an input list read) as a stream of ``storage.ObjectInfo``, stable file ids, batching."""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator


from .. import storage
from ..audio import AUDIO_EXTENSIONS
from ..errors import ConfigError


def file_id_for(uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "big", signed=True)


def _list_inputs(src: str, input_list: str | None = None) -> Iterator[storage.ObjectInfo]:
    """Inputs, lazily: SRC listed page by page, or the rows of an input list file streamed."""
    if input_list:
        yield from read_input_list(input_list, src)
        return
    yield from storage.walk_files(src, AUDIO_EXTENSIONS)


def _resolve(entry: str, base: str, bucket: str | None = None) -> str:
    entry = entry.strip()
    if "://" in entry or entry.startswith("/"):
        return entry
    if bucket:
        proto = base.split("://", 1)[0] if "://" in base else "s3"
        return f"{proto}://{bucket}/{entry.lstrip('/')}"
    return storage.join(base, entry)


def read_input_list(url: str, base: str, batch_rows: int = 8192) -> Iterator[storage.ObjectInfo]:
    """Stream an input list: ``.parquet`` or ``.csv`` with a ``uri`` or ``key`` column (optional ``bucket``
    and ``size`` columns; a headerless CSV is read as S3 Inventory: bucket, key, size, ...), or text with one
    URI per line. Keys without a scheme are relative to ``base`` (SRC), or to their ``bucket``.
    Sizes that are not listed are -1 (measured when the file is read). Never holds the list in memory.
    """
    import csv
    import io
    from urllib.parse import unquote_plus

    low = url.lower().split("?", 1)[0]
    if low.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq
        with storage.open_read(url) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            col = next((c for c in ("uri", "url", "key", "source") if c in names), None)
            if col is None:
                raise ConfigError(f"{url}: input list has no uri/key column (columns: {', '.join(names)})")
            cols = [c for c in (col, "bucket", "size") if c in names]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                d = batch.to_pydict()
                for i, v in enumerate(d[col]):
                    if not v:
                        continue
                    if not v.lower().endswith(AUDIO_EXTENSIONS):
                        continue
                    sz = d["size"][i] if "size" in d and d["size"][i] is not None else -1
                    yield storage.ObjectInfo(_resolve(v, base, d.get("bucket", [None] * (i + 1))[i]), int(sz), "")
        return
    with storage.open_read(url) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        if low.endswith((".csv", ".csv.txt")):
            reader = csv.reader(text)
            header = next(reader, None)
            if header is None:
                return
            h = [c.strip().lower() for c in header]
            inventory = not any(c in h for c in ("uri", "url", "key", "source"))
            if inventory:  # S3 Inventory CSV: no header; bucket, key (URL-encoded), size, ...
                ib, ik, isz = 0, 1, 2
                rows = _chain_first(header, reader)
            else:
                ik = next(h.index(c) for c in ("uri", "url", "key", "source") if c in h)
                ib = h.index("bucket") if "bucket" in h else None
                isz = h.index("size") if "size" in h else None
                rows = reader
            for r in rows:
                if len(r) <= ik or not r[ik].strip():
                    continue
                key = unquote_plus(r[ik]) if inventory else r[ik]
                if not key.lower().endswith(AUDIO_EXTENSIONS):
                    continue
                bucket = r[ib] if ib is not None and len(r) > ib else None
                sz = r[isz] if isz is not None and len(r) > isz else ""
                yield storage.ObjectInfo(_resolve(key, base, bucket), int(sz) if sz.strip().isdigit() else -1, "")
            return
        for line in text:
            line = line.strip()
            if line and not line.startswith("#") and line.lower().endswith(AUDIO_EXTENSIONS):
                yield storage.ObjectInfo(_resolve(line, base), -1, "")


def _chain_first(first, rest):
    yield first
    yield from rest


def _batches(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _peek(it: Iterator) -> Iterator:
    """``it`` with its first item already fetched (a listing error or an empty SRC shows before any work)."""
    first = next(it, None)
    if first is None:
        return iter(())
    return _chain_first(first, it)
