"""Fit ``neural_rvq``'s band-gain stages to its weights: Lloyd-Max dB levels per band from the training split.

    python -m jobs.fit_band_gains [--weights W.pt] [--out OUT.pt] [--base 16] [--levels 16]
                                  [--speech-files 150] [--music-files 40] [--seconds 8] [--corpus DIR --other-files N]

For every training segment (files the held-out split never uses, ``corpus.is_heldout``), the codec encodes and
decodes ``--base`` stages; the dB by which each decoded band of each frame falls short of the original's (the
``bandgain.BandGains.gains_db`` the encoder will code) is collected, and each band gets the ``--levels`` levels
that minimise the squared dB error over those frames (``bandgain.fit_levels``). No gradient step: a few minutes on
one CPU. The weights written are the input's plus ``band_gains.*`` (a new checkpoint hash), packed. Refit after
any change of the weights below: the levels are fitted to these codes and this decoder.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import audio, corpus
from pipeline.audio import pick_segment
from pipeline.codec import registry
from pipeline.codec.bandgain import BandGains, bark_edges, fit_levels
from pipeline.codec.windows import decode_array, encode_array


def segments(root: Path, per_kind: dict[str, int], seconds: float, seed: int) -> list[np.ndarray]:
    """The loudest ``seconds`` of up to ``per_kind[kind]`` training-split files of each kind (24 kHz mono)."""
    files = [p for p in corpus.audio_files(root) if not corpus.is_heldout(p)]
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[Path]] = {}
    for p in files:
        by_kind.setdefault(corpus.kind_of(p), []).append(p)
    out = []
    for kind, paths in sorted(by_kind.items()):
        taken = 0
        for i in rng.permutation(len(paths)):
            if taken >= per_kind.get(kind, 0):
                break
            try:
                x, _ = audio.load(str(paths[i]), 24000, mono=True)
            except Exception as e:  # noqa: BLE001 - a broken training file is skipped, not fatal
                print(f"skip {paths[i]}: {e}")
                continue
            seg = pick_segment(x[0], int(seconds * 24000))
            if len(seg) < 24000 or np.sqrt(np.mean(seg ** 2)) < 1e-3:
                continue
            out.append(seg.astype(np.float32))
            taken += 1
    return out


def band_shortfall(codec, bg: BandGains, x: np.ndarray, base: int) -> torch.Tensor:
    """``[n_bands, F]`` dB the ``base``-stage decode of ``x: [T]`` falls short of ``x`` per band and frame."""
    y = decode_array(codec, encode_array(codec, x[None], base), len(x))[0]
    return bg.gains_db(codec.frames_of(x), codec.frames_of(y))[0]


def fit(weights: Path | None, root: Path, base: int, n_levels: int, per_kind: dict[str, int], seconds: float,
        seed: int = 0):
    codec = registry.load("neural_rvq", weights)
    if codec.band_gains is not None:
        raise SystemExit(f"{weights or 'the shipped weights'}: already carry band gains; pass the weights without")
    edges = bark_edges(codec.hop_length)
    probe = BandGains(edges, torch.zeros(len(edges) - 1, n_levels), base)
    segs = segments(root, per_kind, seconds, seed)
    if not segs:
        raise SystemExit(f"no usable training audio under {root}")
    t0 = time.time()
    with torch.inference_mode():
        g = torch.cat([band_shortfall(codec, probe, s, base) for s in segs], dim=1)
    levels = fit_levels(g, n_levels)
    codec.set_band_gains(edges, levels, base)
    print(f"{len(segs)} segments, {g.shape[1]} frames, {time.time() - t0:.0f} s; shortfall rms "
          f"{float(g.clamp(-15, 15).pow(2).mean().sqrt()):.2f} dB")
    return codec, {"segments": len(segs), "frames": int(g.shape[1]), "base": base, "levels": n_levels,
                   "bands": len(edges) - 1, "seconds": seconds, "seed": seed}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None, help="weights without band gains (default: shipped)")
    ap.add_argument("--out", type=Path, default=Path(".data/neural_rvq_bandgains.pt"))
    ap.add_argument("--corpus", type=Path, default=None, help="folder of audio (default: the Debian corpus)")
    ap.add_argument("--base", type=int, default=16, help="neural stages the gains correct")
    ap.add_argument("--levels", type=int, default=16, help="levels per band (a power of two)")
    ap.add_argument("--speech-files", type=int, default=150)
    ap.add_argument("--music-files", type=int, default=40)
    ap.add_argument("--other-files", type=int, default=0, help="files of a --corpus outside the Debian packages")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.corpus or corpus.fetch()
    per_kind = {"speech": args.speech_files, "music": args.music_files, "other": args.other_files}
    codec, info = fit(args.weights, root, args.base, args.levels, per_kind, args.seconds, args.seed)
    h = registry.write_extended(codec, args.weights, {"band_gains.": info}, args.out)
    print(json.dumps({"out": str(args.out), "checkpoint_hash": h, **info}))
    return args.out


if __name__ == "__main__":
    main()
