"""Does ``torch.compile`` make the CPU codec path faster? Eager vs compiled encode and decode, side by side in one run.

    python -m jobs.bench.bench_compile [--codec neural_rvq] [--bitrate 6] [--batch 4] [--seconds 30] [--threads N]
        [--reps 5] [--modes default max-autotune-no-cudagraphs]

The shapes are the pipeline's (``--batch`` windows of ``--seconds`` with the codec's context, as a codec actor
encodes them). Per mode it prints the compile time (first call), the steady x realtime of encode and decode, and
the agreement with eager: the fraction of codes that are identical at each rung of the ladder and the SNR (dB) of
the compiled decode against the eager one. Eager runs under ``torch.inference_mode`` as the pipeline does; compiled
code under ``torch.no_grad`` (inductor cannot trace inference-mode tensors).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> int:
    from pipeline.codec import registry
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default=registry.DEFAULT_CODEC)
    ap.add_argument("--bitrate", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["default"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    codec = registry.load(args.codec)
    n_q = codec.n_q_for_kbps(args.bitrate)
    frames = int(round(args.seconds * codec.frame_rate))
    rng = np.random.default_rng(0)
    t = np.arange(frames * codec.hop_length + sum(codec.encode_context)) / codec.sample_rate
    x = np.stack([0.2 * np.sin(2 * np.pi * (220 + 40 * b) * t) + 0.05 * rng.standard_normal(t.size)
                  for b in range(args.batch * codec.channels)]).astype(np.float32)
    wav = torch.from_numpy(x).reshape(args.batch, codec.channels, -1)
    audio_s = args.batch * frames / codec.frame_rate
    rungs = [k for k in codec.ladder_n_q if k <= n_q] or [n_q]

    with torch.inference_mode():
        ref_codes = codec.encode(wav, n_q)
        ref_wav = codec.decode(ref_codes)
        enc_s = _time(lambda: codec.encode(wav, n_q), args.reps)
        dec_s = _time(lambda: codec.decode(ref_codes), args.reps)
    row = {"mode": "eager", "threads": args.threads, "batch": args.batch, "seconds": args.seconds,
           "encode_x": round(audio_s / enc_s, 1), "decode_x": round(audio_s / dec_s, 1)}
    print(json.dumps(row), flush=True)
    for mode in args.modes:
        torch._dynamo.reset()
        # the codec's own methods run under inference_mode (their decorators): compile the functions inside them
        raw_enc = getattr(type(codec).encode, "__wrapped__", type(codec).encode)
        raw_dec = getattr(type(codec).decode, "__wrapped__", type(codec).decode)
        enc = torch.compile(lambda w, k: raw_enc(codec, w, k), mode=mode, dynamic=False)
        dec = torch.compile(lambda c: raw_dec(codec, c), mode=mode, dynamic=False)
        codes_in = ref_codes.clone()  # (a tensor made in inference mode cannot enter a compiled graph)
        try:
            with torch.no_grad():  # (inductor cannot trace inference tensors)
                t0 = time.perf_counter()
                codes = enc(wav, n_q)
                back = dec(codes_in)
                compile_s = time.perf_counter() - t0
                c_enc = _time(lambda: enc(wav, n_q), args.reps)
                c_dec = _time(lambda: dec(codes_in), args.reps)
        except Exception as e:  # noqa: BLE001 - a backend that cannot compile this model is a result too
            print(json.dumps({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
            continue
        same = {str(k): round(float((codes[:, :k] == ref_codes[:, :k]).all(1).float().mean()), 5) for k in rungs}
        err = (back - ref_wav).pow(2).mean().item()
        snr = 10 * np.log10(ref_wav.pow(2).mean().item() / err) if err > 0 else float("inf")
        print(json.dumps({"mode": mode, "compile_s": round(compile_s, 1), "encode_x": round(audio_s / c_enc, 1),
                          "decode_x": round(audio_s / c_dec, 1), "encode_speedup": round(enc_s / c_enc, 2),
                          "decode_speedup": round(dec_s / c_dec, 2), "frames_identical_by_rung": same,
                          "decode_snr_vs_eager_db": round(snr, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
