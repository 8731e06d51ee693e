"""Where everything lives in an archive, what each Parquet file is, and which format versions this reader knows.

Format 2.0 (the one this version writes; the one place that documents it, with README's summary)::

    archive.json                          identity, written once (exclusive create) when the archive is made:
                                          format, format_version, codec (name, version, checkpoint hash,
                                          stages, ...), weights (path, sha256, bytes), created_at
    weights/<checkpoint hash>.safetensors the exact codec weights the archive was made with (safetensors,
                                          hash-checked before use)
    catalog/                              Delta Lake table, the commit log: one row per (input, generation);
                                          a newer archived row of a source supersedes older ones
    shards/gNNNNNN/part-NNNNN.parquet     code rows of generation N: one row per (file, window) with a CRC-32C
                                          of the row; Parquet page checksums; the shard's sha256 and size are
                                          recorded in the catalog rows that point at it
    _gens/gNNNNNN.json                    generation N claimed by a job (exclusive create: numbers never repeat)
    _jobs/<job id>.json                   lease of a running job (heartbeat); garbage collection never removes
                                          what a live job has claimed
    reports/, quality/                    job summaries and quality reports

A generation is committed when its rows are in the catalog (one Delta transaction); its shards are written
before, under a number no other job can hold, so a killed or concurrent job can never damage what another
committed. Format 1.x (``archive.json`` listing the generations, ``manifest/gNNNNNN.parquet``) is read by
``legacy``.
"""
from __future__ import annotations

import pyarrow as pa

from ..errors import ArchiveFormatError

FORMAT_NAME = "audioarc"
FORMAT_VERSION = "2.0"
SUPPORTED_MAJORS = (1, 2)
RECORD_FILE = "archive.json"
CATALOG_DIR = "catalog"
WEIGHTS_DIR = "weights"
GENS_DIR = "_gens"
LEASES_DIR = "_jobs"
SHARDS_DIR = "shards"

META_FORMAT = b"audioarc.format"
META_VERSION = b"audioarc.format_version"
META_KIND = b"audioarc.kind"

#: target bytes of codes per row group: restoring one file reads about this much plus the footer
ROW_GROUP_BYTES = 256 << 10

CODES_SCHEMA = pa.schema([
    ("file_id", pa.int64()),
    ("seq", pa.int32()),  # window index within the file
    ("frame_start", pa.int64()),
    ("n_frames", pa.int32()),
    ("channels", pa.int16()),  # code streams
    ("n_q", pa.int16()),
    ("codes", pa.binary()),  # [channels, n_q, n_frames] indices, bit-packed big-endian, ceil(log2 K) bits
    # null unless the codec has side gains: [channels, n_segments] float16 little-endian
    ("gains", pa.binary()),
    ("crc32c", pa.int64()),  # 2.0: CRC-32C of the row (codes.row_checksum)
])

LOCATION_TYPE = pa.struct([("shard", pa.string()), ("row_group", pa.int32()), ("shard_bytes", pa.int64()),
                           ("shard_sha256", pa.string())])

CATALOG_SCHEMA = pa.schema([
    ("source", pa.string()), ("relpath", pa.string()), ("file_id", pa.int64()), ("size", pa.int64()),
    ("content_hash", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("duration_s", pa.float64()), ("sample_rate", pa.int32()), ("channels", pa.int32()),
    ("frames", pa.int64()), ("codec_samples", pa.int64()), ("codec_frames", pa.int64()),
    ("n_windows", pa.int32()), ("archive_bytes", pa.int64()),
    ("locations", pa.list_(LOCATION_TYPE)),
    ("generation", pa.int32()), ("encoded_at", pa.string()),
    ("source_version", pa.string()), ("reason_code", pa.string()),
])


def gen_name(gen: int) -> str:
    return f"g{gen:06d}"


def gen_of(name: str) -> int | None:
    """``g000012`` (or ``g000012.json``) -> 12; None for anything else."""
    stem = name.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    if len(stem) >= 2 and stem[0] == "g" and stem[1:].isdigit():
        return int(stem[1:])
    return None


def shard_relpath(gen: int, task_idx: int) -> str:
    return f"{SHARDS_DIR}/{gen_name(gen)}/part-{task_idx:05d}.parquet"


def weights_relpath(checkpoint_hash: str) -> str:
    return f"{WEIGHTS_DIR}/{checkpoint_hash}.safetensors"


def meta(kind: str, extra: dict | None = None) -> dict:
    m = {META_FORMAT: FORMAT_NAME.encode(), META_VERSION: FORMAT_VERSION.encode(), META_KIND: kind.encode()}
    for k, v in (extra or {}).items():
        m[f"audioarc.{k}".encode()] = str(v).encode()
    return m


def major_of(version: str | None, where: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ArchiveFormatError(f"{where}: unreadable format version {version!r}") from None


def check_version(fmt: str | None, version: str | None, where: str) -> int:
    """Reject anything that is not an audioarc format of a major version this reader knows; returns the major."""
    if fmt != FORMAT_NAME:
        raise ArchiveFormatError(f"{where}: not an audioarc archive (format {fmt!r})")
    major = major_of(version, where)
    if major not in SUPPORTED_MAJORS:
        raise ArchiveFormatError(
            f"{where}: archive format version {version} is not supported by this audioarc "
            f"(reads {', '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}); upgrade audioarc to read it")
    return major


def check_parquet_meta(schema: pa.Schema, where: str) -> int:
    md = schema.metadata or {}
    return check_version(md.get(META_FORMAT, b"").decode() or None, md.get(META_VERSION, b"").decode() or None, where)
