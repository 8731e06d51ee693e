"""Train the ``mdct_rvq`` codec: per-bin scales and residual k-means codebooks from real recordings.

    python -m jobs.train_mdct_codec [--corpus DIR] [--out pipeline/codec/weights/mdct_rvq.pt]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import audio, corpus
from pipeline.codec.mdct import MdctRvqCodec, perceptual_weight
from pipeline.codec.rvq import fit_residual_kmeans


def collect_features(codec: MdctRvqCodec, files: list[Path], seconds_per_file: float, max_vectors: int,
                     seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    feats = []
    hop = codec.hop_length
    n = int(seconds_per_file * codec.sample_rate) // hop * hop
    for path in files:
        try:
            x, _ = audio.load(str(path), codec.sample_rate, mono=True)
        except Exception as e:  # a broken training file is skipped, not fatal
            print(f"skip {path}: {e}")
            continue
        if x.shape[1] > n:
            start = rng.randrange(0, x.shape[1] - n) // hop * hop
            x = x[:, start:start + n]
        x = x[:, : x.shape[1] // hop * hop]
        if x.shape[1] < 4 * hop:
            continue
        wav = torch.from_numpy(np.concatenate([np.zeros((1, hop), np.float32), x], 1))[None]
        with torch.no_grad():
            y = codec.features(wav)[0].t()  # [F, hop]
        energy = y.pow(2).mean(1)
        feats.append(y[energy > 1e-8])  # drop digital silence: it would waste codebook entries
    allf = torch.cat(feats)
    if len(allf) > max_vectors:
        allf = allf[torch.randperm(len(allf), generator=torch.Generator().manual_seed(seed))[:max_vectors]]
    return allf


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=None, help="folder of audio (default: fetch Debian corpus)")
    ap.add_argument("--out", type=Path, default=Path("pipeline/codec/weights/mdct_rvq.pt"))
    ap.add_argument("--n-q", type=int, default=16)
    ap.add_argument("--vectors", type=int, default=60000)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--seconds-per-file", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    root = args.corpus or corpus.fetch()
    files = [p for p in corpus.audio_files(root) if not corpus.is_heldout(p)]
    # balance music and speech: music files are long, speech files are many and short
    music = [p for p in files if corpus.kind_of(p) == "music"]
    speech = [p for p in files if corpus.kind_of(p) != "music"]
    random.Random(args.seed).shuffle(speech)
    files = music + speech[:400]
    t0 = time.time()
    codec = MdctRvqCodec(n_q=args.n_q)
    # per-bin scale: perceptual weight / std of the companded coefficient
    raw = collect_features(codec, files, args.seconds_per_file, args.vectors, args.seed)
    std = raw.std(0).clamp_min(1e-4)
    codec.bin_scale.copy_(perceptual_weight(codec.hop_length, codec.sample_rate) / std)
    feats = raw * codec.bin_scale[None, :]
    print(f"{len(files)} files, {len(feats)} vectors of {feats.shape[1]} dims; fitting {args.n_q} stages")
    books = fit_residual_kmeans(feats, codec.codebook_size, args.n_q, iters=args.iters, seed=args.seed,
                                log=print)
    codec.rvq.codebooks.copy_(books)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": codec.state_dict()}, args.out)
    card = {
        "codec": codec.name, "version": codec.version, "checkpoint_hash": codec.checkpoint_hash(),
        "training_files": len(files), "vectors": len(feats), "kmeans_iters": args.iters,
        "wall_seconds": round(time.time() - t0, 1), "hardware": "CPU",
        "data": "Debian packages: " + ", ".join(corpus.PACKAGES) + " (10% of files held out by name hash)",
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
