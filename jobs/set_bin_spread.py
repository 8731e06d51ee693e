"""Give ``neural_rvq`` weights a bin spread (``pipeline/codec/binspread.py``), or take it away.

    python -m jobs.set_bin_spread [--weights W.pt] [--out OUT.pt] [--from-hz 4000] [--width 9] [--off]

The decoder's bins from ``--from-hz`` up then get the root-mean-square magnitude of the ``--width`` bins around
them (signs kept). Nothing is fitted: the two numbers were chosen on held-out references with ``jobs.tools.
codec_eval`` (the model card's release 8 section). Codes do not change, except the band-gain stages, which the
encoder codes against the spread base. The weights written are the input's plus ``bin_spread.*`` (a new
checkpoint hash), packed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline.codec import registry


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None, help="input weights (default: shipped)")
    ap.add_argument("--out", type=Path, default=Path(".data/neural_rvq_spread.pt"))
    ap.add_argument("--from-hz", type=float, default=4000.0, help="spread the bins whose lower edge is this or above")
    ap.add_argument("--width", type=int, default=9, help="bins averaged around each (odd)")
    ap.add_argument("--off", action="store_true", help="write the weights without a bin spread")
    args = ap.parse_args(argv)
    codec = registry.load("neural_rvq", args.weights)
    if args.off:
        codec.clear_bin_spread()
        info = None
    else:
        first = math.ceil(args.from_hz * 2 * codec.hop_length / codec.sample_rate)
        try:
            codec.set_bin_spread(first, args.width)
        except ValueError as e:
            raise SystemExit(f"--from-hz {args.from_hz:g} --width {args.width}: {e}") from None
        info = {"first_bin": first, "from_hz": first * codec.sample_rate / (2 * codec.hop_length), "width": args.width}
    h = registry.write_extended(codec, args.weights, "bin_spread.", info, args.out)
    print(json.dumps({"out": str(args.out), "checkpoint_hash": h, **(info or {})}))
    return args.out


if __name__ == "__main__":
    main()
