"""What ``audioarc rebitrate`` buys: a lower-rate archive from a higher-rate one vs re-encoding from source.

    python -m jobs.bench.bench_rebitrate [--files 16] [--seconds 10] [--source-kbps 12] [--rates 6 1.5] [--work DIR]

Speech-like input (espeak-ng sentences when it is installed, else chirps from tests/audio_factory) is archived
once at ``--source-kbps``; then, per rate B:

* ``audioarc rebitrate SRC_ARCHIVE NEW --bitrate B`` vs ``audioarc encode SRC NEW2 --bitrate B`` (each its own
  process, as a user runs them): wall seconds of the process and of the job itself, audio seconds/s, files/s;
* archive bytes before (the source archive) and after;
* quality against the originals of the prefix archive and of the direct encode (both restored at the original
  rate): multi-scale log-mel distance and STOI, means over files; and how many code indices the two agree on per
  stage (neural_rvq's 1.5 kbps encoder searches its two stages jointly, so a plain prefix of greedy higher-rate
  codes differs from a fresh 1.5 kbps encode there).
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

SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the gate.",
    "Archives of recorded sound must survive decades of changing formats and storage systems.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother.",
    "A residual quantizer refines the error left by every stage before it, one codebook at a time.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her on Wednesday at the train station.",
    "When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow.",
]
VOICES = ["en", "en-us", "en+f3", "en+m3", "en-gb", "en+f2"]


def make_corpus(src: str, files: int, seconds: float) -> str:
    import numpy as np
    import soundfile as sf
    os.makedirs(src, exist_ok=True)
    espeak = shutil.which("espeak-ng")
    for i in range(files):
        path = os.path.join(src, f"speech/s{i:03d}.wav")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if espeak:
            parts, rate, n = [], 22050, 0
            j = i
            while n < seconds * rate:  # sentences until the file is long enough
                tmp = path + ".part.wav"
                subprocess.run([espeak, "-v", VOICES[i % len(VOICES)], "-s", str(150 + 10 * (i % 4)), "-w", tmp,
                                SENTENCES[j % len(SENTENCES)]], check=True, capture_output=True)
                x, rate = sf.read(tmp, dtype="float32")
                os.remove(tmp)
                parts += [x, np.zeros(int(0.3 * rate), np.float32)]
                n += len(x) + int(0.3 * rate)
                j += 3
            sf.write(path, np.concatenate(parts)[: int(seconds * rate)] * 0.9, rate)
        else:
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            from pathlib import Path

            from tests import audio_factory as af
            af.write(Path(path), seconds, 16000, 1, kind="chirp", freq=120.0 + 20 * i)
    return "espeak-ng" if espeak else "tests/audio_factory chirps"


def cli(*args: str) -> tuple[dict | list, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args), "--json"], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"audioarc {' '.join(map(str, args))}: exit {p.returncode}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout), wall


def quality(src: str, out: str) -> dict:
    import numpy as np
    import soundfile as sf

    from pipeline.codec import metrics
    mel, stoi = [], []
    for root, _, names in os.walk(src):
        for n in sorted(names):
            ref, rate = sf.read(os.path.join(root, n), dtype="float32")
            deg, _ = sf.read(os.path.join(out, os.path.relpath(root, src), n), dtype="float32")
            mel.append(metrics.mel_distance(ref, deg, rate))
            s = metrics.stoi(ref, deg, rate)
            if s is not None:
                stoi.append(s)
    return {"mel": float(np.mean(mel)), "stoi": float(np.mean(stoi)) if stoi else None}


def agreement(a: str, b: str) -> list[float]:
    """Per stage, the share of code indices archive ``a`` and ``b`` agree on (same files, same rate)."""
    import numpy as np

    from pipeline import archive
    ra, ea = archive.open_archive(a)
    rb, eb = archive.open_archive(b)
    same, total = None, 0
    for src, e in ea.items():
        x = np.concatenate([c for _, c in archive.read_file_codes(a, e, ra.codec)], axis=2)
        y = np.concatenate([c for _, c in archive.read_file_codes(b, eb[src], rb.codec)], axis=2)
        eq = (x == y).sum(axis=(0, 2))
        same = eq if same is None else same + eq
        total += x.shape[0] * x.shape[2]
    return [round(float(s) / total, 4) for s in same]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per file")
    ap.add_argument("--source-kbps", type=float, default=12.0)
    ap.add_argument("--rates", type=float, nargs="+", default=[6.0, 1.5])
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bench-rebitrate-")
    shutil.rmtree(work, ignore_errors=True)
    src = os.path.join(work, "src")
    kind = make_corpus(src, args.files, args.seconds)
    base = os.path.join(work, f"a{args.source_kbps:g}")
    enc, enc_wall = cli("encode", src, base, "--bitrate", args.source_kbps, "--quality-sample", "0")
    out = {"corpus": kind, "files": enc["files_archived"], "audio_seconds": enc["audio_seconds"],
           "source_kbps": args.source_kbps, "source_archive_bytes": enc["archive_bytes"],
           "source_encode_wall_s": round(enc_wall, 2), "rates": {}}
    print(f"corpus: {out['files']} files, {out['audio_seconds']:.0f} s of audio ({kind}); source archive at "
          f"{args.source_kbps:g} kbps: {enc['archive_bytes']} bytes (encode {enc_wall:.1f} s)")
    for b in args.rates:
        pre, fresh = os.path.join(work, f"prefix{b:g}"), os.path.join(work, f"fresh{b:g}")
        rb, rb_wall = cli("rebitrate", base, pre, "--bitrate", b)
        en, en_wall = cli("encode", src, fresh, "--bitrate", b, "--quality-sample", "0")
        assert cli("verify", pre, "--deep")[0]["ok"]
        q = {}
        for name, arc in (("prefix", pre), ("fresh", fresh)):
            o = os.path.join(work, f"out-{name}{b:g}")
            cli("restore", arc, o, "--format", "wav")
            q[name] = quality(src, o)
        secs = rb["audio_seconds"]
        r = {
            "rebitrate_wall_s": round(rb_wall, 2), "rebitrate_job_s": rb["wall_seconds"],
            "encode_wall_s": round(en_wall, 2), "encode_job_s": en["wall_seconds"],
            "rebitrate_audio_s_per_s": round(secs / rb_wall, 1),
            "rebitrate_files_per_s": round(rb["files_rebitrated"] / rb_wall, 2),
            "rebitrate_job_audio_s_per_s": round(secs / rb["wall_seconds"], 1),
            "rebitrate_copy_audio_s_per_s": rb["copy_x_realtime"],
            "encode_audio_s_per_s": round(secs / en_wall, 1),
            "encode_files_per_s": round(en["files_archived"] / en_wall, 2),
            "speedup_wall": round(en_wall / rb_wall, 1),
            "speedup_job": round(en["wall_seconds"] / rb["wall_seconds"], 1),
            "bytes_before": rb["bytes_before"], "bytes_after": rb["bytes_after"], "fresh_bytes": en["archive_bytes"],
            "quality_prefix": q["prefix"], "quality_fresh": q["fresh"],
            "mel_prefix_minus_fresh": round(q["prefix"]["mel"] - q["fresh"]["mel"], 4),
            "stoi_prefix_minus_fresh": (round(q["prefix"]["stoi"] - q["fresh"]["stoi"], 4)
                                        if q["prefix"]["stoi"] is not None else None),
            "code_agreement_per_stage": agreement(pre, fresh),
        }
        out["rates"][f"{b:g}"] = r
        st = (lambda d: f"{d['stoi']:.3f}" if d["stoi"] is not None else "n/a")
        print(f"\n{args.source_kbps:g} -> {b:g} kbps")
        print(f"  rebitrate: {rb_wall:.2f} s process ({rb['wall_seconds']:.2f} s job): "
              f"{r['rebitrate_audio_s_per_s']:g} audio s/s ({r['rebitrate_job_audio_s_per_s']:g} in the job, "
              f"{r['rebitrate_copy_audio_s_per_s']:g} in its copy loop: the rate at library scale), "
              f"{r['rebitrate_files_per_s']:g} files/s")
        print(f"  encode:    {en_wall:.2f} s process ({en['wall_seconds']:.2f} s job): {r['encode_audio_s_per_s']:g} "
              f"audio s/s, {r['encode_files_per_s']:g} files/s")
        r["speedup_copy"] = round(r["rebitrate_copy_audio_s_per_s"] / (secs / en["wall_seconds"]), 1)
        print(f"  speed-up:  {r['speedup_wall']:g}x (process), {r['speedup_job']:g}x (job), {r['speedup_copy']:g}x "
              f"(copy loop vs encode job)")
        print(f"  bytes:     {rb['bytes_before']} -> {rb['bytes_after']} (fresh encode: {en['archive_bytes']})")
        print(f"  quality vs original: prefix mel {q['prefix']['mel']:.4f} STOI {st(q['prefix'])}; fresh mel "
              f"{q['fresh']['mel']:.4f} STOI {st(q['fresh'])}; prefix - fresh: mel "
              f"{r['mel_prefix_minus_fresh']:+.4f}, "
              f"STOI {r['stoi_prefix_minus_fresh'] if r['stoi_prefix_minus_fresh'] is not None else 'n/a'}")
        print(f"  codes equal to the fresh encode's, per stage: {r['code_agreement_per_stage']}")
    print("\n" + json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
