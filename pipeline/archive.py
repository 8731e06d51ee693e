"""The archive's byte format: layout, Parquet schemas, code packing, version checks, commit protocol.

Layout of an archive root ``DEST``::

    archive.json                         commit record (format, version, codec, committed generations)
    manifest/g000001.parquet             manifest rows written by generation 1 (later ones override)
    shards/g000001/part-00000.parquet    code rows: one row per (file, window)
    _staging/g000002/...                 shards of a generation not yet committed (invisible to readers)

A generation's shards are written to ``_staging``, moved under ``shards/``, then its manifest is
written, then ``archive.json`` is replaced: a reader that starts from ``archive.json`` never sees a
half-written generation, and anything not reachable from it is garbage a later run removes.
"""
from __future__ import annotations

import atexit
import gc
import json
import math
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .errors import ArchiveFormatError, CodecMismatchError, StorageError
from .manifest import ArchiveRecord, CodecRecord, Location, ManifestEntry

FORMAT_NAME = "audioarc"
FORMAT_VERSION = "1.1"  # 1.1: optional ``gains`` column (1.0 archives read unchanged: no gains)
SUPPORTED_MAJOR = 1
COMMIT_FILE = "archive.json"
META_FORMAT = b"audioarc.format"
META_VERSION = b"audioarc.format_version"
META_KIND = b"audioarc.kind"

CODES_SCHEMA = pa.schema([
    ("file_id", pa.int64()),
    ("seq", pa.int32()),  # window index within the file
    ("frame_start", pa.int64()),
    ("n_frames", pa.int32()),
    ("channels", pa.int16()),
    ("n_q", pa.int16()),
    ("codes", pa.binary()),  # [channels, n_q, n_frames] indices, bit-packed big-endian, ceil(log2 K) bits
    # since 1.1, null unless the codec has side gains: [channels, n_segments] float16 little-endian, one
    # per segment of the window (EnCodec 48 kHz: the RMS each 1 s segment was normalised by)
    ("gains", pa.binary()),
])

MANIFEST_SCHEMA = pa.schema([
    ("source", pa.string()), ("relpath", pa.string()), ("file_id", pa.int64()), ("size", pa.int64()),
    ("content_hash", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("duration_s", pa.float64()), ("sample_rate", pa.int32()), ("channels", pa.int32()),
    ("frames", pa.int64()), ("codec_samples", pa.int64()), ("codec_frames", pa.int64()),
    ("n_windows", pa.int32()), ("archive_bytes", pa.int64()),
    ("locations", pa.list_(pa.struct([("shard", pa.string()), ("row_group", pa.int32())]))),
    ("generation", pa.int32()), ("encoded_at", pa.string()),
])

#: target bytes of codes per row group: restoring one file reads about this much plus the footer
#: (with 64 MiB shards, 256 KiB groups keep footer + group near their minimum, ~0.5 MB)
ROW_GROUP_BYTES = 256 << 10


_exit_gc_registered = False


def _exit_gc() -> None:
    """Register (once) a GC pass at exit, after whatever registered before the first Parquet read.

    With torch 2.13 and pyarrow 26 in one process, Arrow objects still alive in reference cycles
    at interpreter shutdown make the process abort ("terminate called without an active exception",
    exit 134). atexit runs handlers last-in first-out, so registering at the first read (after torch
    is imported) collects them before torch's own exit handlers run.
    """
    global _exit_gc_registered
    if not _exit_gc_registered:
        atexit.register(gc.collect)
        _exit_gc_registered = True


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _meta(kind: str, extra: dict | None = None) -> dict:
    m = {META_FORMAT: FORMAT_NAME.encode(), META_VERSION: FORMAT_VERSION.encode(), META_KIND: kind.encode()}
    for k, v in (extra or {}).items():
        m[f"audioarc.{k}".encode()] = str(v).encode()
    return m


def check_version(fmt: str | None, version: str | None, where: str) -> None:
    """Reject anything that is not an audioarc format of a major version this reader knows."""
    if fmt != FORMAT_NAME:
        raise ArchiveFormatError(f"{where}: not an audioarc archive (format {fmt!r})")
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ArchiveFormatError(f"{where}: unreadable format version {version!r}") from None
    if major != SUPPORTED_MAJOR:
        raise ArchiveFormatError(
            f"{where}: archive format version {version} is not supported by this audioarc "
            f"(reads {SUPPORTED_MAJOR}.x); upgrade audioarc to read it")


def check_parquet_meta(schema: pa.Schema, where: str) -> None:
    md = schema.metadata or {}
    check_version(md.get(META_FORMAT, b"").decode() or None, md.get(META_VERSION, b"").decode() or None, where)


# -- code packing ---------------------------------------------------------------------------------
def bits_for(codebook_size: int) -> int:
    return max(1, int(math.ceil(math.log2(codebook_size))))


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """``codes: [C, K, F]`` non-negative ints < 2**bits -> tightly bit-packed bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.uint32).ravel()
    if flat.size and int(flat.max()) >= (1 << bits):
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    b = ((flat[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(b.ravel()).tobytes()


def pack_gains(gains: np.ndarray) -> bytes:
    """``[C, n_segments]`` gains -> float16 little-endian bytes (the codec quantises them to float16
    before using them, so this is lossless)."""
    return np.ascontiguousarray(gains, dtype="<f2").tobytes()


def unpack_gains(data: bytes, channels: int) -> np.ndarray:
    g = np.frombuffer(data, dtype="<f2")
    if g.size % max(channels, 1):
        raise ArchiveFormatError(f"gains payload holds {g.size} values, not a multiple of {channels} channels")
    return g.astype(np.float32).reshape(channels, -1)


def unpack_codes(data: bytes, shape: tuple[int, int, int], bits: int) -> np.ndarray:
    n = shape[0] * shape[1] * shape[2]
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits]
    if b.size != n * bits:
        raise ArchiveFormatError(f"codes payload holds {b.size} bits, expected {n * bits}")
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return (b.reshape(n, bits).astype(np.int64) @ weights).reshape(shape)


# -- paths ----------------------------------------------------------------------------------------
def gen_name(gen: int) -> str:
    return f"g{gen:06d}"


def staging_dir(dest: str, gen: int) -> str:
    return storage.join(dest, "_staging", gen_name(gen))


def shard_relpath(gen: int, task_idx: int) -> str:
    return f"shards/{gen_name(gen)}/part-{task_idx:05d}.parquet"


def manifest_relpath(gen: int) -> str:
    return f"manifest/{gen_name(gen)}.parquet"


# -- shards ---------------------------------------------------------------------------------------
class ShardWriter:
    """Writes code rows into one shard; row groups close at ~ROW_GROUP_BYTES of codes.

    ``locations()`` tells, per file id, which row groups hold its rows.
    """

    def __init__(self, url: str, codec: CodecRecord, row_group_bytes: int = ROW_GROUP_BYTES):
        self.url = url
        self.file = storage.open_write(url)
        meta = _meta("codes", {"codec": codec.name, "codec_hash": codec.checkpoint_hash})
        self.writer = pq.ParquetWriter(
            self.file, CODES_SCHEMA.with_metadata(meta), compression={"codes": "NONE"} | {
                n: "ZSTD" for n in CODES_SCHEMA.names if n != "codes"},
            use_dictionary=False, write_statistics=["file_id"])
        self.row_group_bytes = row_group_bytes
        self.buf: list[dict] = []
        self.buf_bytes = 0
        self.n_groups = 0
        self.where: dict[int, list[int]] = {}
        self.rows = 0

    def add(self, row: dict) -> None:
        row.setdefault("gains", None)
        self.buf.append(row)
        self.buf_bytes += len(row["codes"]) + len(row["gains"] or b"")
        if self.buf_bytes >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        self.writer.write_table(pa.Table.from_pylist(self.buf, schema=CODES_SCHEMA), row_group_size=len(self.buf))
        for fid in {r["file_id"] for r in self.buf}:
            self.where.setdefault(fid, []).append(self.n_groups)
        self.n_groups += 1
        self.rows += len(self.buf)
        self.buf, self.buf_bytes = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.file.close()


def read_file_codes(dest: str, entry: ManifestEntry, codec: CodecRecord) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_start, codes [C, K, F])`` of ``entry``'s windows in order, reading only its row groups."""
    for frame_start, codes, _ in read_file_windows(dest, entry, codec):
        yield frame_start, codes


def read_file_windows(dest: str, entry: ManifestEntry, codec: CodecRecord
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield ``(frame_start, codes [C, K, F], gains [C, segments] or None)`` of ``entry``'s windows in
    order, reading only its row groups (gains: format 1.1 rows of side-gain codecs; None otherwise)."""
    bits = bits_for(codec.codebook_size)
    by_shard: dict[str, list[int]] = {}
    for loc in entry.locations:
        by_shard.setdefault(loc.shard, []).append(loc.row_group)
    rows: dict[int, tuple[int, np.ndarray]] = {}
    _exit_gc()
    for shard, groups in by_shard.items():
        url = storage.join(dest, shard)
        # small read-ahead blocks: an object store serves only the footer and these row groups' bytes
        with storage.open_read(url, **storage.RANGE_READ) as f:
            pf = pq.ParquetFile(f)
            check_parquet_meta(pf.schema_arrow, url)
            t = pf.read_row_groups(sorted(set(groups)))
        t = t.filter(pc.equal(t["file_id"], entry.file_id))
        for r in t.to_pylist():
            if r["seq"] in rows:  # a retried task may have written a window twice: identical, keep one
                continue
            shape = (r["channels"], r["n_q"], r["n_frames"])
            g = r.get("gains")  # absent from 1.0 shards
            rows[r["seq"]] = (r["frame_start"], unpack_codes(r["codes"], shape, bits),
                              None if g is None else unpack_gains(g, r["channels"]))
    if sorted(rows) != list(range(entry.n_windows)):
        missing = sorted(set(range(entry.n_windows)) - set(rows))
        raise ArchiveFormatError(f"{entry.source}: archive is missing code windows {missing[:10]} "
                                 f"(of {entry.n_windows}); the archive is damaged")
    for seq in range(entry.n_windows):
        yield rows[seq]


# -- manifest -------------------------------------------------------------------------------------
def write_manifest(url: str, entries: list[ManifestEntry], exclusive: bool = False) -> None:
    table = pa.Table.from_pylist([e.to_row() for e in entries], schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata(_meta("manifest"))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    try:
        storage.write_bytes(url, sink.getvalue().to_pybytes(), exclusive=exclusive)
    except FileExistsError:
        raise StorageError(f"{url}: manifest of this generation already exists; another encode job is "
                           f"writing to this archive (run one job per archive at a time)") from None


def read_manifest_file(url: str) -> list[ManifestEntry]:
    _exit_gc()
    with storage.open_read(url) as f:
        pf = pq.ParquetFile(f)
        check_parquet_meta(pf.schema_arrow, url)
        table = pf.read()
    return [ManifestEntry.from_row(r) for r in table.to_pylist()]


def read_manifest(dest: str, record: ArchiveRecord) -> dict[str, ManifestEntry]:
    """Merged manifest of the committed generations: source URI -> latest entry."""
    out: dict[str, ManifestEntry] = {}
    for gen in record.generations:
        for e in read_manifest_file(storage.join(dest, manifest_relpath(gen))):
            out[e.source] = e
    return out


# -- commit record --------------------------------------------------------------------------------
def read_record(dest: str) -> ArchiveRecord | None:
    url = storage.join(dest, COMMIT_FILE)
    if not storage.exists(url):
        return None
    try:
        d = json.loads(storage.read_bytes(url))
    except json.JSONDecodeError as e:
        raise ArchiveFormatError(f"{url}: commit record is not valid JSON ({e})") from None
    check_version(d.get("format"), d.get("format_version"), url)
    return ArchiveRecord(format=d["format"], format_version=d["format_version"], codec=CodecRecord(**d["codec"]),
                         generations=tuple(d["generations"]), created_at=d["created_at"],
                         updated_at=d["updated_at"])


def require_record(dest: str) -> ArchiveRecord:
    rec = read_record(dest)
    if rec is None:
        raise ArchiveFormatError(f"{dest}: no archive here ({COMMIT_FILE} not found); "
                                 f"create one with `audioarc encode SRC {dest}`")
    return rec


def write_record(dest: str, record: ArchiveRecord) -> None:
    d = asdict(record)
    d["generations"] = list(record.generations)
    storage.write_bytes(storage.join(dest, COMMIT_FILE), (json.dumps(d, indent=2) + "\n").encode())


def check_codec(record: CodecRecord, available, where: str) -> None:
    """Refuse to decode with a codec other than the archive's (name and checkpoint hash)."""
    if available.name != record.name or available.checkpoint_hash() != record.checkpoint_hash:
        raise CodecMismatchError(
            f"{where}: archive was made by codec {record.name!r} (checkpoint {record.checkpoint_hash}), "
            f"but the loaded codec is {available.name!r} (checkpoint {available.checkpoint_hash()}); "
            f"pass --codec {record.name} --codec-weights PATH with the checkpoint that made the archive")


def garbage(dest: str, record: ArchiveRecord | None) -> list[str]:
    """URLs under ``dest`` that the commit record does not reach (staging, orphan shards/manifests)."""
    live = set(record.generations) if record else set()
    out = list(storage.list_dir(storage.join(dest, "_staging")))
    for d in storage.list_dir(storage.join(dest, "shards")):
        if d.rstrip("/").rsplit("/", 1)[-1] not in {gen_name(g) for g in live}:
            out.append(d)
    for m in storage.list_dir(storage.join(dest, "manifest")):
        if m.rstrip("/").rsplit("/", 1)[-1] not in {gen_name(g) + ".parquet" for g in live}:
            out.append(m)
    return out
