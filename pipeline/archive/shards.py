"""Shard files: writing code rows (row checksums, page checksums, whole-object sha256) and reading one file's
windows back, checked."""
from __future__ import annotations

import hashlib
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..errors import ArchiveFormatError, IntegrityError, StorageError
from ..manifest import CodecRecord, ManifestEntry
from . import layout
from .codes import bits_for, row_checksum, unpack_codes, unpack_gains
from .exitgc import exit_gc


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha = raw, hashlib.sha256()
        self.n = 0
        self.closed = False

    def write(self, data) -> int:
        mv = memoryview(data)
        self.sha.update(mv)
        self.n += mv.nbytes
        return self.raw.write(mv)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.raw.close()


class ShardWriter:
    """Writes code rows into one shard; row groups close at ~ROW_GROUP_BYTES of codes.

    After ``close()``: ``where`` (file id -> row groups), ``sha256`` and ``bytes`` of the object written.
    Each row gets its CRC-32C; pages get Parquet's own CRC checksums.
    """

    def __init__(self, url: str, codec: CodecRecord, row_group_bytes: int = layout.ROW_GROUP_BYTES):
        self.url = url
        self.file = _HashingWriter(storage.open_write(url))
        meta = layout.meta("codes", {"codec": codec.name, "codec_hash": codec.checkpoint_hash})
        self.writer = pq.ParquetWriter(
            self.file, layout.CODES_SCHEMA.with_metadata(meta),
            compression={"codes": "NONE"} | {n: "ZSTD" for n in layout.CODES_SCHEMA.names if n != "codes"},
            use_dictionary=False, write_statistics=["file_id"], write_page_checksum=True)
        self.row_group_bytes = row_group_bytes
        self.buf: list[dict] = []
        self.buf_bytes = 0
        self.n_groups = 0
        self.where: dict[int, list[int]] = {}
        self.rows = 0
        self.sha256 = ""
        self.bytes = 0

    def add(self, row: dict) -> None:
        """``row``: file_id, seq, frame_start, n_frames, channels, n_q, codes (bytes), gains (bytes or None)."""
        row = dict(row)
        row["gains"] = row.get("gains") or None
        row["crc32c"] = row_checksum(row["file_id"], row["seq"], row["frame_start"], row["n_frames"],
                                     row["channels"], row["n_q"], row["codes"], row["gains"])
        self.buf.append(row)
        self.buf_bytes += len(row["codes"]) + len(row["gains"] or b"")
        if self.buf_bytes >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        self.writer.write_table(pa.Table.from_pylist(self.buf, schema=layout.CODES_SCHEMA),
                                row_group_size=len(self.buf))
        for fid in {r["file_id"] for r in self.buf}:
            self.where.setdefault(fid, []).append(self.n_groups)
        self.n_groups += 1
        self.rows += len(self.buf)
        self.buf, self.buf_bytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.file.close()
        self.sha256, self.bytes = self.file.sha.hexdigest(), self.file.n


def damaged(entry: ManifestEntry, shard: str, what: str) -> IntegrityError:
    return IntegrityError(
        f"{entry.relpath or entry.source}: cannot be restored: {what} (shard {shard}); the archive is damaged there. "
        f"`audioarc verify ARCHIVE` lists every damaged object and the files it affects; copy the shard back "
        f"from a replica or backup, or re-encode the file from its original")


def _open_shard(url: str, entry: ManifestEntry, shard: str, expect_bytes: int | None):
    try:
        f = storage.open_read(url, **storage.RANGE_READ)
    except StorageError:
        raise damaged(entry, shard, "the shard is missing") from None
    size = getattr(f, "size", None)
    if size is None:
        try:
            size = storage.size(url)
        except StorageError:
            size = None
    if expect_bytes is not None and size is not None and int(size) != expect_bytes:
        f.close()
        raise damaged(entry, shard, f"the shard is {size} bytes, {expect_bytes} were committed (truncated or replaced)")
    return f


def read_file_windows(dest: str, entry: ManifestEntry, codec: CodecRecord
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield ``(frame_start, codes [C, K, F] int64, gains [C, segments] float32 or None)`` of ``entry``'s
    windows in order, reading only its row groups, every check on the way (page CRCs, row CRC-32C, shard
    size as committed, every window present). Raises IntegrityError naming the file and the shard."""
    bits = bits_for(codec.codebook_size)
    by_shard: dict[str, list[int]] = {}
    expect: dict[str, int | None] = {}
    for loc in entry.locations:
        by_shard.setdefault(loc.shard, []).append(loc.row_group)
        expect[loc.shard] = loc.shard_bytes
    rows: dict[int, tuple] = {}
    exit_gc()
    for shard, groups in by_shard.items():
        url = storage.join(dest, shard)
        f = _open_shard(url, entry, shard, expect[shard])
        try:
            with f:
                pf = pq.ParquetFile(f, page_checksum_verification=True)
                major = layout.check_parquet_meta(pf.schema_arrow, url)
                if max(groups) >= pf.num_row_groups:
                    raise damaged(entry, shard, f"row group {max(groups)} is not in the shard "
                                                f"({pf.num_row_groups} row groups)")
                t = pf.read_row_groups(sorted(set(groups)))
        except ArchiveFormatError:
            raise
        except (OSError, pa.ArrowException, ValueError) as e:
            raise damaged(entry, shard, f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None
        t = t.filter(pc.equal(t["file_id"], entry.file_id))
        check = major >= 2
        for r in t.to_pylist():
            g = r.get("gains")  # absent from 1.0 shards
            if check and r.get("crc32c") != row_checksum(r["file_id"], r["seq"], r["frame_start"], r["n_frames"],
                                                         r["channels"], r["n_q"], r["codes"] or b"", g):
                raise damaged(entry, shard, f"code window {r['seq']} fails its checksum")
            if r["seq"] in rows:  # a retried task may have written a window twice: identical, keep one
                continue
            shape = (r["channels"], r["n_q"], r["n_frames"])
            try:
                codes = unpack_codes(r["codes"], shape, bits)
                gains = None if g is None else unpack_gains(g, r["channels"])
            except ArchiveFormatError as e:
                raise damaged(entry, shard, f"code window {r['seq']}: {e}") from None
            rows[r["seq"]] = (r["frame_start"], codes, gains)
    if sorted(rows) != list(range(entry.n_windows)):
        missing = sorted(set(range(entry.n_windows)) - set(rows))
        raise IntegrityError(f"{entry.relpath or entry.source}: cannot be restored: the archive is missing its "
                             f"code windows {missing[:10]} (of {entry.n_windows}); the archive is damaged. "
                             f"`audioarc verify ARCHIVE` lists every damaged object")
    for seq in range(entry.n_windows):
        yield rows[seq]


def read_file_codes(dest: str, entry: ManifestEntry, codec: CodecRecord) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_start, codes [C, K, F])`` of ``entry``'s windows in order (see ``read_file_windows``)."""
    for frame_start, codes, _ in read_file_windows(dest, entry, codec):
        yield frame_start, codes
