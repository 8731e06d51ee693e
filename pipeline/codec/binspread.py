"""Bin spreading: the rule that evens out a decoded MDCT frame's energy over neighbouring high bins.

Above a few kHz the ``neural_rvq`` decoder does not match the waveform (its coefficients do not correlate with the
original's, see ``NeuralRvqCodec.dither_from_hz``), and it puts a band's energy into a sparse, fixed comb of bins:
measured on release 7 (issue 20), decoded at 8 stages, one bin in three to four above ~3 kHz carries the band and the
bins between lie 20-50 dB below the original's (the shared decoder's output weights for those bins are 3-6x smaller
than elsewhere), at every rate. The band-gain stages correct a band's energy, not where in the band it sits. A
log-mel distance at fine frequency resolution (2048-point STFT) sees the comb: ours erred by up to -1.3 log10 units
(-26 dB) at 7-8.5 kHz where Opus erred by 0.1.

``BinSpread`` replaces the magnitude of every bin from ``first_bin`` up by the root mean square of the ``width``
bins centred on it (mirrored at ``first_bin`` and at the top bin), keeping each coefficient's sign: the energy of
each neighbourhood stays, the holes between the comb's teeth fill, and the decoder's signs (its temporal shape
inside a frame) are kept. It reads one frame at a time, so windowed decoding stays exact. Weights get one with
``python -m jobs.set_decode_rules``.

``max_stages`` (codec version 5, release 9) limits it to decodes of at most that many RVQ stages: release 9's shared
decoder was retrained with a 7-scale mel loss and fills much of its comb itself (white noise at 8 stages: 36 % of
the bins above 4.3 kHz more than 20 dB under the original's, release 8's decoder 84 %), and spreading what is left
made the 7-scale mel worse; its 1.5 kbps rung decoder is release 8's and keeps its comb. Without it a spread acts at every rate.

Tensors: ``coeffs: [B, n_bins, F]`` MDCT coefficients (``F`` frames).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: the widest neighbourhood a weights file may ask for (bins): a crafted file cannot smear a whole frame
MAX_WIDTH = 63


class BinSpread(nn.Module):
    """``first_bin``: the first MDCT bin spread; ``width``: the (odd) number of bins averaged around each;
    ``max_stages``: spread only decodes of at most this many RVQ stages (``applies``), of ``n_q``; ``None``: all."""

    def __init__(self, first_bin: int, width: int, n_bins: int, max_stages: int | None = None, n_q: int = 32):
        super().__init__()
        first_bin, width = int(first_bin), int(width)
        if not 3 <= width <= MAX_WIDTH or width % 2 == 0:
            raise ValueError(f"bin spread: width must be odd, 3 to {MAX_WIDTH} bins, got {width}")
        if not 1 <= first_bin or n_bins - first_bin <= width // 2:
            raise ValueError(f"bin spread: first bin {first_bin} leaves fewer than {width // 2 + 1} of {n_bins} bins")
        self.register_buffer("first_bin", torch.tensor(first_bin, dtype=torch.int64))
        self.register_buffer("width", torch.tensor(width, dtype=torch.int64))
        if max_stages is not None:  # (a buffer only when set: release 8's spread hashes as it did)
            if int(max_stages) != max_stages or not 1 <= int(max_stages) <= n_q:
                raise ValueError(f"bin spread: max stages must be 1 to {n_q}, got {max_stages}")
            self.register_buffer("max_stages", torch.tensor(int(max_stages), dtype=torch.int64))

    @property
    def limit(self) -> int | None:
        """The most RVQ stages a spread decode has (``max_stages``); ``None``: any number."""
        return int(self.max_stages) if hasattr(self, "max_stages") else None

    def applies(self, n_stages: int) -> bool:
        """Whether a decode of ``n_stages`` RVQ stages is spread."""
        return self.limit is None or n_stages <= self.limit

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        k0, w = int(self.first_bin), int(self.width)
        hi = coeffs[:, k0:]
        b, n, f = hi.shape
        e = (hi * hi).transpose(1, 2).reshape(b * f, 1, n)  # energies, one row per frame
        e = F.avg_pool1d(F.pad(e, (w // 2, w // 2), mode="reflect"), w, stride=1)
        mag = e.reshape(b, f, n).transpose(1, 2).sqrt()
        return torch.cat([coeffs[:, :k0], torch.where(hi < 0, -mag, mag)], dim=1)
