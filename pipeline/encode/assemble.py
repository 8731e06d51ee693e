"""The driver's end of the stream: code rows into shards, completed files into committed generations."""
from __future__ import annotations

from dataclasses import replace


from .. import archive, storage
from ..manifest import ARCHIVED, FAILED, CodecRecord, Location, ManifestEntry
from .config import EncodeConfig
from .stages import SKIPPED, FileInfo


STREAM_CHUNK = 4096  # inputs per Ray dataset: codec actors live across the chunk's generations
LOOKUP_BATCH = 2000  # inputs matched against the catalog per lookup


class _Assembler:
    """The driver's end of the stream: code rows into shards, completed files into generations, generations
    into commits. Rows arrive from the codec actors in any order; a file is complete when its info row and all
    its windows are in. A file's windows may sit in the shard of an earlier generation than the one that commits
    it (they arrived before it completed): committed shards never change, so its entry points there too."""

    def __init__(self, cfg: EncodeConfig, crec: CodecRecord, job_id: str, lease, last_gen: int):
        self.cfg, self.crec, self.job_id, self.lease = cfg, crec, job_id, lease
        self.shard_bytes = int(cfg.shard_mb * (1 << 20))
        self.last_gen = last_gen
        self.gen: int | None = None  # the generation being filled (claimed when it first needs a number)
        self.part = 0
        self.writer = None
        self.rel = ""
        self.writer_codes = 0
        self.closed: dict[str, tuple[dict, int, str]] = {}  # shard rel -> (file id -> row groups, bytes, sha256)
        self.shard_codes: dict[str, int] = {}  # shard rel -> code bytes in it (shares archive bytes out)
        self.shards_of: dict[int, set[str]] = {}  # file id -> shards holding its windows
        self.seqs: dict[int, set[int]] = {}
        self.codes_bytes: dict[int, dict[str, int]] = {}  # file id -> shard -> code bytes
        self.infos: dict[int, dict] = {}
        self.items: dict[int, dict] = {}  # in flight: file id -> item (with its committed entry, "prev")
        self.ready: list[int] = []  # complete, not yet committed

    def expect(self, item: dict) -> None:
        self.items[item["file_id"]] = item

    def _claim(self) -> int:
        if self.gen is None:
            self.gen = self.last_gen = archive.claim_generation(self.cfg.dest, self.job_id, self.last_gen)
        return self.gen

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.closed[self.rel] = (self.writer.where, self.writer.bytes, self.writer.sha256)
            self.writer, self.writer_codes = None, 0
            self.part += 1

    def add_window(self, fid: int, row: dict) -> None:
        if self.writer is None:
            self.rel = archive.shard_relpath(self._claim(), self.part)
            self.writer = archive.ShardWriter(storage.join(self.cfg.dest, self.rel), self.crec)
        self.writer.add(row)
        n = len(row["codes"]) + len(row.get("gains") or b"")
        self.writer_codes += n
        self.shard_codes[self.rel] = self.shard_codes.get(self.rel, 0) + n
        self.seqs.setdefault(fid, set()).add(row["seq"])
        self.shards_of.setdefault(fid, set()).add(self.rel)
        per = self.codes_bytes.setdefault(fid, {})
        per[self.rel] = per.get(self.rel, 0) + n
        if self.writer_codes >= self.shard_bytes:
            self._close_shard()
        self._check(fid)

    def add_info(self, fid: int, info: FileInfo) -> None:
        self.infos[fid] = info
        self._check(fid)

    def _check(self, fid: int) -> None:
        info = self.infos.get(fid)
        if info is None or fid not in self.items:
            return
        if info.status == ARCHIVED and len(self.seqs.get(fid, ())) < info.n_windows:
            return
        self.ready.append(fid)
        self.items[fid]["_ready"] = True

    def pending(self) -> int:
        return len(self.ready)

    def commit(self, lost: bool = False) -> tuple[int | None, list[ManifestEntry], list[ManifestEntry], list[dict]]:
        """Commit the complete files (``lost``: and every file still in flight, as failed: the stream ended without
        them). Returns (generation, entries, refreshed entries, their items)."""
        fids = list(self.ready)
        if lost:
            fids += [f for f, it in self.items.items() if not it.get("_ready")]
        self.ready = []
        if not fids:
            return None, [], [], []
        self._close_shard()
        gen = self._claim()
        stamp = archive.now()
        entries, refreshed, items = [], [], []
        for fid in fids:
            it = self.items.pop(fid)
            items.append(it)
            e = self._entry(fid, it, gen, stamp)
            if e is None:
                continue
            (refreshed if e.generation == -1 else entries).append(e)
        refreshed = [replace(e, generation=gen) for e in refreshed]
        prev = {it["source"]: it["prev"] for it in items if it.get("prev") is not None}
        kept = archive.catalog.Totals(prev)
        for e in entries + refreshed:
            kept.add(e)
        archive.commit_generation(self.cfg.dest, self.lease, gen, entries + refreshed, totals=kept.sum)
        for fid in fids:
            for d in (self.seqs, self.shards_of, self.codes_bytes, self.infos):
                d.pop(fid, None)
        self.gen, self.part = None, 0  # the next generation gets the next number
        return gen, entries, refreshed, items

    def _entry(self, fid: int, it: dict, gen: int, stamp: str) -> ManifestEntry | None:
        uri = it["source"]
        info = self.infos.get(fid)
        size = it["size"] if it["size"] >= 0 else (info.size if info is not None else -1)
        base = {"source": uri, "relpath": storage.relpath(self.cfg.src, uri), "file_id": fid, "size": max(size, 0),
                "generation": gen, "encoded_at": stamp, "source_version": it.get("version") or ""}
        if info is None:
            return ManifestEntry(content_hash="", status=FAILED, reason=f"{uri}: no result came back from the "
                                 f"workers (task lost); re-run the job to retry it", reason_code="lost", **base)
        if info.status == SKIPPED:
            p = it.get("prev")
            if p is not None and it.get("version") and it["version"] != p.source_version:
                return replace(p, source_version=it["version"], generation=-1, encoded_at=stamp)
            return None
        if info.status == ARCHIVED and self.seqs.get(fid, set()) != set(range(info.n_windows)):
            info = replace(info, status=FAILED, reason_code="incomplete",
                           reason=f"{uri}: only {len(self.seqs.get(fid, ()))} of {info.n_windows} code windows "
                                  f"were written; re-run the job")
        if info.status != ARCHIVED:
            return ManifestEntry(content_hash=info.content_hash, status=FAILED, reason=info.reason,
                                 reason_code=info.reason_code or "other", sample_rate=info.sample_rate,
                                 channels=info.channels, **base)
        locs, arc_bytes = [], 0
        for rel in sorted(self.shards_of.get(fid, ())):
            where, nbytes, sha = self.closed[rel]
            locs += [Location(rel, g, nbytes, sha) for g in where.get(fid, [])]
            arc_bytes += int(round(nbytes * self.codes_bytes[fid].get(rel, 0) / (self.shard_codes.get(rel) or 1)))
        return ManifestEntry(
            content_hash=info.content_hash, status=ARCHIVED, duration_s=info.duration_s,
            sample_rate=info.sample_rate, channels=info.channels, frames=info.frames,
            codec_samples=info.codec_samples, codec_frames=info.codec_frames, n_windows=info.n_windows,
            archive_bytes=arc_bytes, locations=tuple(sorted(set(locs), key=lambda loc: (loc.shard, loc.row_group))),
            **base)
