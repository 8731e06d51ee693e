"""Restore and listing: select manifest entries, read only their row groups, decode, write audio files."""
from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

import numpy as np

from . import archive, audio, storage
from .codec import registry
from .codec.windows import Joiner
from .errors import ArchiveFormatError, ConfigError
from .manifest import ARCHIVED, ArchiveRecord, ManifestEntry


@dataclass(frozen=True)
class RestoreConfig:
    dest: str  # archive root
    out: str  # output folder URL
    patterns: tuple[str, ...] = ()
    format: str = "flac"
    codec_weights: str | None = None
    address: str | None = None
    parallel_threshold: int = 4  # more files than this restore as Ray tasks

    def validate(self) -> "RestoreConfig":
        if self.format not in audio.FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(audio.FORMATS)}, got {self.format!r}")
        return self


def open_archive(dest: str) -> tuple[ArchiveRecord, dict[str, ManifestEntry]]:
    rec = archive.require_record(dest)
    return rec, archive.read_manifest(dest, rec)


def select(entries: dict[str, ManifestEntry], patterns: tuple[str, ...]) -> list[ManifestEntry]:
    """Archived entries whose relpath or source URI matches any glob pattern (all if no pattern)."""
    chosen = []
    for e in sorted(entries.values(), key=lambda e: e.relpath):
        if e.status != ARCHIVED:
            continue
        if not patterns or any(fnmatch.fnmatchcase(e.relpath, p) or fnmatch.fnmatchcase(e.source, p)
                               or fnmatch.fnmatchcase(posixpath.basename(e.relpath), p) for p in patterns):
            chosen.append(e)
    return chosen


def output_path(out: str, entry: ManifestEntry, fmt: str) -> str:
    stem, _ = posixpath.splitext(entry.relpath)
    return storage.join(out, f"{stem}.{fmt}")


def restore_entry(dest: str, rec: ArchiveRecord, entry: ManifestEntry, out_url: str, fmt: str,
                  weights: str | None = None, codec=None) -> str:
    """Decode one file back to its original rate, channels and exact frame count; returns the path."""
    if codec is None:
        codec = registry.load_for(rec.codec, weights)
        archive.check_codec(rec.codec, codec, dest)
    joiner = Joiner(codec, entry.codec_samples, channels=entry.channels)
    res = audio.Resampler(codec.sample_rate, entry.sample_rate, entry.channels)
    written = 0
    partial = out_url + ".partial"  # renamed into place only when complete
    with storage.open_write(partial) as raw, audio.open_writer(raw, entry.sample_rate, entry.channels, fmt) as w:
        def emit(block: np.ndarray) -> None:
            nonlocal written
            block = block[:, : entry.frames - written]
            if block.shape[1]:
                w.write(np.clip(block, -1.0, 1.0).T)
                written += block.shape[1]

        for _, codes, gains in archive.read_file_windows(dest, entry, rec.codec):
            for block in joiner.feed(codes, gains):
                emit(res.process(block))
        for block in joiner.finish():
            emit(res.process(block))
        emit(res.flush())
        if written < entry.frames:  # the resampler's last few samples: pad to the exact frame count
            emit(np.zeros((entry.channels, entry.frames - written), np.float32))
    storage.move(partial, out_url)
    return out_url


def _restore_many(dest, rec, entries, out, fmt, weights) -> list[dict]:
    codec = registry.load_for(rec.codec, weights)
    archive.check_codec(rec.codec, codec, dest)
    return [{"source": e.source, "path": restore_entry(dest, rec, e, output_path(out, e, fmt), fmt, codec=codec)}
            for e in entries]


def run_restore(cfg: RestoreConfig) -> list[dict]:
    """Restore the selected files; returns ``[{"source", "path"}]``. Raises if nothing matches."""
    cfg.validate()
    rec, entries = open_archive(cfg.dest)
    chosen = select(entries, cfg.patterns)
    if not chosen:
        what = f"matching {' '.join(cfg.patterns)}" if cfg.patterns else "archived"
        raise ArchiveFormatError(f"{cfg.dest}: no files {what}; `audioarc ls {cfg.dest}` lists the archive")
    codec = registry.load_for(rec.codec, cfg.codec_weights)
    archive.check_codec(rec.codec, codec, cfg.dest)  # fail fast, before any worker starts
    if len(chosen) <= cfg.parallel_threshold:
        return _restore_many(cfg.dest, rec, chosen, cfg.out, cfg.format, cfg.codec_weights)
    from .encode import init_ray
    init_ray(cfg.address)
    import ray
    task = ray.remote(num_cpus=1)(_restore_many)
    n = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunks = [chosen[i::n] for i in range(n)]
    results = ray.get([task.remote(cfg.dest, rec, c, cfg.out, cfg.format, cfg.codec_weights) for c in chunks if c])
    return sorted((r for rs in results for r in rs), key=lambda r: r["source"])


def listing(dest: str) -> list[dict]:
    """One dict per input of the archive (``audioarc ls``)."""
    _, entries = open_archive(dest)
    return [{"source": e.source, "relpath": e.relpath, "status": e.status, "reason": e.reason,
             "duration_s": round(e.duration_s, 3), "sample_rate": e.sample_rate, "channels": e.channels,
             "frames": e.frames, "bytes": e.size, "archive_bytes": e.archive_bytes,
             "content_hash": e.content_hash, "generation": e.generation}
            for e in sorted(entries.values(), key=lambda e: e.relpath)]


def inspect(dest: str) -> dict:
    """Archive summary (``audioarc inspect``)."""
    rec, entries = open_archive(dest)
    ok = [e for e in entries.values() if e.status == ARCHIVED]
    failed = [e for e in entries.values() if e.status != ARCHIVED]
    secs = sum(e.duration_s for e in ok)
    arc = sum(e.archive_bytes for e in ok)
    src = sum(e.size for e in ok)
    return {
        "archive": dest, "format": rec.format, "format_version": rec.format_version,
        "codec": {"name": rec.codec.name, "version": rec.codec.version,
                  "checkpoint_hash": rec.codec.checkpoint_hash, "n_q": rec.codec.n_q},
        "bitrate_kbps": rec.codec.kbps_per_channel,
        "effective_kbps": round(arc * 8 / secs / 1000, 4) if secs else 0.0,
        "files": len(entries), "files_archived": len(ok), "files_failed": len(failed),
        "hours": round(secs / 3600, 4), "source_bytes": src, "archive_bytes": arc,
        "compression_ratio": round(src / arc, 2) if arc else 0.0,
        "generations": len(rec.generations), "created_at": rec.created_at, "updated_at": rec.updated_at,
        "failures": [{"source": e.source, "reason": e.reason} for e in failed],
    }


def codecs_table() -> list[dict]:
    """One row per registered codec (``audioarc codecs``). Codecs that ship no weights are described
    from their architecture and marked ``needs_weights`` (pass ``--codec-weights PATH``)."""
    out = []
    for name in registry.names():
        s = registry.spec(name)
        row = {"name": name, "description": s.description, "needs_weights": s.needs_weights}
        try:
            c = s.factory() if s.needs_weights else registry.load(name)
            row.update(sample_rate=c.sample_rate, channels=c.channels, frame_rate=c.frame_rate,
                       codebook_size=c.codebook_size, n_q=c.n_q,
                       checkpoint_hash=None if s.needs_weights else c.checkpoint_hash(),
                       bitrates_kbps=sorted(c.ladder()), default=name == registry.DEFAULT_CODEC)
            if s.needs_weights:
                row["weights"] = s.weights_hint
        except Exception as e:  # noqa: BLE001 - a codec that cannot be built is listed as unavailable
            row["unavailable"] = str(e)
        out.append(row)
    return out
