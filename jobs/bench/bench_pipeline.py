"""Benchmark the encode pipeline on this machine (prints figures; not a test).

    python -m jobs.bench.bench_pipeline [--files 6 --minutes 3 --long-hours 3]

Prints: end-to-end audio-seconds per second, the codec's own encode speed in the same run (pipeline
efficiency = their ratio), archive bytes per audio second vs the nominal bitrate, and the peak RSS of the
worker-side path (decode + resample + window + encode + pack) for a long vs a short input.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def synth(path: Path, seconds: float, rate: int = 44100, seed: int = 0, block_s: float = 60.0,
          channels: int = 1) -> None:
    """Music-like test signal (tones + noise bursts), written block by block (no full array in memory)."""
    rng = np.random.default_rng(seed)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=channels, format="FLAC") as f:
        done = 0
        total = int(seconds * rate)
        while done < total:
            n = min(int(block_s * rate), total - done)
            t = (done + np.arange(n)) / rate
            x = 0.2 * np.sin(2 * np.pi * (220 + 110 * np.sin(0.1 * t)) * t) + 0.05 * rng.standard_normal(n)
            if channels > 1:
                x = np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1)
            f.write(x.astype(np.float32))
            done += n


def codec_speed(codec_name: str, n_q: int, seconds: float = 60.0, threads: int = 1) -> float:
    import torch

    from pipeline.codec import load
    from pipeline.codec.windows import encode_array
    torch.set_num_threads(threads)
    c = load(codec_name)
    x = (0.1 * np.random.default_rng(0).standard_normal((1, int(seconds * c.sample_rate)))).astype(np.float32)
    encode_array(c, x[:, : c.sample_rate], n_q)  # warm up
    t = time.perf_counter()
    encode_array(c, x, n_q, window_frames=int(30 * c.frame_rate))
    return seconds / (time.perf_counter() - t)


def host_decode_speed(path: Path, codec_name: str) -> float:
    """x realtime of the host-side stage alone (``decode_file``: read, hash, decode, resample to the codec
    rate, cut windows with context) for one file in this process, on one core: what a GPU job needs in
    CPU cores per unit of codec throughput (deploy/SCALING.md)."""
    from pipeline.codec import load
    from pipeline.encode import decode_file
    c = load(codec_name)
    geom = c.info()
    item = {"source": str(path), "file_id": 1, "size": path.stat().st_size, "prev_hash": ""}
    t = time.perf_counter()
    duration = None
    for row in decode_file(item, geom, window_frames=int(30 * c.frame_rate)):
        if row["kind"] != "win":
            duration = json.loads(row["info"]).get("duration_s")
    return duration / (time.perf_counter() - t)


RSS_CHILD = r"""
import resource, sys, json
from pipeline.codec import load
from pipeline.encode import decode_file
from pipeline import archive
import numpy as np, torch
torch.set_num_threads(1)
c = load(sys.argv[2]); geom = c.info(); ctx = sum(c.encode_context)
item = {"source": sys.argv[1], "file_id": 1, "size": 1, "prev_hash": ""}
n = 0
for row in decode_file(item, geom, window_frames=int(30 * c.frame_rate)):
    if row["kind"] == "win":
        x = np.frombuffer(row["payload"], np.float32).reshape(row["channels"], -1)
        archive.pack_codes(c.encode(torch.from_numpy(x)[:, None, :], c.n_q_for_kbps(6)).numpy(), 10)
        n += 1
    else:
        info = json.loads(row["info"])
print(json.dumps({"windows": n, "status": info["status"], "duration_s": info.get("duration_s"),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def worker_rss(path: Path, codec: str) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), codec], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--long-hours", type=float, default=3.0, help="length of the long input for peak RSS")
    from pipeline.codec.registry import DEFAULT_CODEC
    ap.add_argument("--codec", default=DEFAULT_CODEC)
    ap.add_argument("--bitrate", type=float, default=6.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-rss", action="store_true", help="skip the long-input peak RSS measurement")
    ap.add_argument("--quality-overhead", action="store_true",
                    help="also encode with the default quality sampling (2%%) and print its overhead")
    args = ap.parse_args(argv)
    from pipeline.codec import load
    from pipeline.encode import EncodeConfig, run_encode
    from pipeline.runtime import init_ray

    wd = args.workdir or Path(tempfile.mkdtemp(prefix="audioarc-bench-"))
    src = wd / "src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(args.files):
        p = src / f"track{i:02d}.flac"
        if not p.exists():
            synth(p, args.minutes * 60, seed=i)
    n_q = load(args.codec).n_q_for_kbps(args.bitrate)
    codec_x = codec_speed(args.codec, n_q)
    init_ray()
    import shutil
    shutil.rmtree(wd / "archive", ignore_errors=True)
    t = time.perf_counter()
    s = run_encode(EncodeConfig(src=str(src), dest=str(wd / "archive"), codec=args.codec,
                                bitrate_kbps=args.bitrate))
    wall = time.perf_counter() - t
    codec_x = max(codec_x, codec_speed(args.codec, n_q))  # best of before/after: less noise from other load
    e2e = s.audio_seconds / wall
    print(f"corpus: {args.files} mono 44.1 kHz FLAC files x {args.minutes:g} min = {s.audio_seconds / 60:.1f} min")
    print(f"end-to-end encode: {e2e:.1f} audio-seconds per second ({wall:.1f} s wall, Ray already started)")
    print(f"codec alone ({args.codec}, 1 thread, same run): {codec_x:.1f}x realtime")
    print(f"pipeline efficiency: {e2e / codec_x:.2f}")
    print(f"archive bytes: {s.archive_bytes} for {s.audio_seconds:.1f} s = {s.effective_kbps:.3f} kbps stored vs "
          f"{s.bitrate_kbps:g} nominal ({100 * (s.effective_kbps / s.bitrate_kbps - 1):+.2f}%)")
    if args.quality_overhead:
        from pipeline.quality import QualityConfig
        for visqol in (False, True):
            shutil.rmtree(wd / "archive-q", ignore_errors=True)
            t = time.perf_counter()
            sq = run_encode(EncodeConfig(src=str(src), dest=str(wd / "archive-q"), codec=args.codec,
                                         bitrate_kbps=args.bitrate, quality=QualityConfig(visqol=visqol)))
            wq = time.perf_counter() - t
            n = sq.quality["summary"]["files_sampled"] if sq.quality else 0
            print(f"quality sampling at 2% (visqol {'on' if visqol else 'off'}): {n} of {sq.files_archived} files "
                  f"sampled, wall {wq:.1f} s vs {wall:.1f} s without: overhead {100 * (wq / wall - 1):+.1f}%")
    stereo = wd / "stereo44k.flac"
    if not stereo.exists():
        synth(stereo, 300, rate=44100, channels=2)
    host = max(host_decode_speed(stereo, args.codec) for _ in range(2))
    print(f"host side alone (decode_file: FLAC decode + sha256 + resample to {load(args.codec).sample_rate} Hz + "
          f"windows), 44.1 kHz stereo FLAC: {host:.0f}x realtime on one core")
    if args.skip_rss:
        return
    short = wd / "short.flac"
    long = wd / "long.flac"
    if not short.exists():
        synth(short, 180, rate=16000)
    if not long.exists():
        synth(long, args.long_hours * 3600, rate=16000)
    r_short, r_long = worker_rss(short, args.codec), worker_rss(long, args.codec)
    print(f"worker peak RSS: 3-minute input {r_short['peak_rss_mib']:.0f} MiB, {args.long_hours:g}-hour input "
          f"{r_long['peak_rss_mib']:.0f} MiB ({r_long['windows']} windows)")


if __name__ == "__main__":
    main()
