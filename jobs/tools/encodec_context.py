"""How much LSTM context the windowed ``encodec_24khz`` adapter needs: windowed vs whole-signal coding.

    python -m jobs.tools.encodec_context [--seconds 20 --window 2 --contexts 0,0.25,0.5,1,2 --seeds 0,1]
    python -m jobs.tools.encodec_context --weights encodec_24khz-d7cc33bc.th   # check a real checkpoint

EnCodec's SEANet encoder and decoder hold LSTMs, so a code can depend on everything before it. For
each context length (seconds, both encode and decode), this codes a probe signal (chirp + tone +
noise) once as a single window and once in short windows, with random weights of the real
architecture (``encodec_adapter.random_codec``, several seeds) and with the LSTMs' forget-gate biases
raised (``--forget-biases``: +2 keeps ~88% of the cell state per frame instead of ~50%, a far longer
memory than the random init; a stress case: the random LSTM then turns multistable and never agrees
with whole-signal coding, whatever the context) or their recurrent weights scaled (``--lstm-scales``;
x4 makes it chaotic, with the same result), and prints one JSON line per setting:

* ``latent_rel``: max |latent difference| / RMS of the latent (before quantization);
* ``codes_diff``: fraction of codes (8 stages, 6 kbps) that differ;
* ``decode_rel``: max |decoded difference| / RMS of the output, decoding the same codes;
* ``join_rel``: the same, within 2 hops of a window join; ``start_rel``: the first 0.1 s of the file
  with code 0 as the decoder's left context instead of the silence code (``pad_codes``).

Threads: 1 (``torch.set_num_threads(1)``), CPU.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pipeline.codec.encodec_adapter import Encodec24kCodec, probe_audio, random_codec
from pipeline.codec.windows import Joiner, Windower, decode_array, encode_array


def latents(codec, x: np.ndarray, window_frames: int) -> np.ndarray:
    hop, (cl, cr) = codec.hop_length, codec.encode_context
    w = Windower(codec, window_frames, 1)
    out = []
    for win in list(w.push(x)) + list(w.finish()):
        with torch.inference_mode():
            e = codec.encoder(torch.from_numpy(win.samples)[:, None, :])
        out.append(e[..., cl // hop: e.shape[-1] - cr // hop].numpy())
    return np.concatenate(out, axis=-1)


def measure(codec, x: np.ndarray, ctx_s: float, window_frames: int, n_q: int = 8) -> dict:
    hop = codec.hop_length
    frames = int(round(ctx_s * codec.frame_rate))
    codec.encode_context, codec.decode_context = (frames * hop, 0), (frames, 0)
    codec._pad.clear()
    whole = 10 ** 6
    la, lb = latents(codec, x, whole), latents(codec, x, window_frames)
    ca, cb = encode_array(codec, x, n_q, whole), encode_array(codec, x, n_q, window_frames)
    ya = decode_array(codec, ca, x.shape[1], whole)
    yb = decode_array(codec, ca, x.shape[1], window_frames)
    rms = float(np.sqrt(np.mean(ya ** 2))) + 1e-12
    d = np.abs(ya - yb)[0]
    joins = np.zeros(d.size, bool)
    for j in range(window_frames, ca.shape[-1], window_frames):
        joins[max(0, (j - 2) * hop):(j + 2) * hop] = True
    row = {"context_s": ctx_s, "latent_rel": float(np.abs(la - lb).max() / (np.sqrt(np.mean(la ** 2)) + 1e-12)),
           "codes_diff": float(np.mean(ca != cb)), "decode_rel": float(d.max() / rms),
           "join_rel": float(d[joins].max() / rms), "away_rel": float(d[~joins].max() / rms)}
    if frames:  # the start of a file: code 0 vs the silence code as left context
        z = Joiner(codec, x.shape[1])
        z.codec = _ZeroPad(codec)
        y0 = np.concatenate(list(z.feed(ca)) + list(z.finish()), axis=1)
        n = int(0.1 * codec.sample_rate)
        row["start_rel"] = float(np.abs(y0[0, :n] - ya[0, :n]).max() / rms)
    return row


class _ZeroPad:
    """The codec with code 0 as padding (what the Joiner did before ``pad_codes``)."""

    def __init__(self, codec):
        self._c = codec

    def __getattr__(self, k):
        return getattr(self._c, k)

    def pad_codes(self, n_q):
        return torch.zeros(n_q, dtype=torch.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--window", type=float, default=2.0, help="window seconds of the windowed run")
    ap.add_argument("--contexts", default="0,0.25,0.5,1,2")
    ap.add_argument("--weights", help="measure this checkpoint (e.g. the official one) instead of random weights")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--forget-biases", default="0,2", help="add to the LSTMs' forget-gate biases (memory)")
    ap.add_argument("--lstm-scales", default="1", help="multiply the LSTMs' recurrent weights (stress)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = probe_audio(args.seconds, 24000, seed=7)
    if args.weights:
        from pipeline.codec import registry
        codec = registry.load("encodec_24khz", args.weights)
        for ctx in (float(c) for c in args.contexts.split(",")):
            row = measure(codec, x, ctx, int(round(args.window * codec.frame_rate)))
            print(json.dumps({"weights": args.weights, **{k: (round(v, 9) if isinstance(v, float) else v)
                                                          for k, v in row.items()}}), flush=True)
        return 0
    for seed in (int(s) for s in args.seeds.split(",")):
        for fb in (float(s) for s in args.forget_biases.split(",")):
            for scale in (float(s) for s in args.lstm_scales.split(",")):
                codec = random_codec(Encodec24kCodec, seed)
                with torch.no_grad():
                    for name, p in codec.named_parameters():
                        if ".lstm.weight_hh" in name:
                            p.mul_(scale)
                        if ".lstm.bias_ih" in name:  # gate order i, f, g, o
                            h = p.shape[0] // 4
                            p[h:2 * h] += fb
                for ctx in (float(c) for c in args.contexts.split(",")):
                    row = measure(codec, x, ctx, int(round(args.window * codec.frame_rate)))
                    print(json.dumps({"seed": seed, "forget_bias": fb, "lstm_scale": scale, **{
                        k: (round(v, 9) if isinstance(v, float) else v) for k, v in row.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
