"""``audioarc verify``: check every committed object of an archive (present, size, sha256; ``deep``: every row's
checksum and every file's windows) and name the source files each damaged object affects."""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from . import archive, storage
from .archive import layout
from .errors import AudioarcError, StorageError
from .manifest import ARCHIVED, ArchiveRecord, ManifestEntry

HASH_THREADS = 4
CHUNK = 8 << 20


@dataclass
class Damage:
    object: str  # path relative to the archive root
    problem: str  # what is wrong, in words
    files: list[str] = field(default_factory=list)  # relpaths of the source files it affects


@dataclass
class VerifyReport:
    archive: str
    format_version: str = ""
    deep: bool = False
    ok: bool = True
    objects_checked: int = 0
    bytes_checked: int = 0
    files_checked: int = 0
    rows_checked: int = 0
    files_affected: int = 0
    damaged: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    gb_per_s: float = 0.0
    files_per_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def _hash_object(url: str) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with storage.open_read(url, block_size=CHUNK, cache_type="none") as f:
        while b := f.read(CHUNK):
            h.update(b)
            n += len(b)
    return n, h.hexdigest()


def _check_shard(dest: str, shard: str, want_bytes: int | None, want_sha: str | None) -> str | None:
    """What is wrong with the shard as committed (None: nothing)."""
    url = storage.join(dest, shard)
    try:
        n, sha = _hash_object(url)
    except StorageError:
        return "missing"
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if want_bytes is not None and n != want_bytes:
        return f"{n} bytes, {want_bytes} were committed (truncated or replaced)"
    if want_sha and sha != want_sha:
        return "sha256 differs from the committed one (bit rot or overwritten)"
    return None


def _deep_shard(dest: str, shard: str, files: dict[int, ManifestEntry]) -> tuple[str | None, dict[int, set[int]], int]:
    """Read every row of ``shard``: page checksums, row CRC-32C. Returns (problem, file id -> windows found, rows)."""
    url = storage.join(dest, shard)
    found: dict[int, set[int]] = {}
    rows = 0
    try:
        with storage.open_read(url, **storage.RANGE_READ) as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            major = layout.check_parquet_meta(pf.schema_arrow, url)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g)
                for r in t.to_pylist():
                    rows += 1
                    if major >= 2 and r["crc32c"] != archive.row_checksum(
                            r["file_id"], r["seq"], r["frame_start"], r["n_frames"], r["channels"], r["n_q"],
                            r["codes"] or b"", r.get("gains")):
                        return f"row group {g}: code window {r['seq']} of file id {r['file_id']} fails its checksum", \
                            found, rows
                    found.setdefault(r["file_id"], set()).add(r["seq"])
    except StorageError:
        return "missing", found, rows
    except AudioarcError as e:
        return str(e), found, rows
    except (OSError, pa.ArrowException, ValueError, KeyError) as e:
        return f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})", found, rows
    return None, found, rows


def run_verify(dest: str, deep: bool = False) -> VerifyReport:
    t0 = time.time()
    rep = VerifyReport(archive=dest, deep=deep)

    def damage(obj: str, problem: str, files=()) -> None:
        rep.damaged.append(Damage(obj, problem, sorted(set(files))))

    rec: ArchiveRecord = archive.require_record(dest)
    rep.format_version = rec.format_version
    try:
        a = archive.Archive(dest, rec)
        entries = a.latest()
    except AudioarcError as e:
        damage(layout.CATALOG_DIR if rec.major >= 2 else "manifest/", str(e), ["(every file: the catalog is unreadable)"])
        return _finish(rep, t0)
    archived = [e for e in entries if e.status == ARCHIVED]
    rep.files_checked = len(archived)
    _check_weights(dest, rec, deep, damage, rep)
    shards: dict[str, dict] = {}
    for e in archived:
        for loc in e.locations:
            s = shards.setdefault(loc.shard, {"bytes": loc.shard_bytes, "sha": loc.shard_sha256, "files": {}})
            s["files"][e.file_id] = e
    bad: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as ex:
        futs = {shard: ex.submit(_check_shard, dest, shard, s["bytes"], s["sha"]) for shard, s in shards.items()}
        for shard, fut in futs.items():
            problem = fut.result()
            rep.objects_checked += 1
            if problem:
                bad[shard] = problem
            else:
                rep.bytes_checked += shards[shard]["bytes"] or 0
    if rec.major < 2:
        rep.notes.append("format 1.x: shards carry no committed size, hash or row checksums; checked that each is "
                         "present and (with --deep) readable. `audioarc upgrade` records hashes from now on")
    found: dict[int, set[int]] = {}
    if deep:
        with ThreadPoolExecutor(max_workers=2) as ex:
            futs = {shard: ex.submit(_deep_shard, dest, shard, s["files"]) for shard, s in shards.items()
                    if shard not in bad or bad[shard].startswith("sha256")}
            for shard, fut in futs.items():
                problem, f, n = fut.result()
                rep.rows_checked += n
                if problem and shard not in bad:
                    bad[shard] = problem
                elif problem:
                    bad[shard] += f"; {problem}"
                for fid, seqs in f.items():
                    found.setdefault(fid, set()).update(seqs)
    for shard, problem in sorted(bad.items()):
        damage(shard, problem, [e.relpath for e in shards[shard]["files"].values()])
    if deep:
        bad_files = {fid for s in bad for fid in shards[s]["files"]}
        for e in archived:
            if e.file_id in bad_files:
                continue
            missing = set(range(e.n_windows)) - found.get(e.file_id, set())
            if missing:
                damage(e.relpath, f"code windows {sorted(missing)[:10]} of {e.n_windows} are in no shard", [e.relpath])
    return _finish(rep, t0)


def _check_weights(dest: str, rec: ArchiveRecord, deep: bool, damage, rep: VerifyReport) -> None:
    every = ["(every file: the codec weights are needed to decode)"]
    ref = rec.weights or archive.weights.find(dest, rec.codec)
    if ref is None:
        if rec.major >= 2:
            damage(layout.weights_relpath(rec.codec.checkpoint_hash), "missing: the archive's codec weights", every)
        else:
            rep.notes.append(f"format 1.x: the archive carries no codec weights; `audioarc adopt-weights {dest} "
                             f"WEIGHTS` stores them")
        return
    rep.objects_checked += 1
    try:
        data = archive.weights.read_checked(dest, ref)
        rep.bytes_checked += len(data)
        if deep:
            archive.weights.from_bytes(data, rec.codec.name, rec.codec.checkpoint_hash, ref.path)
    except AudioarcError as e:
        damage(ref.path, str(e), every)


def _finish(rep: VerifyReport, t0: float) -> VerifyReport:
    rep.seconds = round(time.time() - t0, 3)
    rep.ok = not rep.damaged
    rep.files_affected = len({f for d in rep.damaged for f in d.files})
    rep.gb_per_s = round(rep.bytes_checked / 1e9 / rep.seconds, 3) if rep.seconds else 0.0
    rep.files_per_s = round(rep.files_checked / rep.seconds, 1) if rep.seconds else 0.0
    return rep
