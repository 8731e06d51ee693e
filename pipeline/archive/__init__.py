"""The archive: its byte format, catalog, commit protocol, integrity checks and carried codec weights.

The only writer of commit state. Jobs (encode, restore, quality, verify) stand beside each other on top of it:
``open_archive`` / ``Archive`` to read, ``create_or_open`` + ``commit`` + ``Lease`` to write. Layout and formats:
``layout``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import datetime, timezone

import pyarrow as pa

from .. import storage
from ..errors import ArchiveFormatError, CodecMismatchError, ConfigError, IntegrityError, StorageError
from ..manifest import ARCHIVED, ArchiveRecord, CodecRecord, Location, ManifestEntry, WeightsRef
from . import catalog, commit, layout, legacy, weights
from .codes import bits_for, pack_codes, pack_gains, row_checksum, unpack_codes, unpack_gains
from .commit import Lease, claim_generation
from .layout import (CODES_SCHEMA, FORMAT_NAME, FORMAT_VERSION, RECORD_FILE, ROW_GROUP_BYTES, check_parquet_meta,
                     check_version, gen_name, shard_relpath)
from .shards import ShardWriter, read_file_codes, read_file_windows
from .weights import check_codec, load_codec

COMMIT_FILE = RECORD_FILE  # (1.x name)

__all__ = ["Archive", "open_archive", "read_record", "require_record", "create_or_open", "commit_generation",
           "Lease", "claim_generation", "ShardWriter", "read_file_windows", "read_file_codes", "load_codec",
           "check_codec", "prefix_stages", "bits_for", "pack_codes", "unpack_codes", "pack_gains", "unpack_gains",
           "row_checksum",
           "FORMAT_NAME", "FORMAT_VERSION", "CODES_SCHEMA", "ROW_GROUP_BYTES", "check_version",
           "check_parquet_meta", "gen_name", "shard_relpath", "now", "catalog", "commit", "layout", "legacy",
           "weights"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the record -----------------------------------------------------------------------------------
def read_record(dest: str) -> ArchiveRecord | None:
    url = storage.join(dest, RECORD_FILE)
    try:
        raw = storage.read_bytes(url)
    except StorageError:
        if storage.exists(url):
            raise
        return None
    try:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise ArchiveFormatError(f"{url}: archive record is not valid JSON ({e}); the archive is damaged there "
                                 f"(copy archive.json back from a replica)") from None
    major = check_version(d.get("format"), d.get("format_version"), url)
    try:
        codec = CodecRecord(**d["codec"])
        w = d.get("weights")
        return ArchiveRecord(format=d["format"], format_version=d["format_version"], codec=codec,
                             generations=tuple(d.get("generations") or ()) if major == 1 else (),
                             created_at=d.get("created_at", ""), updated_at=d.get("updated_at", d.get("created_at", "")),
                             weights=WeightsRef(**w) if w else None)
    except (KeyError, TypeError) as e:
        raise ArchiveFormatError(f"{url}: archive record lacks or misnames a field ({e}); the archive is "
                                 f"damaged there (copy archive.json back from a replica)") from None


def require_record(dest: str) -> ArchiveRecord:
    rec = read_record(dest)
    if rec is None:
        raise ArchiveFormatError(f"{dest}: no archive here ({RECORD_FILE} not found); "
                                 f"create one with `audioarc encode SRC {dest}`")
    return rec


def _record_bytes(rec: ArchiveRecord) -> bytes:
    d = asdict(rec)
    d.pop("generations")
    d.pop("updated_at")
    if rec.weights is None:
        d.pop("weights")
    return (json.dumps(d, indent=2) + "\n").encode()


# -- reading --------------------------------------------------------------------------------------
class Archive:
    """An archive opened for reading: its record and its committed catalog.

    Lookups read only what they need (a format 2.0 catalog prunes data files and row groups by statistics);
    ``latest`` reads every row and is for whole-archive work (restore all, verify)."""

    def __init__(self, dest: str, record: ArchiveRecord):
        self.dest, self.record = dest, record
        self._legacy: dict[str, ManifestEntry] | None = None

    @property
    def legacy(self) -> bool:
        return self.record.major == 1

    def _legacy_entries(self) -> dict[str, ManifestEntry]:
        if self._legacy is None:
            self._legacy = legacy.read_manifest(self.dest, self.record.generations)
        return self._legacy

    def latest(self) -> list[ManifestEntry]:
        """One entry per input (its newest archived row; else its newest), sorted by relpath."""
        if self.legacy:
            return sorted(self._legacy_entries().values(), key=lambda e: e.relpath)
        return list(catalog.entries(catalog.latest(catalog.table(self.dest))))

    def iter_latest(self):
        """``latest`` as a stream, one relpath range at a time (bounded memory; first entries after one range)."""
        if self.legacy:
            yield from self.latest()
            return
        for t in catalog.iter_latest(self.dest):
            yield from catalog.entries(t)

    def entries(self) -> dict[str, ManifestEntry]:
        return {e.source: e for e in self.latest()}

    def by_sources(self, sources: list[str]) -> dict[str, ManifestEntry]:
        """The current entry of each of ``sources`` that the archive has (a bounded lookup)."""
        if self.legacy:
            m = self._legacy_entries()
            return {s: m[s] for s in sources if s in m}
        return {e.source: e for e in catalog.entries(catalog.latest(catalog.by_values(self.dest, "source", sources)))}

    def by_relpaths(self, relpaths: list[str]) -> list[ManifestEntry]:
        if self.legacy:
            want = set(relpaths)
            return [e for e in self.latest() if e.relpath in want]
        return list(catalog.entries(catalog.latest(catalog.by_values(self.dest, "relpath", relpaths))))

    def matching(self, patterns: tuple[str, ...]) -> list[ManifestEntry]:
        """Entries whose relpath, source URI or base name matches a glob pattern (every entry if none), by relpath.
        A pattern whose literal start holds a '/' reads only that relpath range (or source range, for a URI);
        other patterns may match any base name, so they scan the relpath column (streamed)."""
        from ..select import matches
        if not patterns or self.legacy:
            return [e for e in self.latest() if matches(e, patterns)]
        tables = []
        for p in patterns:
            lit = _literal_prefix(p)
            if "://" in lit or lit.startswith("/"):
                tables.append(catalog.by_prefix(self.dest, "source", lit))
            elif "/" in lit:
                tables.append(catalog.by_prefix(self.dest, "relpath", lit))
            else:
                hits = _scan_names(self.dest, p)
                if hits:
                    tables.append(catalog.by_values(self.dest, "relpath", hits))
        if not tables:
            return []
        rows = catalog.latest(pa.concat_tables(tables).combine_chunks())
        return [e for e in catalog.entries(rows) if matches(e, patterns)]

    def failures(self, limit: int = 1000) -> list[ManifestEntry]:
        """Inputs whose current entry is a failure (at most ``limit``)."""
        if self.legacy:
            return [e for e in self.latest() if e.status != ARCHIVED][:limit]
        import pyarrow.dataset as pds
        failed = catalog.latest(catalog.table(self.dest, filter=pds.field("status") != ARCHIVED,
                                              prune=[("status", "!=", ARCHIVED)]))
        srcs = failed["source"].to_pylist()
        if not srcs:
            return []
        now = self.by_sources(srcs)  # a failure that a later attempt archived is not a failure
        return [e for e in now.values() if e.status != ARCHIVED][:limit]

    def totals(self) -> dict:
        """Files, archived, failed, seconds, source/archive/pcm bytes, generations: kept at commit (2.0)."""
        if self.legacy:
            t = dict.fromkeys(catalog.TOTAL_KEYS, 0)
            for e in self._legacy_entries().values():
                for k, v in catalog._contribution(e).items():
                    t[k] += v
            t["generations"] = len(self.record.generations)
            return t
        return catalog.totals(self.dest)

    def generations(self) -> tuple[int, ...]:
        return self.record.generations if self.legacy else catalog.generations(self.dest)

    def with_generations(self) -> ArchiveRecord:
        return self.record if self.legacy else replace(self.record, generations=self.generations())


def _literal_prefix(pattern: str) -> str:
    for i, ch in enumerate(pattern):
        if ch in "*?[":
            return pattern[:i]
    return pattern


def _scan_names(dest: str, pattern: str) -> list[str]:
    """Relpaths whose base name or whole path matches ``pattern``, streamed over the relpath column."""
    import fnmatch
    import posixpath
    rx = __import__("re").compile(fnmatch.translate(pattern))
    out = []
    for b in catalog.batches(dest, columns=["relpath"]):
        for r in b.column(0).to_pylist():
            if rx.match(r) or rx.match(posixpath.basename(r)):
                out.append(r)
    return out


def open_archive(dest: str) -> tuple[ArchiveRecord, dict[str, ManifestEntry]]:
    """``(record with its committed generations, source -> latest entry)``."""
    a = Archive(dest, require_record(dest))
    return a.with_generations(), a.entries()


# -- rates ----------------------------------------------------------------------------------------
def prefix_stages(codec, rec: ArchiveRecord, kbps: float | None) -> int:
    """The stages that decode ``kbps`` (on ``codec``'s ladder, at or below the archive's rate): RVQ stage k only
    refines stages 1..k-1, so an archive holds every lower rung as a prefix of its codes. None: all of them."""
    have = rec.codec.n_q
    if kbps is None:
        return have
    k = codec.n_q_for_kbps(kbps)
    if k > have:
        raise ConfigError(f"--bitrate {kbps:g}: the archive is at {rec.codec.kbps_per_channel:g} kbps "
                          f"({have} stages); it holds only its own rate and the lower rungs of its ladder "
                          f"({', '.join(f'{r:g}' for r, n in sorted(codec.ladder().items()) if n <= have)} kbps)")
    return k


# -- writing --------------------------------------------------------------------------------------
def create_or_open(dest: str, codec, n_q: int) -> ArchiveRecord:
    """The record of the archive at ``dest`` for a job adding ``n_q``-stage codes of ``codec``: the archive's
    own (checked to match), or a new archive's (weights, catalog, then ``archive.json`` by exclusive create:
    of two jobs creating it at once, one record wins and the other job adds to it)."""
    want = codec.record(n_q)
    rec = read_record(dest)
    if rec is None:
        ref = weights.embed(dest, codec)
        catalog.create(dest)
        rec = ArchiveRecord(FORMAT_NAME, FORMAT_VERSION, want, (), now(), now(), ref)
        try:
            storage.write_bytes(storage.join(dest, RECORD_FILE), _record_bytes(rec), exclusive=True)
            return rec
        except FileExistsError:
            rec = require_record(dest)
    check_compatible(dest, rec, want)
    if rec.major == 1:
        raise ArchiveFormatError(
            f"{dest}: archive format {rec.format_version} is read-only for this audioarc (it restores, lists and "
            f"verifies it); convert it once with `audioarc upgrade {dest}` (keeps every shard), or archive new "
            f"material into a new DEST")
    if not catalog.exists(dest):
        raise IntegrityError(f"{storage.join(dest, layout.CATALOG_DIR)}: the archive's catalog is missing; the "
                             f"archive is damaged (restore the catalog folder from a replica or backup)")
    return rec


def check_compatible(dest: str, rec: ArchiveRecord, want: CodecRecord) -> None:
    old = rec.codec
    if (old.name, old.checkpoint_hash) != (want.name, want.checkpoint_hash):
        raise CodecMismatchError(
            f"{dest}: archive was made by codec {old.name!r} (checkpoint {old.checkpoint_hash}); "
            f"this job uses {want.name!r} ({want.checkpoint_hash}). Use --codec {old.name} with its weights "
            f"to add to it, or choose a new DEST")
    if old.n_q != want.n_q:
        raise ConfigError(f"{dest}: archive is at {old.kbps_per_channel:g} kbps; this job asks for "
                          f"{want.kbps_per_channel:g} kbps. Use --bitrate {old.kbps_per_channel:g} or a new DEST")


def commit_generation(dest: str, lease: Lease, gen: int, entries: list[ManifestEntry],
                      totals: dict | None = None) -> None:
    """Commit generation ``gen``: check this job still holds its lease and its shards are all there as written,
    then one catalog transaction (``totals``: what it changes in the archive's totals, ``catalog.Totals``)."""
    if not entries:
        return
    lease.check()
    sizes = {loc.shard: loc.shard_bytes for e in entries for loc in e.locations}
    for shard, n in sizes.items():  # staged writes are all there, as written, before the commit
        url = storage.join(dest, shard)
        try:
            have = storage.size(url)
        except StorageError:
            have = None
        if have != n:
            raise IntegrityError(f"{url}: written as {n} bytes but {'missing' if have is None else f'{have} bytes'} "
                                 f"before its commit; nothing of generation {gen} was committed. Re-run the same "
                                 f"command to resume")
    lease.check()
    catalog.append(dest, entries, gen, lease.job_id, totals=totals)


def collect_garbage(dest: str, own_job: str | None = None) -> list[str]:
    """Remove what no committed generation reaches and no live job holds; returns the removed URLs."""
    return commit.collect(dest, lambda: set(catalog.generations(dest)) if catalog.exists(dest) else set(), own_job)


def upgrade(dest: str, weights_path: str | None = None) -> ArchiveRecord:
    """Convert a format 1.x archive in place to 2.0: its manifest rows become the catalog (every shard kept,
    hashed now), the codec weights are stored in it, and ``archive.json`` is rewritten last. Run it while no
    1.x job writes to the archive."""
    import hashlib
    rec = require_record(dest)
    if rec.major >= 2:
        return rec
    codec = load_codec(dest, rec, weights_path)
    entries = sorted(legacy.read_manifest(dest, rec.generations).values(), key=lambda e: e.relpath)
    sums: dict[str, tuple[int, str]] = {}
    for e in entries:
        for loc in e.locations:
            if loc.shard not in sums:
                data = storage.read_bytes(storage.join(dest, loc.shard))
                sums[loc.shard] = (len(data), hashlib.sha256(data).hexdigest())
    entries = [replace(e, locations=tuple(Location(loc.shard, loc.row_group, *sums[loc.shard]) for loc in e.locations))
               for e in entries]
    ref = weights.embed(dest, codec)
    catalog.create(dest)
    if catalog.generations(dest):
        raise ArchiveFormatError(f"{dest}: a catalog already holds rows; the archive is half upgraded by another "
                                 f"run; remove {storage.join(dest, layout.CATALOG_DIR)} and run upgrade again")
    for g in rec.generations:  # the numbers 1.x used stay taken
        try:
            storage.write_bytes(storage.join(dest, layout.GENS_DIR, f"{gen_name(g)}.json"),
                                json.dumps({"job_id": "upgrade"}).encode(), exclusive=True)
        except FileExistsError:
            pass
    if entries:
        t = catalog.Totals({})
        for e in entries:
            t.add(e)
        t.sum["generations"] = len(rec.generations)
        catalog.append(dest, entries, max(rec.generations or (0,)), "upgrade", totals=t.sum)
    new = ArchiveRecord(FORMAT_NAME, FORMAT_VERSION, rec.codec, (), rec.created_at, now(), ref)
    storage.write_bytes(storage.join(dest, RECORD_FILE), _record_bytes(new))
    return new
