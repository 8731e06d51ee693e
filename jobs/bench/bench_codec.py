"""Codec speed per device and batch size, encode and decode, for every registered codec; optional reduced
precision fidelity check (codes agreement + decoded SNR vs fp32); FLOPs per audio second; with
``--agreement``, how often fp32 encodes of the same audio disagree across arithmetic (thread counts, float64,
and CUDA when present) at every rung of the ladder: the "rare ties" of the nearest-codeword search.

    python -m jobs.bench.bench_codec [--seconds 10 --batches 1,8,64 --precision bf16]
    python -m jobs.bench.bench_codec --agreement [--agreement-files 20]      # held-out corpus audio
    python -m jobs.bench.bench_codec --codecs encodec_24khz --codec-weights encodec_24khz=encodec_24khz-d7cc33bc.th

Codecs that ship no weights (EnCodec) run only with ``--codec-weights NAME=PATH``.

Prints one JSON line per (codec, device, batch, op): x_realtime = audio seconds processed / wall second.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pipeline import placement
from pipeline.codec import registry


def flops_per_audio_second(codec, n_q: int, seconds: float = 2.0) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    n = codec.n_frames(int(seconds * codec.sample_rate))
    x = torch.zeros(1, codec.channels, n * codec.hop_length + sum(codec.encode_context))
    with FlopCounterMode(display=False) as fc:
        codes, gains = codec.encode_with_gains(x, n_q)
    enc = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        codec.decode_with_gains(codes, gains)
    dec = fc.get_total_flops()
    audio_s = n * codec.hop_length / codec.sample_rate
    return {"encode_flops_per_audio_s": enc / audio_s, "decode_flops_per_audio_s": dec / audio_s}


def bench(codec, device: str, batch: int, seconds: float, n_q: int, precision: str, reps: int = 3) -> list[dict]:
    n = codec.n_frames(int(seconds * codec.sample_rate))
    n = -(-n // codec.segment_frames) * codec.segment_frames
    x = (0.1 * np.random.default_rng(0).standard_normal(
        (batch, codec.channels, n * codec.hop_length + sum(codec.encode_context)))).astype(np.float32)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = []
    with torch.inference_mode(), placement.autocast(device, precision):
        wav = placement.to_device(x, device)
        codes, gains = codec.encode_with_gains(wav, n_q)  # warm-up
        codec.decode_with_gains(codes, gains)
        for op, fn in (("encode", lambda: codec.encode_with_gains(placement.to_device(x, device), n_q)),
                       ("decode", lambda: codec.decode_with_gains(codes, gains).cpu())):
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            dt = (time.perf_counter() - t) / reps
            out.append({"op": op, "x_realtime": round(batch * n * codec.hop_length / codec.sample_rate / dt, 1)})
    return out


def speechlike(seconds: float, rate: int) -> np.ndarray:
    """A harmonic chirp with vibrato, a syllable-rate envelope and noise bursts: ``[T] float32``."""
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 60 * np.sin(2 * np.pi * 0.7 * t) + 8 * np.sin(2 * np.pi * 5 * t)
    ph = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * ph) / k for k in range(1, 30) if k * 200 < rate / 2)
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)  # syllable-rate envelope
    x = x + 0.3 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 1.3 * t) > 0.8)  # fricative bursts
    return (0.25 * x / np.abs(x).max()).astype(np.float32)


def fidelity(codec, device: str, precision: str, n_q: int, seconds: float = 10.0) -> dict:
    """What ``precision`` (autocast on the encode) costs against fp32 on the same device (CPU: CPU autocast,
    a preview of the GPU's rounding): code agreement, decoded SNR between the two decodes, and the
    perceptual error each decode has against the input (multi-scale log-mel distance, SI-SDR), so the
    precision's cost reads on the same scale as the codec's own error. Input: a harmonic chirp with
    vibrato and noise bursts (speech-like energy from 100 Hz to 8 kHz)."""
    from pipeline.codec import metrics
    from pipeline.codec.windows import decode_array, encode_array
    rate = codec.sample_rate
    x = speechlike(seconds, rate)
    n = x.size
    x = np.broadcast_to(x, (codec.channels, n)).copy()
    with torch.inference_mode():
        ref, g_ref = encode_array(codec, x, n_q, with_gains=True, device=device)
        with placement.autocast(device, precision, allow_cpu=True):
            low, g_low = encode_array(codec, x, n_q, with_gains=True, device=device)
        a = decode_array(codec, ref, n, gains=g_ref, device=device)
        b = decode_array(codec, low, n, gains=g_low, device=device)
    agree = float((ref == low).mean())
    snr = 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / max(np.sum((a - b).astype(np.float64) ** 2), 1e-20))
    return {"precision": precision, "device": device, "n_q": n_q, "codes_agreement": round(agree, 5),
            "decoded_snr_vs_fp32_db": round(float(snr), 2),
            "mel_distance_fp32": round(metrics.mel_distance(x[0], a[0], rate), 4),
            f"mel_distance_{precision}": round(metrics.mel_distance(x[0], b[0], rate), 4),
            "si_sdr_fp32_db": round(metrics.si_sdr(x[0], a[0]), 2),
            f"si_sdr_{precision}_db": round(metrics.si_sdr(x[0], b[0]), 2)}


class _Float64:
    """``codec`` computing its encode in float64: the exact-arithmetic reference every fp32 encode (any thread
    count, any device) approximates; codes from two fp32 encodes can only differ where one of them differs
    from this one."""

    def __init__(self, codec):
        import copy
        self._codec = copy.deepcopy(codec).double()

    def __getattr__(self, name):
        return getattr(self._codec, name)

    def encode_with_gains(self, wav, n_q):
        return self._codec.encode_with_gains(wav.double(), n_q)


def agreement_audio(n_files: int, seconds: float) -> list[tuple[str, np.ndarray]]:
    """Held-out speech and music references of the Debian corpus (``jobs.tools.codec_eval``'s draw) when the corpus
    is fetched, else the synthetic speech-like signal of ``fidelity`` (named so in the output)."""
    from pipeline import corpus
    root = corpus.default_cache()
    if root.exists() and any(corpus.audio_files(root)):
        from jobs.tools.codec_eval import load_references
        return [(f"{r['kind']}:{r['name']}", r["audio"]) for r in load_references(root, n_files, seconds, True)]
    return [("synthetic", speechlike(seconds, 24000))]


def agreement(codec, clips: list, n_qs, threads: int, device: str) -> list[dict]:
    """Per rung: how often the codes of fp32 encodes differ from the 1-thread CPU fp32 encode of the same audio
    (``vs``: ``threads_N`` = another CPU summation order, ``float64`` = exact arithmetic, ``cuda`` = the GPU in
    strict fp32), as the share of code entries and of frames with any stage differing, and what a flip costs:
    the SNR of the decode of the other codes against the decode of the reference codes (same decoder), over
    the clips where any code differs. ``clips``: ``(name, [T] float32 at the codec's rate)``."""
    from pipeline.codec.windows import decode_array, encode_array
    ref_threads = torch.get_num_threads()
    variants = [(f"threads_{threads}", "cpu", codec)] if threads != 1 else []
    variants.append(("float64", "cpu", _Float64(codec)))
    if device == "cuda":
        import copy
        variants.append(("cuda", "cuda", copy.deepcopy(codec).to("cuda")))
    clips = [np.broadcast_to(x, (codec.channels, x.size)).copy() for _, x in clips]
    rows = []
    for n_q in n_qs:
        torch.set_num_threads(1)
        refs = [encode_array(codec, x, n_q) for x in clips]
        ref_audio: dict[int, np.ndarray] = {}  # decode of a clip's reference codes, once for all variants
        for vs, dev, c in variants:
            diff = entries = frames = frames_diff = 0
            err = sig = 0.0
            for i, (x, ref) in enumerate(zip(clips, refs)):
                torch.set_num_threads(threads if vs.startswith("threads") else 1)
                other = encode_array(c, x, n_q, device=dev)
                d = other != ref
                diff += int(d.sum())
                entries += d.size
                frames += d.shape[2]
                frames_diff += int(d.any(axis=1).sum())
                if d.any():
                    torch.set_num_threads(1)
                    if i not in ref_audio:
                        ref_audio[i] = decode_array(codec, ref, x.shape[1]).astype(np.float64)
                    a = ref_audio[i]
                    b = decode_array(codec, other, x.shape[1]).astype(np.float64)
                    err += float(np.sum((a - b) ** 2))
                    sig += float(np.sum(a ** 2))
            rows.append({"n_q": n_q, "vs": vs, "codes_differing": round(diff / entries, 6),
                         "frames_differing": round(frames_diff / frames, 6), "code_entries": entries,
                         "decoded_snr_db": round(10 * np.log10(sig / err), 1) if err else None})
    torch.set_num_threads(ref_threads)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="audio seconds per batch item")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--bitrate", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--precision", default="fp32", choices=placement.PRECISIONS,
                    help="also check this precision's fidelity vs fp32")
    ap.add_argument("--codecs", help="comma-separated codec names (default: every codec that ships weights)")
    ap.add_argument("--codec-weights", action="append", default=[], metavar="NAME=PATH",
                    help="checkpoint of a codec (required for codecs that ship none, e.g. encodec_24khz)")
    ap.add_argument("--agreement", action="store_true", help="only measure how often fp32 encodes disagree "
                    "across thread counts, float64 and CUDA (when present), per rung of the ladder")
    ap.add_argument("--agreement-files", type=int, default=20, help="held-out references per content kind")
    ap.add_argument("--agreement-seconds", type=float, default=8.0)
    a = ap.parse_args(argv)
    weights = dict(w.split("=", 1) for w in a.codec_weights)
    names = a.codecs.split(",") if a.codecs else [n for n in registry.names()
                                                 if not registry.spec(n).needs_weights or n in weights]
    torch.set_num_threads(a.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(json.dumps({"gpu_path": "cuda" in devices, "cuda_available": torch.cuda.is_available(),
                      "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__, "threads": a.threads}))
    for dev in devices:
        placement.strict_fp32(dev, "fp32")  # the fp32 reference really is fp32 on CUDA (no TF32)
    if a.agreement:
        clips = agreement_audio(a.agreement_files, a.agreement_seconds)
        for name in names:
            codec = registry.load(name, weights.get(name))
            for r in agreement(codec, clips, codec.ladder_n_q, max(2, a.threads), devices[-1]):
                print(json.dumps({"codec": name, "clips": len(clips), **r}), flush=True)
        return
    for name in names:
        for dev in devices:
            codec = registry.load(name, weights.get(name), device=dev)
            n_q = codec.n_q_for_kbps(a.bitrate)
            if dev == "cpu":
                print(json.dumps({"codec": name, "n_q": n_q, **flops_per_audio_second(codec, n_q)}))
            for b in [int(v) for v in a.batches.split(",")]:
                for r in bench(codec, dev, b, a.seconds, n_q, a.precision if dev == "cuda" else "fp32"):
                    print(json.dumps({"codec": name, "device": dev, "batch": b, **r}), flush=True)
            if a.precision != "fp32":
                print(json.dumps({"codec": name, **fidelity(codec, dev, a.precision, n_q)}))


if __name__ == "__main__":
    main()
