"""Evaluate codecs against Opus / MP3 on the same 24 kHz mono references.

    python -m jobs.tools.codec_eval [DIR] --bitrates 1.5 3 6 12 --codec neural_rvq [--baselines opus mp3]
                              [--max-files 4] [--seconds 8] [--native] [--out-dir .data/eval]

``DIR`` defaults to the Debian corpus; only its held-out files are used (``--all-files`` to lift
that, e.g. for a folder of your own). Per codec x bitrate x content kind it reports the mean
multi-scale log-mel distance (lower is better; "mel", 3 scales, and "mel7", the 7-scale distance issue 20
measures with, ``metrics.mel7_distance``), SI-SDR (dB), STOI (speech files), ViSQOL
(audio mode, if ``visqol-python`` is installed), the share of decoded energy above 2 kHz in stationary tones the
reference lacks (``metrics.tonal_peak_share``, "tones"), the bitrate actually spent and encode/decode speed
(x realtime; for the ffmpeg baselines this includes process start-up). MP3 runs only at the bitrates
MPEG-2 layer III has at 24 kHz (8, 16, 24, ... kbps), so add 24 to ``--bitrates`` to see it. Writes ``results.csv``
(per file), ``summary.json`` and ``summary.md`` to ``--out-dir``.

``--native`` scores at each reference's own rate instead (mono, 16-48 kHz), the way a user compares a restored
file: the codec under test gets the reference resampled to its 24 kHz and its decode is resampled back (what
``audioarc restore`` does), Opus encodes the reference as it is (libopus resamples to 48 kHz and keeps what its
bandwidth at that bitrate allows), MP3 at 24 kHz (MPEG-2's low bitrates) decoded back to the reference's rate.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

RATE = 24000
#: the bitrates MPEG-2 layer III allows at 24 kHz (MP3 cannot go below 8 kbps)
MP3_KBPS_24K = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)


# -- references -------------------------------------------------------------------------------------
def load_references(root: Path, max_files: int, seconds: float, heldout_only: bool, seed: int = 0,
                    min_seconds: float = 3.0, segments_per_file: int = 2, rate: int | None = RATE):
    """Up to ``max_files`` references per content kind: files of at least ``min_seconds`` (short clips
    make STOI/ViSQOL unreliable), cut to the loudest ``seconds`` of each of ``segments_per_file`` equal
    parts of long files (music), so a few long held-out songs still give several references. Mono at ``rate``
    (``None``: each file's own rate, in ``ref["rate"]``)."""
    from pipeline import audio, corpus
    from pipeline.audio import pick_segment
    files = corpus.audio_files(root)
    if heldout_only:
        files = [p for p in files if corpus.is_heldout(p)]
    by_kind: dict[str, list[Path]] = {}
    for p in files:
        by_kind.setdefault(corpus.kind_of(p), []).append(p)
    rng = np.random.default_rng(seed)
    refs = []
    for kind, paths in sorted(by_kind.items()):
        order = rng.permutation(len(paths))
        taken = 0
        for i in order:
            if taken >= max_files:
                break
            p = paths[i]
            try:
                x, sr = audio.load(str(p), rate, mono=True)
            except Exception as e:
                print(f"skip {p}: {e}")
                continue
            x = x[0]
            if len(x) < min_seconds * sr:
                continue
            n = int(seconds * sr)
            parts = max(1, min(segments_per_file, len(x) // max(n, 1)))
            edges = np.linspace(0, len(x), parts + 1).astype(int)
            for j in range(parts):
                if taken >= max_files:
                    break
                seg = pick_segment(x[edges[j]:edges[j + 1]], n)
                if np.sqrt(np.mean(seg ** 2)) < 1e-3:
                    continue  # silent: nothing to score
                peak = np.abs(seg).max()
                if peak > 0.99:
                    seg = seg * (0.99 / peak)
                name = p.name if parts == 1 else f"{p.name}#{j}"
                refs.append({"name": name, "path": str(p), "kind": kind, "audio": seg.astype(np.float32),
                             "rate": sr})
                taken += 1
    return refs


# -- codecs under test ------------------------------------------------------------------------------
def run_neural(codec, x: np.ndarray, kbps: float, rate: int = RATE):
    """-> (decoded [T], actual kbps, encode xRT, decode xRT) or None when kbps is not on the ladder. ``x`` at
    ``rate``: resampled to the codec's rate and back, as a restore does (the resampling is not timed)."""
    from pipeline import archive, audio
    from pipeline.codec.windows import decode_array, encode_array
    try:
        n_q = codec.n_q_for_kbps(kbps)
    except ValueError:
        return None
    dur = len(x) / rate
    xc = x[None] if rate == codec.sample_rate else audio.resample(x[None], rate, codec.sample_rate)
    t0 = time.perf_counter()
    codes = encode_array(codec, xc, n_q)
    t1 = time.perf_counter()
    y = decode_array(codec, codes, xc.shape[1])
    t2 = time.perf_counter()
    y = y[0] if rate == codec.sample_rate else audio.fit_length(audio.resample(y, codec.sample_rate, rate), len(x))[0]
    bits = codes.shape[1] * codes.shape[2] * archive.bits_for(codec.codebook_size)
    return y, bits / dur / 1000, dur / (t1 - t0), dur / (t2 - t1)


def bench(codec, seconds: float = 30.0, n_qs=(8, 32), window_frames: int = 1500) -> dict:
    """Throughput of ``codec`` on ``seconds`` of noisy chirp through the windowed helpers (x realtime)."""
    from pipeline.codec.windows import decode_array, encode_array
    t = np.arange(int(seconds * RATE)) / RATE
    x = (0.3 * np.sin(2 * np.pi * (100 * t + 20 * t ** 2)) + 0.03 * np.random.default_rng(0).standard_normal(len(t)))
    x = x.astype(np.float32)[None]
    out = {"seconds": seconds, "threads": torch.get_num_threads()}
    n_qs = sorted({min(k, codec.n_q) for k in n_qs})  # a codec with a shorter stack runs its deepest
    encode_array(codec, x[:, :RATE], max(n_qs))  # warm-up
    for n_q in n_qs:
        t0 = time.perf_counter()
        codes = encode_array(codec, x, n_q, window_frames)
        t1 = time.perf_counter()
        decode_array(codec, codes, x.shape[1], window_frames)
        t2 = time.perf_counter()
        out[f"enc_xrt_nq{n_q}"] = round(seconds / (t1 - t0), 1)
        out[f"dec_xrt_nq{n_q}"] = round(seconds / (t2 - t1), 1)
    return out


def _align(ref: np.ndarray, deg: np.ndarray, max_lag: int = 4000) -> np.ndarray:
    """Shift ``deg`` by the cross-correlation lag (codec delay) and fit it to ``len(ref)``."""
    n = min(len(ref), len(deg))
    a = ref[:n] - ref[:n].mean()
    b = deg[:n] - deg[:n].mean()
    m = 1 << int(np.ceil(np.log2(2 * n)))
    xc = np.fft.irfft(np.fft.rfft(b, m) * np.conj(np.fft.rfft(a, m)), m)
    lags = np.concatenate([xc[:max_lag + 1], xc[-max_lag:]])
    lag_idx = int(np.argmax(lags))
    lag = lag_idx if lag_idx <= max_lag else lag_idx - (2 * max_lag + 1)
    if lag > 0:
        deg = deg[lag:]
    elif lag < 0:
        deg = np.concatenate([np.zeros(-lag, deg.dtype), deg])
    if len(deg) < len(ref):
        deg = np.concatenate([deg, np.zeros(len(ref) - len(deg), deg.dtype)])
    return deg[:len(ref)]


def run_ffmpeg(kind: str, x: np.ndarray, kbps: float, tmp: Path, rate: int = RATE):
    """Opus (libopus CBR) or MP3 (libmp3lame CBR) through ffmpeg, mono, decoded to ``rate``; None if it can't go
    there. At 24 kHz both encode 24 kHz; at another ``rate`` Opus encodes the reference as it is, MP3 at 24 kHz."""
    src = tmp / "ref.wav"
    sf.write(src, x, rate, subtype="FLOAT")
    enc_rate = ["-ar", str(RATE)] if kind == "mp3" or rate == RATE else []
    if kind == "opus":
        enc = tmp / "enc.opus"
        args = ["-c:a", "libopus", "-b:a", f"{kbps}k", "-vbr", "off", "-application", "audio"]
    elif kind == "mp3":
        if kbps not in MP3_KBPS_24K:  # lame would silently pick another bitrate
            return None
        enc = tmp / "enc.mp3"
        args = ["-c:a", "libmp3lame", "-b:a", f"{int(round(kbps))}k"]
    else:
        raise ValueError(kind)
    dec = tmp / "dec.wav"
    dur = len(x) / rate
    t0 = time.perf_counter()
    r = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), "-ac", "1", *enc_rate, *args,
                        str(enc)], capture_output=True, text=True)
    t1 = time.perf_counter()
    if r.returncode != 0 or not enc.exists():
        return None
    r = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(enc), "-ac", "1", "-ar", str(rate),
                        "-c:a", "pcm_f32le", str(dec)], capture_output=True, text=True)
    t2 = time.perf_counter()
    if r.returncode != 0:
        return None
    y, _ = sf.read(dec, dtype="float32")
    actual = enc.stat().st_size * 8 / dur / 1000  # includes the container's overhead
    return _align(x, y), actual, dur / (t1 - t0), dur / (t2 - t1)


# -- scoring ----------------------------------------------------------------------------------------
def score(ref: np.ndarray, deg: np.ndarray, kind: str, use_visqol: bool, visqol_seconds: float,
          rate: int = RATE) -> dict:
    from pipeline.codec import metrics
    out = {"mel": metrics.mel_distance(ref, deg, rate), "mel7": metrics.mel7_distance(ref, deg, rate),
           "si_sdr": metrics.si_sdr(ref, deg), "tones": metrics.tonal_peak_share(ref, deg, rate)}
    out["stoi"] = metrics.stoi(ref, deg, rate) if kind == "speech" else None
    bands = metrics.stoi_bands(ref, deg, rate) if kind == "speech" else None
    if bands is not None:  # where intelligibility is lost: STOI per one-third-octave band (their mean is STOI)
        out.update({f"stoi_{hz:.0f}hz": float(v) for hz, v in zip(*bands)})
    if use_visqol:
        n = int(visqol_seconds * rate)
        try:
            out["visqol"] = metrics.visqol(ref[:n], deg[:n], rate)
        except Exception as e:  # ViSQOL refuses some inputs (too short, silent): score the rest
            print(f"ViSQOL failed: {e}")
            out["visqol"] = None
    else:
        out["visqol"] = None
    return out


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["codec"], r["kbps"], r["kind"]), []).append(r)
    out = []
    for (codec, kbps, kind), rs in sorted(groups.items(), key=lambda g: (g[0][2], g[0][1], g[0][0])):
        s = {"codec": codec, "kbps": kbps, "kind": kind, "files": len(rs)}
        for m in ("mel", "mel7", "si_sdr", "stoi", "visqol", "tones", "actual_kbps", "enc_xrt", "dec_xrt", *_band_keys(rs)):
            vals = [r[m] for r in rs if r.get(m) is not None]
            s[m] = round(float(np.mean(vals)), 4) if vals else None
        out.append(s)
    return out


def _band_keys(rows: list[dict]) -> list[str]:
    """The per-band STOI columns present (``stoi_<centre>hz``), lowest band first."""
    keys = {k for r in rows for k in r if k.startswith("stoi_") and k.endswith("hz")}
    return sorted(keys, key=lambda k: float(k[5:-2]))


def bands_markdown(summary: list[dict]) -> str:
    """STOI per one-third-octave band (rows) for each codec x kbps on speech (columns); "" when none."""
    cols = [s for s in summary if s["kind"] == "speech" and any(k.startswith("stoi_") for k in s)]
    keys = _band_keys(cols)
    if not cols or not keys:
        return ""
    head = "| band Hz | " + " | ".join(f"{s['codec']} {s['kbps']:g}" for s in cols) + " |"
    lines = ["STOI by one-third-octave band, speech (the mean over bands is the STOI above):", "", head,
             "|" + "---|" * (len(cols) + 1)]
    for k in keys:
        lines.append(f"| {k[5:-2]} | " + " | ".join("-" if s.get(k) is None else f"{s[k]:.3f}" for s in cols) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(summary: list[dict]) -> str:
    head = ("| kind | kbps | codec | files | mel dist (lower better) | mel7 dist (lower better) | SI-SDR dB | STOI | ViSQOL | tones (lower better) "
            "| actual kbps | enc xRT | dec xRT |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"
    for s in summary:
        lines.append(f"| {s['kind']} | {s['kbps']:g} | {s['codec']} | {s['files']} | {f(s['mel'])} | {f(s.get('mel7'))} | "
                     f"{f(s['si_sdr'], 2)} | {f(s['stoi'])} | {f(s['visqol'], 2)} | {f(s.get('tones'))} | "
                     f"{f(s['actual_kbps'], 2)} | "
                     f"{f(s['enc_xrt'], 0)} | {f(s['dec_xrt'], 0)} |")
    return "\n".join(lines) + "\n"


def _read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k, v in r.items():
                if k in ("file", "kind", "codec"):
                    continue
                r[k] = float(v) if v not in ("", "None") else None
            rows.append(r)
    return rows


def merge(dirs: list[Path], out_dir: Path) -> list[dict]:
    """Combine earlier runs (e.g. baselines and codecs evaluated separately) into one table."""
    rows, speed = [], {}
    for d in dirs:
        rows += _read_rows(d / "results.csv")
        js = d / "summary.json"
        if js.exists():
            speed.update(json.loads(js.read_text()).get("speed", {}))
    return write_outputs(rows, speed, out_dir)


def write_outputs(rows: list[dict], speed: dict, out_dir: Path) -> list[dict]:
    if not rows:
        raise SystemExit("nothing was evaluated (no codec or baseline could run at these bitrates)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # rows of merged runs may lack the band columns
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows)
    (out_dir / "summary.json").write_text(json.dumps({"summary": summary, "speed": speed}, indent=1) + "\n")
    md = to_markdown(summary)
    bands = bands_markdown(summary)
    if bands:
        md += "\n" + bands
    for name, sp in speed.items():
        md += f"\n{name} throughput ({sp['threads']} threads, {sp['seconds']:g} s): " + ", ".join(
            f"{k} {v}x" for k, v in sp.items() if k.endswith(tuple(f"nq{q}" for q in (8, 32)))) + "\n"
    (out_dir / "summary.md").write_text(md)
    print(md)
    return summary


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", type=Path, default=None, help="folder of audio (default: Debian corpus)")
    ap.add_argument("--bitrates", type=float, nargs="+", default=[1.5, 3, 6, 12])
    ap.add_argument("--codec", nargs="*", default=["neural_rvq"])
    ap.add_argument("--codec-weights", type=Path, default=None, help="weights for the (first) codec")
    ap.add_argument("--label", default=None, help="name the (first) codec by this in the table, e.g. to merge "
                    "two checkpoints of one codec (--merge) and tell them apart")
    ap.add_argument("--baselines", nargs="*", default=["opus", "mp3"])
    ap.add_argument("--max-files", type=int, default=4, help="per content kind")
    ap.add_argument("--seconds", type=float, default=8.0, help="max seconds per reference")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="skip shorter files")
    ap.add_argument("--visqol-seconds", type=float, default=8.0)
    ap.add_argument("--no-visqol", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="draw of the references (another seed: another set, "
                    "e.g. to confirm a choice made on seed 0's set)")
    ap.add_argument("--all-files", action="store_true", help="use every file, not only the held-out split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path(".data/eval"))
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only merge the results.csv of earlier runs (same references) into --out-dir")
    ap.add_argument("--native", action="store_true", help="score at each reference's own rate (the restored "
                    "file a user compares), not at 24 kHz")
    ap.add_argument("--bench-seconds", type=float, default=30.0, help="throughput benchmark length (0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args.merge, args.out_dir)
    from pipeline import corpus
    from pipeline.codec import metrics, registry

    root = args.dir or corpus.fetch()
    refs = load_references(root, args.max_files, args.seconds, heldout_only=not args.all_files,
                           seed=args.seed, min_seconds=args.min_seconds, rate=None if args.native else RATE)
    if not refs:
        raise SystemExit(f"no usable audio under {root}")
    use_visqol = not args.no_visqol and metrics.visqol_available()
    baselines = list(args.baselines or [])
    if baselines and shutil.which("ffmpeg") is None:
        print("ffmpeg not found: skipping the Opus/MP3 baselines")
        baselines = []
    codecs = {}
    for i, name in enumerate(args.codec):
        c = registry.load(name, args.codec_weights if i == 0 else None)
        if (c.sample_rate, c.channels) != (RATE, 1):
            raise SystemExit(f"codec_eval compares 24 kHz mono codecs; {name} is {c.sample_rate} Hz, "
                             f"{c.channels} channels per stream")
        codecs[args.label if i == 0 and args.label else name] = c
    print(f"{len(refs)} references ({', '.join(sorted({r['kind'] for r in refs}))}), codecs {list(codecs)}, "
          f"baselines {baselines}, ViSQOL {'on' if use_visqol else 'off'}")
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for ref in refs:
            x, rate = ref["audio"], ref["rate"]
            for kbps in args.bitrates:
                runs = [(name, lambda c=c: run_neural(c, x, kbps, rate)) for name, c in codecs.items()]
                runs += [(b, lambda b=b: run_ffmpeg(b, x, kbps, tmp, rate)) for b in baselines]
                for name, fn in runs:
                    res = fn()
                    if res is None:
                        continue
                    y, actual, exrt, dxrt = res
                    row = {"file": ref["name"], "kind": ref["kind"], "codec": name, "kbps": kbps,
                           "rate": rate, "seconds": round(len(x) / rate, 2), "actual_kbps": actual, "enc_xrt": exrt,
                           "dec_xrt": dxrt}
                    row.update(score(x, y, ref["kind"], use_visqol, args.visqol_seconds, rate))
                    rows.append(row)
                    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                          flush=True)
    speed = {name: bench(c, args.bench_seconds) for name, c in codecs.items()} if args.bench_seconds > 0 else {}
    return write_outputs(rows, speed, args.out_dir)


if __name__ == "__main__":
    main()
