"""Typed catalog records: one ``ManifestEntry`` per input and the archive's record (with the codec's ``CodecRecord``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .codec.identity import CodecRecord  # the codec's own record of itself, as the archive stores it

__all__ = ["ARCHIVED", "FAILED", "Location", "ManifestEntry", "CodecRecord", "WeightsRef", "ArchiveRecord"]

ARCHIVED = "archived"
FAILED = "failed"


@dataclass(frozen=True)
class Location:
    """Codes of a file live in these row groups of this shard (path relative to the archive root).

    Since format 2.0 each location also names the whole shard's size and sha256 as committed, so a reader
    can check the object it opens (format 1.x: None)."""

    shard: str
    row_group: int
    shard_bytes: int | None = None
    shard_sha256: str | None = None


@dataclass(frozen=True)
class ManifestEntry:
    source: str  # full URI of the input
    relpath: str  # path below the source root; restore recreates it
    file_id: int  # stable 64-bit id of ``source``
    size: int  # bytes of the source object
    content_hash: str  # sha256 of the source bytes
    status: str  # ARCHIVED or FAILED
    reason: str = ""  # why it failed (empty when archived)
    duration_s: float = 0.0
    sample_rate: int = 0
    channels: int = 0
    frames: int = 0  # exact frame count at the source rate
    codec_samples: int = 0  # samples at the codec's rate (decoded length before resampling back)
    codec_frames: int = 0  # code frames per channel
    n_windows: int = 0
    archive_bytes: int = 0  # bytes of the shards attributable to this file (codes + its share of overhead)
    locations: tuple[Location, ...] = field(default_factory=tuple)
    generation: int = 0
    encoded_at: str = ""
    source_version: str = ""  # since 2.0: the listing's ETag / mtime of the source when it was read
    reason_code: str = ""  # since 2.0: machine-readable failure kind (empty when archived)

    def to_row(self) -> dict:
        d = asdict(self)
        d["locations"] = [asdict(loc) for loc in self.locations]
        return d

    @staticmethod
    def from_row(row: dict) -> "ManifestEntry":
        row = {k: v for k, v in row.items() if k in _ENTRY_FIELDS}
        row["locations"] = tuple(Location(**loc) for loc in (row.get("locations") or []))
        for k in ("source_version", "reason_code", "reason"):
            if row.get(k) is None:
                row[k] = ""
        return ManifestEntry(**row)


@dataclass(frozen=True)
class WeightsRef:
    """The codec weights an archive carries (format 2.0): ``weights/<checkpoint hash>.safetensors``."""

    path: str  # relative to the archive root
    sha256: str  # of the file's bytes
    bytes: int


@dataclass(frozen=True)
class ArchiveRecord:
    """An archive's identity (``archive.json``) and, as read, its committed generations.

    Format 1.x: ``archive.json`` is the commit point and lists the generations. Format 2.0: it is written
    once when the archive is created; the catalog's commit log says which generations are committed."""

    format: str
    format_version: str
    codec: CodecRecord
    generations: tuple[int, ...]
    created_at: str
    updated_at: str
    weights: WeightsRef | None = None

    @property
    def major(self) -> int:
        return int(self.format_version.split(".")[0])


_ENTRY_FIELDS = frozenset(ManifestEntry.__dataclass_fields__)
