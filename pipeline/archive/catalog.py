"""The catalog of a format 2.0 archive: a Delta Lake table of catalog rows, appended one generation per commit.

Append-only: a status change or a re-encode is a new row; for each source the newest archived row wins (the
newest row when none is archived), so concurrent jobs never conflict and never rewrite each other's files.
DuckDB or Polars read it directly (``delta_scan('DEST/catalog')``, ``pl.read_delta``).
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..errors import IntegrityError
from ..manifest import ARCHIVED, ManifestEntry
from . import layout
from .exitgc import exit_gc

ROW_GROUP_ROWS = 64 << 10


def _loc(dest: str) -> tuple[str, dict]:
    return storage.delta_location(storage.join(dest, layout.CATALOG_DIR))


def _writer_properties():
    from deltalake import WriterProperties
    return WriterProperties(compression="ZSTD", max_row_group_size=ROW_GROUP_ROWS)


def create(dest: str) -> None:
    """Create the empty catalog table (once, before any job appends to it; a second creator finds it there)."""
    from deltalake import DeltaTable
    uri, opts = _loc(dest)
    exit_gc()
    try:
        DeltaTable.create(uri, schema=layout.CATALOG_SCHEMA, mode="ignore", storage_options=opts,
                          name="audioarc_catalog")
    except Exception:  # noqa: BLE001 - lost a race to create it: fine if it exists now
        if not exists(dest):
            raise


def exists(dest: str) -> bool:
    from deltalake import DeltaTable
    uri, opts = _loc(dest)
    try:
        return DeltaTable.is_deltatable(uri, storage_options=opts)
    except Exception:  # noqa: BLE001
        return False


def to_table(entries: Iterable[ManifestEntry]) -> pa.Table:
    rows = [e.to_row() for e in entries]
    for r in rows:
        r["locations"] = [dict(shard=loc["shard"], row_group=loc["row_group"], shard_bytes=loc.get("shard_bytes"),
                               shard_sha256=loc.get("shard_sha256")) for loc in r["locations"]]
    return pa.Table.from_pylist(rows, schema=layout.CATALOG_SCHEMA)


def append(dest: str, entries: list[ManifestEntry], generation: int, job_id: str, totals: dict | None = None) -> None:
    """One Delta transaction: the rows of ``generation`` (sorted by relpath, so each data file covers a narrow
    range its statistics can prune on), and ``totals``, what they change in the archive's totals (``inspect``).
    Concurrent appends are retried by delta-rs."""
    from deltalake import CommitProperties, write_deltalake
    uri, opts = _loc(dest)
    exit_gc()
    meta = {"audioarc.generation": str(generation), "audioarc.job": job_id}
    if totals is not None:
        meta["audioarc.totals"] = json.dumps(totals, sort_keys=True)
    t = to_table(entries)
    t = t.take(pc.sort_indices(t, sort_keys=[("relpath", "ascending"), ("source", "ascending")]))
    write_deltalake(uri, t, mode="append", storage_options=opts, writer_properties=_writer_properties(),
                    commit_properties=CommitProperties(custom_metadata=meta))


def _open(dest: str):
    from deltalake import DeltaTable
    uri, opts = _loc(dest)
    exit_gc()
    try:
        return DeltaTable(uri, storage_options=opts)
    except Exception as e:  # noqa: BLE001 - a missing or damaged commit log
        raise _damaged(dest, e) from None


def _damaged(dest: str, e: BaseException) -> IntegrityError:
    return IntegrityError(f"{storage.join(dest, layout.CATALOG_DIR)}: the catalog cannot be read "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); the archive is damaged there, "
                          f"restore the catalog folder from a replica or backup")


def table(dest: str, columns: list[str] | None = None, filter=None, prune=None) -> pa.Table:
    """Committed rows (``columns`` of those matching ``filter``, a pyarrow dataset expression). ``prune``: tuple
    filters on the same condition that let Delta skip whole data files by their min/max statistics."""
    dt = _open(dest)
    try:
        ds = dt.to_pyarrow_dataset(file_pruning_predicate=prune) if prune else dt.to_pyarrow_dataset()
        return ds.to_table(columns=columns, filter=filter)
    except Exception as e:  # noqa: BLE001 - a missing or damaged data file
        raise _damaged(dest, e) from None


def batches(dest: str, columns: list[str] | None = None, filter=None, prune=None, batch_rows: int = 65536):
    """The same rows as ``table``, streamed in record batches (bounded memory at any catalog size)."""
    dt = _open(dest)
    try:
        ds = dt.to_pyarrow_dataset(file_pruning_predicate=prune) if prune else dt.to_pyarrow_dataset()
        yield from ds.to_batches(columns=columns, filter=filter, batch_size=batch_rows)
    except Exception as e:  # noqa: BLE001
        raise _damaged(dest, e) from None


def release_memory() -> None:
    """Hand the memory pyarrow pooled for catalog reads back to the system (a lookup's decoded row groups), so a
    restore's peak is the catalog read or the codec, not both."""
    pa.default_memory_pool().release_unused()


def _isin(column: str, values: list):
    import pyarrow.dataset as pds
    values = sorted(set(values))
    expr = pds.field(column).isin(values)
    # a range the values span prunes files and row groups by their statistics; isin then picks the rows
    return (pds.field(column) >= values[0]) & (pds.field(column) <= values[-1]) & expr, \
        [(column, ">=", values[0]), (column, "<=", values[-1])]


def by_values(dest: str, column: str, values: list) -> pa.Table:
    """Rows whose ``column`` (relpath, source or file_id) is one of ``values``; files and row groups outside
    their range are never read."""
    if not values:
        return layout.CATALOG_SCHEMA.empty_table()
    expr, prune = _isin(column, values)
    return table(dest, filter=expr, prune=prune)


def by_prefix(dest: str, column: str, prefix: str) -> pa.Table:
    """Rows whose string ``column`` starts with ``prefix`` (a range scan over sorted data)."""
    import pyarrow.dataset as pds
    if not prefix:
        return table(dest)
    hi = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    expr = (pds.field(column) >= prefix) & (pds.field(column) < hi)
    return table(dest, filter=expr, prune=[(column, ">=", prefix), (column, "<", hi)])


def latest(t: pa.Table) -> pa.Table:
    """One row per source: its newest archived row, or its newest row when none is archived; by relpath."""
    if t.num_rows == 0:
        return t
    ok = pc.cast(pc.equal(t["status"], ARCHIVED), pa.int8())
    keys = pa.table({"s": t["source"], "ok": ok, "g": t["generation"]})
    t = t.take(pc.sort_indices(keys, sort_keys=[("s", "ascending"), ("ok", "descending"), ("g", "descending")]))
    src = t["source"].to_numpy(zero_copy_only=False)
    first = np.ones(len(src), dtype=bool)
    first[1:] = src[1:] != src[:-1]
    t = t.filter(pa.array(first))
    return t.take(pc.sort_indices(t["relpath"]))


def entries(t: pa.Table) -> Iterator[ManifestEntry]:
    for batch in t.to_batches(max_chunksize=8192):
        for r in batch.to_pylist():
            yield ManifestEntry.from_row(r)


def generations(dest: str) -> tuple[int, ...]:
    """The committed generation numbers, ascending."""
    t = table(dest, columns=["generation"])
    if t.num_rows == 0:
        return ()
    return tuple(int(g) for g in sorted(pc.unique(t["generation"]).to_pylist()))



# -- totals kept at commit --------------------------------------------------------------------------
TOTAL_KEYS = ("files", "archived", "failed", "seconds", "source_bytes", "archive_bytes", "pcm_bytes", "generations")


def _contribution(e: ManifestEntry | None) -> dict:
    if e is None:
        return dict.fromkeys(TOTAL_KEYS, 0)
    ok = e.status == ARCHIVED
    return {"files": 1, "archived": int(ok), "failed": int(not ok), "seconds": e.duration_s if ok else 0.0,
            "source_bytes": e.size if ok else 0, "archive_bytes": e.archive_bytes if ok else 0,
            "pcm_bytes": e.frames * e.channels * 2 if ok else 0, "generations": 0}


def current(prev: ManifestEntry | None, new: ManifestEntry) -> ManifestEntry:
    """Which of two rows of one source a reader lists (``latest``'s rule)."""
    if prev is None:
        return new
    key = (lambda e: (e.status == ARCHIVED, e.generation))
    return new if key(new) >= key(prev) else prev


class Totals:
    """Sums what a generation's rows change in the archive's totals, given the rows they may supersede."""

    def __init__(self, prev: dict[str, ManifestEntry]):
        self.prev = dict(prev)
        self.sum = dict.fromkeys(TOTAL_KEYS, 0)
        self.sum["generations"] = 1

    def add(self, e: ManifestEntry) -> None:
        old = self.prev.get(e.source)
        now = current(old, e)
        a, b = _contribution(old), _contribution(now)
        for k in TOTAL_KEYS:
            self.sum[k] += b[k] - a[k]
        self.prev[e.source] = now


def _history(dest: str) -> list[dict]:
    dt = _open(dest)
    try:
        return dt.history()
    except Exception as e:  # noqa: BLE001
        raise _damaged(dest, e) from None


def totals(dest: str) -> dict:
    """The archive's totals from its commit log: the newest snapshot (``compact`` writes one) plus what every
    later commit changed. Reads the log, not the rows. Keys: TOTAL_KEYS, plus ``updated_at`` (ms epoch)."""
    hist = _history(dest)  # newest first
    out = dict.fromkeys(TOTAL_KEYS, 0)
    as_of = -1
    for h in hist:
        snap = h.get("audioarc.totals_snapshot")
        if snap:
            as_of = int(h.get("audioarc.totals_as_of", -1))
            for k, v in json.loads(snap).items():
                if k in out:
                    out[k] += v
            break
    for h in hist:
        if int(h.get("version", -1)) <= as_of:
            break
        d = h.get("audioarc.totals")
        if d:
            for k, v in json.loads(d).items():
                if k in out:
                    out[k] += v
    out["updated_at"] = max((int(h.get("timestamp", 0)) for h in hist), default=0)
    return out


def exact_totals(dest: str, version: int | None = None) -> dict:
    """The same totals from a scan of every row (``compact`` and tests check the kept ones against it)."""
    cols = ["source", "status", "generation", "duration_s", "size", "archive_bytes", "frames", "channels"]
    t = latest(table(dest, columns=cols + ["relpath"]) if version is None else _at(dest, version, cols + ["relpath"]))
    out = dict.fromkeys(TOTAL_KEYS, 0)
    if t.num_rows:
        ok = pc.equal(t["status"], ARCHIVED)
        out["files"] = t.num_rows
        out["archived"] = int(pc.sum(pc.cast(ok, pa.int64())).as_py() or 0)
        out["failed"] = t.num_rows - out["archived"]
        good = t.filter(ok)
        out["seconds"] = float(pc.sum(good["duration_s"]).as_py() or 0.0)
        out["source_bytes"] = int(pc.sum(good["size"]).as_py() or 0)
        out["archive_bytes"] = int(pc.sum(good["archive_bytes"]).as_py() or 0)
        out["pcm_bytes"] = int(pc.sum(pc.multiply(pc.multiply(good["frames"], pc.cast(good["channels"], pa.int64())), 2))
                               .as_py() or 0)
    g = table(dest, columns=["generation"]) if version is None else _at(dest, version, ["generation"])
    out["generations"] = len(pc.unique(g["generation"])) if g.num_rows else 0
    return out


def _at(dest: str, version: int, columns: list[str]) -> pa.Table:
    dt = _open(dest)
    dt.load_as_version(version)
    return dt.to_pyarrow_dataset().to_table(columns=columns)


def compact(dest: str, target_mb: int = 64, vacuum_hours: float | None = None) -> dict:
    """Rewrite the catalog's data files sorted by relpath into files of ~``target_mb`` with 64k-row groups (lookups
    then read a few small row groups at any size), record exact totals as of the version compacted, and with
    ``vacuum_hours`` remove files no version younger than that still needs. Safe beside running jobs: appends
    that land meanwhile are kept (Delta's conflict check), the rows themselves never change."""
    from deltalake import CommitProperties
    dt = _open(dest)
    version = dt.version()
    snap = exact_totals(dest, version)
    metrics = dt.optimize.z_order(
        ["relpath"], target_size=target_mb << 20, writer_properties=_writer_properties(),
        commit_properties=CommitProperties(custom_metadata={
            "audioarc.totals_snapshot": json.dumps(snap, sort_keys=True), "audioarc.totals_as_of": str(version)}))
    removed = []
    if vacuum_hours is not None:
        removed = _open(dest).vacuum(retention_hours=int(vacuum_hours), enforce_retention_duration=False,
                                     dry_run=False)
    return {"version": version, "files_added": metrics.get("numFilesAdded"),
            "files_removed": metrics.get("numFilesRemoved"), "vacuumed": len(removed), "totals": snap}


MAX_FOOTER_FILES = 64  # above this many data files, ranges come from the log's per-file statistics


def _range_starts(dt, ds) -> list[str] | None:
    """Sorted relpath values that start ranges of about one row group each (compacted catalogs: row-group
    statistics from the few files' footers) or one data file each (many files: the log's per-file minimums,
    no footer read). None when statistics are missing (read in one piece)."""
    frags = list(ds.get_fragments())
    if not frags:
        return []
    starts: list[str] = []
    if len(frags) <= MAX_FOOTER_FILES:
        col = ds.schema.get_field_index("relpath")
        for frag in frags:
            md = frag.metadata
            for i in range(md.num_row_groups):
                st = md.row_group(i).column(col).statistics
                if st is None or not st.has_min_max:
                    return None
                starts.append(st.min)
    else:
        adds = pa.table(dt.get_add_actions(flatten=True))
        if "min.relpath" not in adds.column_names:
            return None
        mins = adds["min.relpath"].to_pylist()
        if any(m is None for m in mins):
            return None
        starts = mins
    return sorted(set(starts))


def iter_latest(dest: str) -> Iterator[pa.Table]:
    """``latest`` of the whole catalog as a stream of tables in relpath order, one key range at a time (bounded
    memory; the first rows come after reading one range, at any catalog size). A source's rows share its relpath,
    so each range holds every row that decides its sources."""
    import pyarrow.dataset as pds
    dt = _open(dest)
    try:
        ds = dt.to_pyarrow_dataset()
        starts = _range_starts(dt, ds)
        if starts is None:
            yield latest(ds.to_table())
            return
        for i, lo in enumerate(starts):
            hi = starts[i + 1] if i + 1 < len(starts) else None
            expr = pds.field("relpath") >= lo if i else None
            if hi is not None:
                expr = pds.field("relpath") < hi if expr is None else expr & (pds.field("relpath") < hi)
            t = ds.to_table(filter=expr)
            if t.num_rows:
                yield latest(t)
    except IntegrityError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _damaged(dest, e) from None
