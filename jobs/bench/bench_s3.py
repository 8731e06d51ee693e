"""Object-storage benchmark against a local SeaweedFS (``weed mini``) started for the run.

Prints:
  1. encode throughput s3->s3 vs local->local on the same small synthetic corpus (and the ratio);
  2. S3 requests per input file during that encode (the server's own request metrics);
  3. single-file restore latency and bytes fetched from an archive of many files (a synthetic archive in
     the real format: shards + catalog + record written directly, codes random, so that a few
     thousand files do not need a full encode on a laptop);
  4. driver memory (tracemalloc peak) while streaming input lists of 10k/50k/100k synthetic keys in waves
     of --commit-every, the way the encode job consumes them.

    PYTHONPATH=. python jobs/bench/bench_s3.py [--files 12] [--archive-files 2000] [--keys 10000,50000,100000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0)}


def bench_encode(s3, work: str, n_files: int, seconds: float) -> dict:
    from pipeline.encode import EncodeConfig, run_encode
    from pipeline.runtime import init_ray
    from tests.s3_fixtures import upload_tree, write_tones
    local_src = os.path.join(work, "src")
    write_tones(local_src, n_files, seconds=seconds)
    upload_tree(local_src, f"s3://{s3.bucket}/bench/src")
    init_ray()
    kw = dict(window_seconds=10.0, commit_every=max(1, n_files // 2), actors=1)
    run_encode(EncodeConfig(src=local_src, dest=os.path.join(work, "warm"), **kw))  # Ray + codec warm-up
    t = time.time()
    loc = run_encode(EncodeConfig(src=local_src, dest=os.path.join(work, "arc"), **kw))
    t_local = time.time() - t
    before = s3.request_counts()
    t = time.time()
    rem = run_encode(EncodeConfig(src=f"s3://{s3.bucket}/bench/src", dest=f"s3://{s3.bucket}/bench/arc", **kw))
    t_s3 = time.time() - t
    req = _delta(before, s3.request_counts())
    assert loc.files_archived == rem.files_archived == n_files, (loc, rem)
    return {"files": n_files, "audio_s": round(loc.audio_seconds, 1),
            "local_s": round(t_local, 2), "s3_s": round(t_s3, 2),
            "local_files_per_s": round(n_files / t_local, 2), "s3_files_per_s": round(n_files / t_s3, 2),
            "s3_over_local_throughput": round(t_local / t_s3, 3),
            "s3_requests": req, "s3_requests_per_input": round(sum(req.values()) / n_files, 2)}


def make_synthetic_archive(dest: str, n_files: int, per_shard: int = 250, per_gen: int = 500,
                           file_seconds: float = 10.0) -> tuple:
    """A valid archive of ``n_files`` one-window files with random codes, written straight to ``dest``."""
    import numpy as np

    from pipeline import archive
    from pipeline.codec import registry
    from pipeline.manifest import ARCHIVED, Location, ManifestEntry
    codec = registry.load(registry.DEFAULT_CODEC)
    n_q = codec.n_q_for_kbps(6.0)
    crec = codec.record(n_q)
    bits = archive.bits_for(codec.codebook_size)
    frames = int(file_seconds * codec.frame_rate)
    rng = np.random.default_rng(0)
    gens, fid = [], 0
    for g in range(1, (n_files + per_gen - 1) // per_gen + 1):
        entries = []
        n_gen = min(per_gen, n_files - fid)
        for s in range(0, n_gen, per_shard):
            rel = archive.shard_relpath(g, s // per_shard)
            w = archive.ShardWriter(f"{dest}/{rel}", crec)
            ids = []
            for _ in range(min(per_shard, n_gen - s)):
                codes = rng.integers(0, codec.codebook_size, (1, n_q, frames))
                w.add({"file_id": fid, "seq": 0, "frame_start": 0, "n_frames": frames, "channels": 1, "n_q": n_q,
                       "codes": archive.pack_codes(codes, bits)})
                ids.append(fid)
                fid += 1
            w.close()
            for i in ids:
                samples = frames * codec.hop_length
                entries.append(ManifestEntry(
                    source=f"s3://synthetic/f{i:06d}.wav", relpath=f"f{i:06d}.wav", file_id=i, size=samples * 2,
                    content_hash="0" * 64, status=ARCHIVED, duration_s=samples / codec.sample_rate,
                    sample_rate=codec.sample_rate, channels=1, frames=samples, codec_samples=samples,
                    codec_frames=frames, n_windows=1, archive_bytes=0,
                    locations=tuple(Location(rel, gi, w.bytes, w.sha256) for gi in w.where[i]), generation=g))
        if g == 1:
            archive.create_or_open(dest, codec, n_q)  # record, weights, catalog
        archive.catalog.append(dest, entries, g, "synthetic")
        gens.append(g)
    return crec, fid


def bench_restore(s3, work: str, n_files: int) -> dict:
    import s3fs

    from pipeline import storage
    from pipeline.restore import RestoreConfig, run_restore
    dest = f"s3://{s3.bucket}/bench/many"
    t = time.time()
    make_synthetic_archive(dest, n_files)
    build_s = time.time() - t
    fs, root = storage.fs_and_path(dest)
    total = sum(fs.du(root + "/shards", total=False).values())
    manifests = sum(fs.du(root + "/catalog", total=False).values())
    got: dict = {"get_requests": 0, "get_bytes": 0, "shard_bytes": 0, "other_requests": 0}
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *a, **k):
        out = await real(self, method, *a, **k)
        if method == "get_object":
            got["get_requests"] += 1
            n = int(out.get("ContentLength") or 0)
            got["get_bytes"] += n
            if "/shards/" in k.get("Key", ""):
                got["shard_bytes"] += n
        else:
            got["other_requests"] += 1
        return out
    s3fs.S3FileSystem._call_s3 = counting
    try:
        before = s3.request_counts()
        t = time.time()
        out = run_restore(RestoreConfig(dest=dest, out=os.path.join(work, "one"), patterns=(f"f{n_files // 2:06d}.wav",)))
        latency = time.time() - t
        req = _delta(before, s3.request_counts())
    finally:
        s3fs.S3FileSystem._call_s3 = real
    assert len(out.restored) == 1
    return {"archive_files": n_files, "synthetic_archive": True, "build_s": round(build_s, 1),
            "archive_shard_bytes": total, "archive_catalog_bytes": manifests,
            "restore_one_latency_s": round(latency, 3), "bytes_fetched": got["get_bytes"],
            "shard_bytes_fetched": got["shard_bytes"], "get_requests": got["get_requests"],
            "other_requests": got["other_requests"], "server_requests": req,
            "fraction_of_shards_fetched": round(got["shard_bytes"] / total, 5) if total else 0}


def bench_listing(work: str, counts: list[int], commit_every: int = 500) -> list[dict]:
    from pipeline.encode.inputs import _batches, _list_inputs, file_id_for
    out = []
    for n in counts:
        path = os.path.join(work, f"list-{n}.txt")
        with open(path, "w") as f:
            for i in range(n):
                f.write(f"s3://bucket/corpus/dir{i // 1000:04d}/file{i:07d}.flac\n")
        tracemalloc.start()
        t = time.time()
        seen = 0
        for wave in _batches(_list_inputs("s3://bucket/corpus", path), commit_every):
            items = [{"source": o.uri, "file_id": file_id_for(o.uri), "size": o.size, "prev_hash": ""}
                     for o in wave]
            seen += len(items)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seen == n
        out.append({"keys": n, "tracemalloc_peak_kib": round(peak / 1024, 1), "seconds": round(time.time() - t, 2)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=12, help="corpus files for the throughput comparison")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of audio per corpus file")
    ap.add_argument("--archive-files", type=int, default=2000, help="files in the restore archive")
    ap.add_argument("--keys", default="10000,50000,100000", help="input-list sizes for the memory test")
    ap.add_argument("--skip-encode", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from pipeline.devs3 import DevS3
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="audioarc-bench-") as work:
        results["listing_memory"] = bench_listing(work, [int(k) for k in args.keys.split(",") if k])
        print(json.dumps({"listing_memory": results["listing_memory"]}), flush=True)
        with DevS3(os.path.join(work, "s3")) as s3:
            os.environ.update(s3.env())  # the local dev server's own keys
            results["restore_one"] = bench_restore(s3, work, args.archive_files)
            print(json.dumps({"restore_one": results["restore_one"]}), flush=True)
            if not args.skip_encode:
                results["encode"] = bench_encode(s3, work, args.files, args.seconds)
                print(json.dumps({"encode": results["encode"]}), flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
