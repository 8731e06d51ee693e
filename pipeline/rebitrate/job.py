"""The rebitrate job: ``run_rebitrate`` copies the first stages of files' code rows into a new archive."""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace

from .. import archive, storage
from ..errors import ConfigError, IntegrityError
from ..manifest import ARCHIVED, FAILED, Location, ManifestEntry
from ..select import select
from .config import RebitrateConfig


class _Generation:
    """The shards of one generation being written: rolls to a new shard between files at ~``shard_bytes``."""

    def __init__(self, dest: str, gen: int, crec, shard_bytes: int):
        self.dest, self.gen, self.crec, self.shard_bytes = dest, gen, crec, shard_bytes
        self.shards: list[tuple[str, archive.ShardWriter, dict[int, int]]] = []  # (relpath, writer, fid -> bytes)
        self.cur_bytes = 0

    def writer(self) -> tuple[archive.ShardWriter, dict[int, int]]:
        if not self.shards or self.cur_bytes >= self.shard_bytes:
            if self.shards:
                self.shards[-1][1].close()
            rel = archive.shard_relpath(self.gen, len(self.shards))
            self.shards.append((rel, archive.ShardWriter(storage.join(self.dest, rel), self.crec), {}))
            self.cur_bytes = 0
        return self.shards[-1][1], self.shards[-1][2]

    def close(self) -> dict[int, tuple[list[Location], int]]:
        """Close the last shard; file id -> (its locations, its share of the shard bytes)."""
        if self.shards:
            self.shards[-1][1].close()
        out: dict[int, tuple[list[Location], int]] = {}
        for rel, w, nbytes in self.shards:
            total = sum(nbytes.values()) or 1
            for fid, groups in w.where.items():
                locs, b = out.get(fid, ([], 0))
                locs = locs + [Location(rel, g, w.bytes, w.sha256) for g in groups]
                out[fid] = (locs, b + int(round(w.bytes * nbytes.get(fid, 0) / total)))
        return out


def _copy_file(src_dest: str, src_codec, entry: ManifestEntry, k: int, bits: int, gen: _Generation) -> None:
    """Every window of ``entry``, its first ``k`` stages, into the generation's current shard. Reads (and checks)
    the whole file before writing a row, so a damaged file leaves nothing behind."""
    rows = []
    for seq, (frame_start, codes, gains) in enumerate(archive.read_file_windows(src_dest, entry, src_codec)):
        c = codes[:, :k]
        rows.append({"file_id": entry.file_id, "seq": seq, "frame_start": int(frame_start),
                     "n_frames": int(c.shape[2]), "channels": int(c.shape[0]), "n_q": k,
                     "codes": archive.pack_codes(c, bits),
                     "gains": None if gains is None else archive.pack_gains(gains)})
    w, nbytes = gen.writer()
    for r in rows:
        w.add(r)
        n = len(r["codes"]) + len(r["gains"] or b"")
        nbytes[entry.file_id] = nbytes.get(entry.file_id, 0) + n
        gen.cur_bytes += n


def run_rebitrate(cfg: RebitrateConfig) -> dict:
    """Copy the selected archived files of ``cfg.dest`` into ``cfg.new_dest`` at ``cfg.bitrate_kbps``; returns the
    summary (``--json``). A file that cannot be read from DEST (damaged) is recorded as failed in NEW_DEST."""
    cfg = cfg.validate()
    cfg = replace(cfg, dest=storage.absolute(cfg.dest), new_dest=storage.absolute(cfg.new_dest))
    t0 = time.time()
    rec, entries = archive.open_archive(cfg.dest)
    chosen = select(entries, cfg.patterns)
    if not chosen:
        what = f"matching {' '.join(cfg.patterns)}" if cfg.patterns else "archived"
        raise ConfigError(f"{cfg.dest}: no files {what}; `audioarc ls {cfg.dest}` lists the archive")
    codec = archive.load_codec(cfg.dest, rec, cfg.codec_weights)
    k = archive.prefix_stages(codec, rec, cfg.bitrate_kbps)
    storage.check_bucket(cfg.new_dest)
    new_rec = archive.create_or_open(cfg.new_dest, codec, k)
    crec = new_rec.codec
    bits = archive.bits_for(crec.codebook_size)
    current = archive.Archive(cfg.new_dest, new_rec)
    job_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
    written: list[ManifestEntry] = []
    kept: list[ManifestEntry] = []  # already in NEW_DEST with the same content: skipped
    copy_s = 0.0  # reading, writing and committing (without opening the archives and loading the codec)
    lease = archive.Lease(cfg.new_dest, job_id, command="rebitrate")
    try:
        archive.collect_garbage(cfg.new_dest)  # what killed jobs left (never what a live job holds)
        last_gen = max([*current.generations(), archive.commit.highest_claimed(cfg.new_dest)], default=0)
        for i in range(0, len(chosen), cfg.commit_every):
            have = current.by_sources([e.source for e in chosen[i:i + cfg.commit_every]])
            wave = []
            for e in chosen[i:i + cfg.commit_every]:
                old = have.get(e.source)
                if old is not None and old.status == ARCHIVED and old.content_hash == e.content_hash:
                    kept.append(old)
                else:
                    wave.append(e)
            if not wave:
                continue
            tw = time.time()
            gen = last_gen = archive.claim_generation(cfg.new_dest, job_id, last_gen)
            g = _Generation(cfg.new_dest, gen, crec, int(cfg.shard_mb * (1 << 20)))
            failed: dict[str, str] = {}
            for e in wave:
                try:
                    _copy_file(cfg.dest, rec.codec, e, k, bits, g)
                except IntegrityError as err:
                    failed[e.source] = str(err)
            where = g.close()
            stamp = archive.now()
            new_entries = []
            for e in wave:
                if e.source in failed:
                    new_entries.append(replace(e, status=FAILED, reason=f"could not be read from {cfg.dest}: "
                                               f"{failed[e.source]}", reason_code="damaged", archive_bytes=0,
                                               locations=(), generation=gen, encoded_at=stamp))
                    continue
                locs, nbytes = where.get(e.file_id, ([], 0))
                new_entries.append(replace(e, archive_bytes=nbytes, generation=gen, encoded_at=stamp,
                                           locations=tuple(sorted(set(locs), key=lambda x: (x.shard, x.row_group)))))
            totals = archive.catalog.Totals(have)  # what this generation changes in NEW_DEST's kept totals
            for e in new_entries:
                totals.add(e)
            archive.commit_generation(cfg.new_dest, lease, gen, new_entries, totals=totals.sum)
            written += new_entries
            copy_s += time.time() - tw
    finally:
        try:
            archive.collect_garbage(cfg.new_dest, own_job=job_id)  # this job's uncommitted shards, if it failed
        finally:
            lease.release()
    wall = time.time() - t0
    ok = [e for e in written if e.status == ARCHIVED]
    secs = sum(e.duration_s for e in ok)
    summary = {
        "archive": cfg.new_dest, "source_archive": cfg.dest, "job_id": job_id,
        "bitrate_kbps": crec.kbps_per_channel, "n_q": k,
        "source_bitrate_kbps": rec.codec.kbps_per_channel, "source_n_q": rec.codec.n_q,
        "files_total": len(chosen), "files_rebitrated": len(ok), "files_skipped": len(kept),
        "files_failed": len(written) - len(ok),
        "audio_seconds": round(secs, 3),
        # the selected files: their bytes in DEST, and in NEW_DEST (those it held already included)
        "bytes_before": sum(e.archive_bytes for e in chosen),
        "bytes_after": sum(e.archive_bytes for e in ok + kept),
        "bytes_written": sum(e.archive_bytes for e in ok),
        "wall_seconds": round(wall, 3),
        "x_realtime": round(secs / wall, 1) if wall > 0 else 0.0,
        "copy_seconds": round(copy_s, 3),
        "copy_x_realtime": round(secs / copy_s, 1) if copy_s > 0 else 0.0,
        "files_per_s": round(len(ok) / wall, 2) if wall > 0 else 0.0,
        "failures": [{"source": e.source, "reason": e.reason} for e in written if e.status != ARCHIVED],
    }
    summary["report"] = storage.join(cfg.new_dest, "reports", f"rebitrate-{job_id}.json")
    storage.write_bytes(summary["report"], (json.dumps(summary, indent=2) + "\n").encode())
    return summary
