"""Typed manifest records: one ``ManifestEntry`` per input, and the archive's commit record."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

ARCHIVED = "archived"
FAILED = "failed"


@dataclass(frozen=True)
class Location:
    """Codes of a file live in these row groups of this shard (path relative to the archive root)."""

    shard: str
    row_group: int


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

    def to_row(self) -> dict:
        d = asdict(self)
        d["locations"] = [asdict(loc) for loc in self.locations]
        return d

    @staticmethod
    def from_row(row: dict) -> "ManifestEntry":
        row = dict(row)
        row["locations"] = tuple(Location(**loc) for loc in (row.get("locations") or []))
        return ManifestEntry(**row)


@dataclass(frozen=True)
class CodecRecord:
    name: str
    version: str
    checkpoint_hash: str
    sample_rate: int
    hop_length: int
    codebook_size: int
    n_q: int  # stages stored in this archive
    kbps_per_channel: float


@dataclass(frozen=True)
class ArchiveRecord:
    """Contents of ``archive.json``: the commit point. Readers see exactly the generations it lists."""

    format: str
    format_version: str
    codec: CodecRecord
    generations: tuple[int, ...]
    created_at: str
    updated_at: str
