"""Restore: select catalog entries, read only their row groups (checked), decode, write audio files inside OUT."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import archive, audio, storage
from .errors import ArchiveFormatError, ConfigError, IntegrityError
from .manifest import ArchiveRecord, ManifestEntry
from .archive import prefix_stages
from .select import UnsafePathError, output_path


@dataclass(frozen=True)
class RestoreConfig:
    dest: str  # archive root
    out: str  # output folder URL
    patterns: tuple[str, ...] = ()
    format: str = "flac"
    codec_weights: str | None = None
    address: str | None = None
    parallel_threshold: int = 4  # more files than this restore as Ray tasks
    from_list: str | None = None  # a file (path or URL) of relpaths or source URIs, one per line
    bitrate_kbps: float | None = None  # decode only the first stages (a prefix rate at or below the archive's)

    def validate(self) -> "RestoreConfig":
        if self.format not in audio.FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(audio.FORMATS)}, got {self.format!r}")
        if storage.is_local(self.out):
            p = storage.local_path(self.out)
            import os
            probe = p
            while probe and not os.path.exists(probe):
                probe = os.path.dirname(probe.rstrip("/"))
            if probe and not os.path.isdir(probe):
                raise ConfigError(f"{probe}: the output folder's path runs through a file, not a folder; "
                                  f"choose another OUT")
        return self


@dataclass
class RestoreResult:
    restored: list[dict] = field(default_factory=list)  # {"source", "path"}
    refused: list[dict] = field(default_factory=list)  # {"source", "relpath", "reason"}: damaged or unsafe


def open_archive(dest: str) -> tuple[ArchiveRecord, dict[str, ManifestEntry]]:
    return archive.open_archive(dest)


def restore_entry(dest: str, rec: ArchiveRecord, entry: ManifestEntry, out_url: str, fmt: str,
                  weights: str | None = None, codec=None, n_q: int | None = None) -> str:
    """Decode one file back to its original rate, channels and exact frame count; returns the path. Nothing is
    left at ``out_url`` unless the whole file decoded from checked codes. ``n_q``: decode only the first
    ``n_q`` stages (a lower rung; ``prefix_stages``)."""
    from .codec.windows import Joiner  # torch: not imported for `ls` / `inspect`
    if codec is None:
        codec = archive.load_codec(dest, rec, weights)
    joiner = Joiner(codec, entry.codec_samples, channels=entry.channels)
    res = audio.Resampler(codec.sample_rate, entry.sample_rate, entry.channels)
    written = 0
    partial = out_url + ".partial"  # renamed into place only when complete
    ok = False
    try:
        with storage.open_write(partial) as raw, audio.open_writer(raw, entry.sample_rate, entry.channels, fmt) as w:
            def emit(block: np.ndarray) -> None:
                nonlocal written
                block = block[:, : entry.frames - written]
                if block.shape[1]:
                    w.write(np.clip(block, -1.0, 1.0).T)
                    written += block.shape[1]

            for _, codes, gains in archive.read_file_windows(dest, entry, rec.codec):
                for block in joiner.feed(codes if n_q is None else codes[:, :n_q], gains):
                    emit(res.process(block))
            for block in joiner.finish():
                emit(res.process(block))
            emit(res.flush())
            if written < entry.frames:  # the resampler's last few samples: pad to the exact frame count
                emit(np.zeros((entry.channels, entry.frames - written), np.float32))
        ok = True
    finally:
        if not ok:
            storage.remove(partial)
    storage.move(partial, out_url)
    return out_url


def _restore_many(dest, rec, entries, out, fmt, weights, n_q=None, codec=None) -> tuple[list[dict], list[dict]]:
    if codec is None:  # (a Ray task loads its own)
        codec = archive.load_codec(dest, rec, weights).for_decoding(n_q or rec.codec.n_q)
    done, refused = [], []
    for e in entries:
        try:
            done.append({"source": e.source, "path": restore_entry(dest, rec, e, output_path(out, e, fmt), fmt,
                                                                   codec=codec, n_q=n_q)})
        except (IntegrityError, UnsafePathError) as err:
            refused.append({"source": e.source, "relpath": e.relpath, "reason": str(err)})
    return done, refused


LIST_CHUNK = 50_000


def choose(arc: "archive.Archive", patterns: tuple[str, ...], from_list: str | None = None) -> list[ManifestEntry]:
    """Archived entries matching ``patterns`` and/or named in ``from_list`` (streamed in chunks, each a bounded
    catalog lookup), by relpath. Neither: every archived entry."""
    if not from_list:
        return [e for e in arc.matching(patterns) if e.status == "archived"]
    import io
    chosen: dict[str, ManifestEntry] = {}
    if patterns:
        chosen.update((e.source, e) for e in arc.matching(patterns) if e.status == "archived")

    def flush(names: list[str]) -> None:
        uris = [n for n in names if "://" in n or n.startswith("/")]
        rels = [n for n in names if n not in set(uris)]
        found = list(arc.by_sources(uris).values()) if uris else []
        found += arc.by_relpaths(rels) if rels else []
        chosen.update((e.source, e) for e in found if e.status == "archived")

    with storage.open_read(from_list) as raw:
        chunk: list[str] = []
        for line in io.TextIOWrapper(raw, encoding="utf-8"):
            name = line.strip()
            if name and not name.startswith("#"):
                chunk.append(name)
            if len(chunk) >= LIST_CHUNK:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
    return sorted(chosen.values(), key=lambda e: e.relpath)


def run_restore(cfg: RestoreConfig) -> RestoreResult:
    """Restore the selected files. Damaged or unsafe entries are refused (named in ``refused``), the rest
    restored. Raises if nothing matches or the codec cannot be loaded."""
    cfg.validate()
    from dataclasses import replace
    cfg = replace(cfg, dest=storage.absolute(cfg.dest), out=storage.absolute(cfg.out))  # workers run elsewhere
    rec = archive.require_record(cfg.dest)
    chosen = choose(archive.Archive(cfg.dest, rec), cfg.patterns, cfg.from_list)
    if not chosen:
        what = f"matching {' '.join(cfg.patterns)}" if cfg.patterns else "archived"
        raise ArchiveFormatError(f"{cfg.dest}: no files {what}; `audioarc ls {cfg.dest}` lists the archive")
    archive.catalog.release_memory()
    codec = archive.load_codec(cfg.dest, rec, cfg.codec_weights)  # fail fast, before any worker starts
    n_q = prefix_stages(codec, rec, cfg.bitrate_kbps)
    n_q = None if n_q == rec.codec.n_q else n_q
    if len(chosen) <= cfg.parallel_threshold:
        codec.for_decoding(n_q or rec.codec.n_q)  # the encoder and unused decoders are not kept
        from .runtime import heap_for_decoding
        heap_for_decoding()
        done, refused = _restore_many(cfg.dest, rec, chosen, cfg.out, cfg.format, cfg.codec_weights, n_q, codec)
        return RestoreResult(done, refused)
    del codec  # each task loads its own
    from .runtime import init_ray
    init_ray(cfg.address)
    import ray
    task = ray.remote(num_cpus=1)(_restore_many)
    n = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunks = [chosen[i::n] for i in range(n)]
    results = ray.get([task.remote(cfg.dest, rec, c, cfg.out, cfg.format, cfg.codec_weights, n_q)
                       for c in chunks if c])
    done = sorted((r for rs, _ in results for r in rs), key=lambda r: r["source"])
    refused = sorted((r for _, rf in results for r in rf), key=lambda r: r["source"])
    return RestoreResult(done, refused)


def _row(e: ManifestEntry) -> dict:
    return {"source": e.source, "relpath": e.relpath, "status": e.status, "reason": e.reason,
            "reason_code": e.reason_code,
            "duration_s": round(e.duration_s, 3), "sample_rate": e.sample_rate, "channels": e.channels,
            "frames": e.frames, "bytes": e.size, "archive_bytes": e.archive_bytes,
            "content_hash": e.content_hash, "generation": e.generation}


def iter_listing(dest: str, patterns: tuple[str, ...] = (), status: str | None = None):
    """One dict per input of the archive (``audioarc ls``), by relpath; ``patterns`` / ``status`` filter."""
    arc = archive.Archive(dest, archive.require_record(dest))
    if status == "failed" and not patterns:
        entries = sorted(arc.failures(limit=1 << 62), key=lambda e: e.relpath)
    else:
        entries = arc.matching(patterns) if patterns else arc.iter_latest()
    for e in entries:
        if status is None or e.status == status:
            yield _row(e)


def listing(dest: str, patterns: tuple[str, ...] = (), status: str | None = None) -> list[dict]:
    return list(iter_listing(dest, patterns, status))


def inspect(dest: str) -> dict:
    """Archive summary (``audioarc inspect``): totals kept at commit, failures by a filtered lookup."""
    rec = archive.require_record(dest)
    arc = archive.Archive(dest, rec)
    t = arc.totals()
    failed = arc.failures()
    secs, arc_bytes, src = t["seconds"], t["archive_bytes"], t["source_bytes"]
    updated = rec.updated_at
    if t.get("updated_at"):
        from datetime import datetime, timezone
        updated = datetime.fromtimestamp(t["updated_at"] / 1000, timezone.utc).isoformat(timespec="seconds")
    return {
        "archive": dest, "format": rec.format, "format_version": rec.format_version,
        "codec": {"name": rec.codec.name, "version": rec.codec.version,
                  "checkpoint_hash": rec.codec.checkpoint_hash, "n_q": rec.codec.n_q},
        "bitrate_kbps": rec.codec.kbps_per_channel,
        "effective_kbps": round(arc_bytes * 8 / secs / 1000, 4) if secs else 0.0,
        "files": t["files"], "files_archived": t["archived"], "files_failed": t["failed"],
        "hours": round(secs / 3600, 4), "source_bytes": src, "archive_bytes": arc_bytes,
        "compression_ratio": round(src / arc_bytes, 2) if arc_bytes else 0.0,
        "generations": t["generations"], "created_at": rec.created_at, "updated_at": updated,
        "weights": rec.weights.path if rec.weights else None,
        "failures": [{"source": e.source, "reason": e.reason} for e in sorted(failed, key=lambda e: e.relpath)],
    }

