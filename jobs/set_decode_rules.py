"""Set the decode-side rules ``neural_rvq`` weights carry: the bin spread and the sign-dither cutoffs.

    python -m jobs.set_decode_rules [--weights W.pt] [--out OUT.pt]
                                    [--spread-from-hz 4000 --spread-width 9 --spread-max-stages 2 | --no-spread]
                                    [--dither 4:1000,6:1500,8:2000,16:2000,32:2500 | --no-dither-table]

* Bin spread (``pipeline/codec/binspread.py``): the decoded bins from ``--spread-from-hz`` up get the root-mean-square
  magnitude of the ``--spread-width`` bins around them (signs kept); with ``--spread-max-stages K`` (codec version 5)
  only in decodes of at most ``K`` RVQ stages (``0``: at every rate, as release 8).
* Dither cutoffs (``NeuralRvqCodec.set_dither_cutoffs``): ``K:HZ`` pairs, stage counts rising, the last covering every
  stage: decoding at most ``K`` stages gives the bins from ``HZ`` up one pseudo-random sign per frame. Without a table
  the codec's built-in ``dither_from_hz`` applies.

An option left out keeps what the input weights have. Nothing is fitted: the values were chosen on held-out
references with ``jobs.tools.codec_eval`` (the model card's release 8 and 9 sections). Codes do not change, except the
band-gain stages, which the encoder codes against the spread base. The weights written are the input's with these
tensors (``bin_spread.*``, ``dither_cutoffs.*``) set or removed (a new checkpoint hash), packed.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline.codec import registry


def _pairs(text: str) -> list[tuple[int, float]]:
    try:
        return [(int(k), float(hz)) for k, hz in (p.split(":") for p in text.split(","))]
    except ValueError:
        raise SystemExit(f"--dither {text!r}: write stage:Hz pairs, e.g. 4:1000,8:2000,32:2500") from None


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None, help="input weights (default: shipped)")
    ap.add_argument("--out", type=Path, default=Path(".data/neural_rvq_rules.pt"))
    ap.add_argument("--spread-from-hz", type=float, default=None, help="spread the bins whose lower edge is this or "
                    "above (with --spread-width; default 9)")
    ap.add_argument("--spread-width", type=int, default=None, help="bins averaged around each (odd)")
    ap.add_argument("--spread-max-stages", type=int, default=None, metavar="K", help="spread only decodes of at most "
                    "K stages (0: every rate)")
    ap.add_argument("--no-spread", action="store_true", help="remove the bin spread")
    ap.add_argument("--dither", default=None, help="stage:Hz pairs of the dither cutoffs")
    ap.add_argument("--no-dither-table", action="store_true", help="remove the weights' dither cutoffs")
    args = ap.parse_args(argv)
    codec = registry.load("neural_rvq", args.weights)
    parts: dict[str, dict | None] = {}
    if args.no_spread:
        codec.clear_bin_spread()
        parts["bin_spread."] = None
    elif args.spread_from_hz is not None or args.spread_width is not None or args.spread_max_stages is not None:
        old = codec.bin_spread
        hz = args.spread_from_hz if args.spread_from_hz is not None else \
            (4000.0 if old is None else int(old.first_bin) * codec.sample_rate / (2 * codec.hop_length))
        width = args.spread_width if args.spread_width is not None else (9 if old is None else int(old.width))
        limit = args.spread_max_stages if args.spread_max_stages is not None else \
            (None if old is None else old.limit)
        limit = limit or None  # 0: every rate
        first = math.ceil(hz * 2 * codec.hop_length / codec.sample_rate)
        try:
            codec.set_bin_spread(first, width, limit)
        except ValueError as e:
            raise SystemExit(f"--spread-from-hz {hz:g} --spread-width {width} --spread-max-stages {limit}: {e}") from None
        parts["bin_spread."] = {"first_bin": first, "from_hz": first * codec.sample_rate / (2 * codec.hop_length),
                                "width": width, **({} if limit is None else {"max_stages": limit})}
    if args.no_dither_table:
        codec.clear_dither_cutoffs()
        parts["dither_cutoffs."] = None
    elif args.dither is not None:
        pairs = _pairs(args.dither)
        try:
            codec.set_dither_cutoffs(pairs)
        except ValueError as e:
            raise SystemExit(f"--dither {args.dither}: {e}") from None
        parts["dither_cutoffs."] = {"pairs": [list(p) for p in pairs]}
    if not parts:
        raise SystemExit("nothing to set: pass --spread-from-hz/--spread-width/--spread-max-stages, --no-spread, "
                         "--dither or --no-dither-table")
    h = registry.write_extended(codec, args.weights, parts, args.out)
    print(json.dumps({"out": str(args.out), "checkpoint_hash": h,
                      **{k.rstrip("."): v for k, v in parts.items()}}))
    return args.out


if __name__ == "__main__":
    main()
