"""Catalog at library scale: synthetic catalogs of 10k-10M entries over a few real shards, measured in fresh processes.

    python -m jobs.bench.bench_catalog [--sizes 10000 100000 1000000 10000000] [--work DIR] [--noop-files 20000]

Per size it prints: restore of one file by name (CLI in a fresh process, start-up included: wall and peak RSS),
``inspect``, the first row of ``ls --jsonl``, catalog bytes, and the cost of committing one more 500-file generation,
before and after ``audioarc compact``. Then a no-op re-run of an archive of ``--noop-files`` real (tiny) files whose
catalog rows match their listing: wall time, whether Ray started, and the bytes the process read.
Rows are generated (not encoded); each points at one of 100 real files' codes in one real shard, so restoring any
entry decodes real codes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

N_REAL = 100
CHUNK = 1_000_000


def _real_shard(dest: str):
    """One shard of N_REAL one-window files of random codes; returns (codec record, [(bytes, sha, row group)])."""
    import numpy as np

    from pipeline import archive
    from pipeline.archive import layout
    from pipeline.codec import registry
    codec = registry.load(registry.DEFAULT_CODEC)
    n_q = codec.n_q_for_kbps(6.0)
    archive.create_or_open(dest, codec, n_q)
    crec = codec.record(n_q)
    frames = 75 * 10
    rng = np.random.default_rng(0)
    w = archive.ShardWriter(os.path.join(dest, layout.shard_relpath(1, 0)), crec)
    for fid in range(N_REAL):
        w.add({"file_id": fid, "seq": 0, "frame_start": 0, "n_frames": frames, "channels": 1, "n_q": n_q,
               "codes": archive.pack_codes(rng.integers(0, 1024, (1, n_q, frames)), 10)})
    w.close()
    return crec, frames, w


def _rows(start: int, n: int, frames: int, w, gen: int):
    import numpy as np
    import pyarrow as pa

    from pipeline.archive import layout
    i = np.arange(start, start + n)
    rel = [f"lib/{k // 1000:05d}/file{k:08d}.wav" for k in i.tolist()]
    fid = (i % N_REAL).astype(np.int64)
    samples = frames * 320
    loc_rg = pa.array([w.where[int(f)][0] for f in range(N_REAL)], pa.int32()).take(pa.array(fid))
    locs = pa.StructArray.from_arrays(
        [pa.array(["shards/g000001/part-00000.parquet"] * n), loc_rg, pa.array(np.full(n, w.bytes), pa.int64()),
         pa.array([w.sha256] * n)], fields=list(layout.LOCATION_TYPE))
    cols = {
        "source": pa.array(["/synthetic/" + r for r in rel]), "relpath": pa.array(rel), "file_id": pa.array(fid),
        "size": pa.array(np.full(n, samples * 2), pa.int64()), "content_hash": pa.array(["0" * 64] * n),
        "status": pa.array(["archived"] * n), "reason": pa.array([""] * n),
        "duration_s": pa.array(np.full(n, samples / 24000.0)), "sample_rate": pa.array(np.full(n, 24000), pa.int32()),
        "channels": pa.array(np.ones(n), pa.int32()), "frames": pa.array(np.full(n, samples), pa.int64()),
        "codec_samples": pa.array(np.full(n, samples), pa.int64()), "codec_frames": pa.array(np.full(n, frames), pa.int64()),
        "n_windows": pa.array(np.ones(n), pa.int32()), "archive_bytes": pa.array(np.full(n, 1000), pa.int64()),
        "locations": pa.ListArray.from_arrays(pa.array(np.arange(n + 1), pa.int32()), locs),
        "generation": pa.array(np.full(n, gen), pa.int32()), "encoded_at": pa.array(["2026-12-03T00:00:00+00:00"] * n),
        "source_version": pa.array(["1"] * n), "reason_code": pa.array([""] * n),
    }
    return pa.table(cols, schema=layout.CATALOG_SCHEMA)


def build(dest: str, n: int) -> None:
    from deltalake import CommitProperties, write_deltalake

    from pipeline import storage
    from pipeline.archive import catalog
    crec, frames, w = _real_shard(dest)
    uri, opts = storage.delta_location(storage.join(dest, "catalog"))
    gen = 1
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        tot = {"files": k, "archived": k, "failed": 0, "seconds": k * frames * 320 / 24000.0,
               "source_bytes": k * frames * 640, "archive_bytes": k * 1000, "pcm_bytes": k * frames * 640,
               "generations": 1}
        write_deltalake(uri, _rows(start, k, frames, w, gen), mode="append", storage_options=opts,
                        writer_properties=catalog._writer_properties(),
                        commit_properties=CommitProperties(custom_metadata={
                            "audioarc.generation": str(gen), "audioarc.totals": json.dumps(tot)}))
        gen += 1
    os.makedirs(os.path.join(dest, "_gens"), exist_ok=True)
    for g in range(1, gen):
        open(os.path.join(dest, "_gens", f"g{g:06d}.json"), "w").write('{"job_id": "bench"}')


def timed(cmd: list[str], env=None) -> dict:
    """Wall seconds and peak RSS (MiB) of one fresh process."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    rss = int(p.stderr.strip().splitlines()[-1]) / 1024 if p.stderr.strip() else 0.0
    if p.returncode not in (0, 3):
        raise RuntimeError(f"{cmd}: exit {p.returncode}: {p.stderr[-2000:]}")
    return {"wall_s": round(wall, 3), "rss_mib": round(rss, 1)}


def first_ls_row(dest: str) -> float:
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ls", dest, "--jsonl"], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    dt = time.perf_counter() - t
    p.kill()
    p.wait()
    return round(dt, 3)


def commit_cost(dest: str) -> float:
    from pipeline.archive import catalog
    from pipeline.manifest import ManifestEntry
    es = [ManifestEntry(source=f"/synthetic/new/{i}.wav", relpath=f"new/{i}.wav", file_id=i, size=1,
                        content_hash="0", status="archived", generation=999999) for i in range(500)]
    t = time.perf_counter()
    catalog.append(dest, es, 999999, "bench", totals={"files": 500, "archived": 500, "generations": 1})
    return round(time.perf_counter() - t, 3)


def measure(dest: str, n: int, out_dir: str) -> dict:
    py = [sys.executable, "-m", "pipeline.cli"]
    name = f"file{n // 2:08d}.wav"
    r = {"restore_one": timed(py + ["restore", dest, os.path.join(out_dir, "one"), f"lib/{(n // 2) // 1000:05d}/{name}"]),
         "restore_by_basename": timed(py + ["restore", dest, os.path.join(out_dir, "two"), name]),
         "inspect": timed(py + ["inspect", dest, "--json"]),
         "first_ls_row_s": first_ls_row(dest),
         "catalog_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(dest, "catalog"))
                              for f in fs)}
    return r


def noop_rerun(work: str, n_files: int) -> dict:
    """An archive whose catalog matches ``n_files`` real files (as an encode would have left it), re-run."""
    import numpy as np
    import soundfile as sf

    from pipeline import archive, storage
    from pipeline.archive import catalog
    from pipeline.codec import registry
    from pipeline.manifest import ManifestEntry
    src, dest = os.path.join(work, "noop-src"), os.path.join(work, "noop-arc")
    x = (0.1 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    for i in range(n_files):
        d = os.path.join(src, f"d{i // 1000:03d}")
        os.makedirs(d, exist_ok=True)
        sf.write(os.path.join(d, f"c{i:06d}.wav"), x, 16000)
    codec = registry.load(registry.DEFAULT_CODEC)
    archive.create_or_open(dest, codec, codec.n_q_for_kbps(6.0))
    entries = []
    for info in storage.walk_files(src, (".wav",)):
        entries.append(ManifestEntry(source=info.uri, relpath=storage.relpath(src, info.uri), file_id=0, size=info.size,
                                     content_hash="x", status="archived", duration_s=0.1, generation=1,
                                     source_version=info.version))
    catalog.append(dest, entries, 1, "bench", totals={"files": len(entries), "archived": len(entries), "generations": 1})
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv=['audioarc', 'encode', sys.argv[1], sys.argv[2], "
                        "'--json', '--quality-sample', '0', '--commit-every', '5000']; "
                        "from pipeline.cli import main; rc = main(sys.argv[1:]); "
                        "io = open('/proc/self/io').read(); print(io, file=sys.stderr); sys.exit(rc)", src, dest],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    s = json.loads(p.stdout)
    io = dict(line.split(": ") for line in p.stderr.strip().splitlines()[-7:] if ": " in line)
    audio_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
    return {"files": n_files, "wall_s": round(wall, 2), "files_skipped": s["files_skipped"],
            "ray_started": s["placement"] is not None, "process_read_bytes(rchar)": int(io.get("rchar", 0)),
            "audio_bytes_on_disk": audio_bytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--noop-files", type=int, default=20_000)
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bench-catalog-")
    os.makedirs(work, exist_ok=True)
    results = []
    for n in args.sizes:
        dest = os.path.join(work, f"arc-{n}")
        shutil.rmtree(dest, ignore_errors=True)
        t = time.perf_counter()
        build(dest, n)
        row = {"entries": n, "build_s": round(time.perf_counter() - t, 1)}
        row["as_appended"] = measure(dest, n, os.path.join(work, f"out-{n}-a"))
        row["as_appended"]["commit_one_generation_s"] = commit_cost(dest)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "compact", dest, "--vacuum-hours", "0"], check=True,
                       capture_output=True)
        row["compact_s"] = round(time.perf_counter() - t, 1)
        row["compacted"] = measure(dest, n, os.path.join(work, f"out-{n}-b"))
        row["compacted"]["commit_one_generation_s"] = commit_cost(dest)
        print(json.dumps(row), flush=True)
        results.append(row)
        shutil.rmtree(dest, ignore_errors=True)
    if args.noop_files:
        print(json.dumps({"noop_rerun": noop_rerun(work, args.noop_files)}), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
