"""What integrity costs: shard write and read throughput with and without checksums, and ``verify`` speed.

    python -m jobs.bench.bench_integrity [--files 2000] [--seconds 30] [--work DIR]

Measured side by side in one run on the same random codes (6 kbps neural_rvq geometry, 30 s windows):

* write: ``ShardWriter`` (row CRC-32C, Parquet page CRCs, streaming sha256) vs a plain ``pyarrow`` writer of the
  same rows without any of them, MB/s of shard bytes;
* read: ``read_file_windows`` (page CRCs verified, row CRCs, shard size as committed) vs the same reads with every
  check off, files/s for one-window files chosen at random;
* verify: ``run_verify`` on a synthetic archive of ``--files`` files (GB/s), and ``--deep`` (files/s, rows/s).
The codec's own forward pass (the encode/restore bottleneck, see bench_codec) is the same either way.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=30.0, help="audio per file (one window each)")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import archive
    from pipeline.archive import catalog, layout
    from pipeline.codec import registry
    from pipeline.manifest import ARCHIVED, Location, ManifestEntry
    from pipeline.verify import run_verify

    work = args.work or tempfile.mkdtemp(prefix="bench-integrity-")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    codec = registry.load(registry.DEFAULT_CODEC)
    n_q = codec.n_q_for_kbps(6.0)
    crec = codec.record(n_q)
    frames = int(args.seconds * codec.frame_rate)
    rng = np.random.default_rng(0)
    rows = [{"file_id": i, "seq": 0, "frame_start": 0, "n_frames": frames, "channels": 1, "n_q": n_q,
             "codes": archive.pack_codes(rng.integers(0, 1024, (1, n_q, frames)), 10), "gains": None}
            for i in range(args.files)]
    per_shard = 500
    out: dict = {"files": args.files, "audio_seconds_per_file": args.seconds}

    # -- write ----------------------------------------------------------------------------------------
    dest = os.path.join(work, "arc")
    t = time.perf_counter()
    writers = []
    for s in range(0, len(rows), per_shard):
        w = archive.ShardWriter(os.path.join(dest, layout.shard_relpath(1, s // per_shard)), crec)
        for r in rows[s:s + per_shard]:
            w.add(r)
        w.close()
        writers.append((s, w))
    t_checked = time.perf_counter() - t
    shard_bytes = sum(w.bytes for _, w in writers)
    plain_dir = os.path.join(work, "plain")
    os.makedirs(plain_dir)
    schema = layout.CODES_SCHEMA.remove(layout.CODES_SCHEMA.get_field_index("crc32c"))
    t = time.perf_counter()
    for s in range(0, len(rows), per_shard):
        with pq.ParquetWriter(os.path.join(plain_dir, f"p{s}.parquet"), schema,
                              compression={"codes": "NONE"} | {n: "ZSTD" for n in schema.names if n != "codes"},
                              use_dictionary=False, write_statistics=["file_id"]) as pw:
            chunk = rows[s:s + per_shard]
            for g in range(0, len(chunk), 64):
                pw.write_table(pa.Table.from_pylist(chunk[g:g + 64], schema=schema))
    t_plain = time.perf_counter() - t
    out["write_mb_s_checked"] = round(shard_bytes / 1e6 / t_checked, 1)
    out["write_mb_s_plain"] = round(shard_bytes / 1e6 / t_plain, 1)

    # -- the archive around those shards ------------------------------------------------------------------
    entries = []
    for s, w in writers:
        rel = layout.shard_relpath(1, s // per_shard)
        for i in range(s, min(s + per_shard, len(rows))):
            n = frames * codec.hop_length
            entries.append(ManifestEntry(source=f"/bench/f{i:07d}.wav", relpath=f"f{i:07d}.wav", file_id=i, size=n * 2,
                                         content_hash="0" * 64, status=ARCHIVED, duration_s=n / codec.sample_rate,
                                         sample_rate=codec.sample_rate, channels=1, frames=n, codec_samples=n,
                                         codec_frames=frames, n_windows=1,
                                         locations=tuple(Location(rel, g, w.bytes, w.sha256) for g in w.where[i]),
                                         generation=1))
    archive.create_or_open(dest, codec, n_q)
    catalog.append(dest, entries, 1, "bench")

    # -- read ------------------------------------------------------------------------------------------
    pick = random.Random(0).sample(entries, min(200, len(entries)))
    t = time.perf_counter()
    for e in pick:
        list(archive.read_file_windows(dest, e, crec))
    t_read_checked = time.perf_counter() - t
    import pyarrow.compute as pc
    t = time.perf_counter()
    for e in pick:
        with open(os.path.join(dest, e.locations[0].shard), "rb") as f:
            tb = pq.ParquetFile(f).read_row_groups(sorted({loc.row_group for loc in e.locations}))
        for r in tb.filter(pc.equal(tb["file_id"], e.file_id)).to_pylist():
            archive.unpack_codes(r["codes"], (r["channels"], r["n_q"], r["n_frames"]), 10)
    t_read_plain = time.perf_counter() - t
    out["read_files_s_checked"] = round(len(pick) / t_read_checked, 1)
    out["read_files_s_plain"] = round(len(pick) / t_read_plain, 1)

    # -- verify ----------------------------------------------------------------------------------------
    rep = run_verify(dest)
    out["verify_gb_s"] = rep.gb_per_s
    out["verify_seconds"] = rep.seconds
    out["verify_bytes"] = rep.bytes_checked
    deep = run_verify(dest, deep=True)
    out["verify_deep_files_s"] = deep.files_per_s
    out["verify_deep_rows_s"] = round(deep.rows_checked / deep.seconds, 1) if deep.seconds else 0.0
    out["verify_deep_seconds"] = deep.seconds
    out["ok"] = rep.ok and deep.ok
    print(json.dumps(out, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
