"""The pipeline against a plain script, side by side in one run, and its fixed costs.

    python -m jobs.bench_throughput [--minutes 10] [--clips 2000] [--clip-seconds 0.5] [--gens-files 200]

* A plain loop (soundfile decode -> soxr resample -> windows -> ``codec.encode`` with torch on every core) and
  ``audioarc encode --quality-sample 0`` with its defaults, on the same synthetic music-like FLAC files
  (``--minutes`` of audio in 1-3 minute files): x realtime each and their ratio.
* A one-file job end to end (CLI in a fresh process, Ray start-up included).
* The cost of a generation boundary: the same files with ``--commit-every`` 10 and 5000 (per boundary: the wall
  difference over the number of extra generations).
* Small files: ``--clips`` clips of ``--clip-seconds`` at 1.5 kbps, files/s of the pipeline and of the loop.
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
from pathlib import Path

import numpy as np
import soundfile as sf


def _synth(path: Path, seconds: float, rate: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.2 * np.sin(2 * np.pi * (220 + 110 * np.sin(0.1 * t + seed)) * t) + 0.05 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), rate)


def plain_loop(files: list[Path], bitrate: float, threads: int) -> tuple[float, float]:
    """What a user's 30-line script does; returns (audio seconds, wall seconds)."""
    import torch

    from pipeline import archive, audio
    from pipeline.codec import registry
    from pipeline.codec.windows import encode_array
    torch.set_num_threads(threads)
    codec = registry.load(registry.DEFAULT_CODEC)
    n_q = codec.n_q_for_kbps(bitrate)
    t = time.perf_counter()
    secs = 0.0
    with torch.inference_mode():
        for p in files:
            x, sr = sf.read(str(p), dtype="float32", always_2d=True)
            secs += x.shape[0] / sr
            r = audio.Resampler(sr, codec.sample_rate, x.shape[1])
            y = np.concatenate([r.process(x.T), r.flush()], axis=1)
            for ch in y:
                codes = encode_array(codec, ch[None], n_q, window_frames=int(30 * codec.frame_rate))
                archive.pack_codes(np.asarray(codes), 10)
    return secs, time.perf_counter() - t


def pipeline_run(src: Path, dest: Path, *extra: str) -> tuple[dict, float]:
    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", str(src), str(dest), "--quality-sample", "0",
                        "--json", *extra], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout), wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--clip-seconds", type=float, default=0.5)
    ap.add_argument("--gens-files", type=int, default=200)
    ap.add_argument("--work", default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["long", "one", "gens", "clips"])
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-throughput-"))
    threads = os.cpu_count() or 1
    out: dict = {"cpus": threads}
    if "long" not in args.skip:
        src = work / "music"
        left, i = args.minutes * 60, 0
        while left > 0:
            secs = min(left, 60 + 60 * (i % 3))
            p = src / f"t{i:03d}.flac"
            if not p.exists():
                _synth(p, secs, 44100, i)
            left -= secs
            i += 1
        files = sorted(src.glob("*.flac"))
        s, wall = pipeline_run(src, work / "arc-music")
        a, w = plain_loop(files, 6.0, threads)
        out["long"] = {"audio_minutes": round(a / 60, 1), "pipeline_x": round(s["audio_seconds"] / wall, 1),
                       "pipeline_wall_s": round(wall, 1), "loop_x": round(a / w, 1), "loop_wall_s": round(w, 1),
                       "ratio": round((s["audio_seconds"] / wall) / (a / w), 2)}
        print(json.dumps({"long": out["long"]}), flush=True)
    if "one" not in args.skip:
        one = work / "one"
        _synth(one / "x.flac", 30, 44100, 0)
        _, wall = pipeline_run(one, work / "arc-one")
        out["one_file_job_s"] = round(wall, 1)
        print(json.dumps({"one_file_job_s": out["one_file_job_s"]}), flush=True)
    if "gens" not in args.skip:
        g = work / "gens"
        for k in range(args.gens_files):
            p = g / f"g{k:04d}.wav"
            if not p.exists():
                _synth(p, 2.0, 16000, k)
        s_small, w_small = pipeline_run(g, work / "arc-gens", "--commit-every", "10")
        s_big, w_big = pipeline_run(g, work / "arc-gens", "--commit-every", "5000")
        extra = -(-args.gens_files // 10) - 1
        out["generation_boundary_s"] = round((w_small - w_big) / max(1, extra), 3)
        out["commit_every_10_wall_s"], out["commit_every_5000_wall_s"] = round(w_small, 1), round(w_big, 1)
        print(json.dumps({k: out[k] for k in ("generation_boundary_s", "commit_every_10_wall_s",
                                              "commit_every_5000_wall_s")}), flush=True)
    if "clips" not in args.skip:
        c = work / f"clips-{args.clip_seconds:g}"
        for k in range(args.clips):
            p = c / f"d{k // 1000:02d}" / f"c{k:05d}.wav"
            if not p.exists():
                _synth(p, args.clip_seconds, 16000, k)
        files = sorted(c.rglob("*.wav"))
        s, wall = pipeline_run(c, work / "arc-clips", "--bitrate", "1.5")
        _, w = plain_loop(files, 1.5, threads)
        out["clips"] = {"clips": args.clips, "seconds_each": args.clip_seconds,
                        "pipeline_files_s": round(s["files_archived"] / wall, 1), "loop_files_s": round(len(files) / w, 1),
                        "pipeline_ms_per_file": round(1000 * wall / s["files_archived"], 2)}
        print(json.dumps({"clips": out["clips"]}), flush=True)
    print(json.dumps(out, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
