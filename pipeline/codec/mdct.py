"""MDCT (sine window, 50% overlap, perfect reconstruction) and the ``mdct_rvq`` codec built on it.

``mdct_rvq`` is the fast non-neural codec: each 320-sample MDCT frame (75 frames/s at 24 kHz) is
companded, weighted towards the frequencies the ear cares most about, and quantized by residual
k-means codebooks learned from real recordings (``jobs/train_mdct_codec.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Codec
from .rvq import ResidualVQ


class MDCT(torch.nn.Module):
    """MDCT with hop ``n`` and a ``2n`` sine window.

    ``forward(x: [B, (F+1)*n]) -> [B, n, F]``: frame ``i`` covers input samples ``[i*n, i*n + 2n)``.
    ``inverse(X: [B, n, F]) -> [B, (F+1)*n]``: overlap-added; only samples ``[n, F*n)`` are complete.
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        t = torch.arange(2 * n, dtype=torch.float64)
        k = torch.arange(n, dtype=torch.float64)
        window = torch.sin(math.pi / (2 * n) * (t + 0.5))
        basis = torch.cos(math.pi / n * (t[:, None] + 0.5 + n / 2) * (k[None, :] + 0.5))
        scale = math.sqrt(2.0 / n)
        self.register_buffer("analysis", (window[:, None] * basis * scale).float(), persistent=False)
        self.register_buffer("synthesis", (basis.t() * window[None, :] * scale).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.unfold(-1, 2 * self.n, self.n)  # [B, F, 2n]
        return (frames @ self.analysis).transpose(1, 2)

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        b, n, f = coeffs.shape
        frames = coeffs.transpose(1, 2) @ self.synthesis  # [B, F, 2n]
        out = F.fold(frames.transpose(1, 2), output_size=(1, (f + 1) * n), kernel_size=(1, 2 * n),
                     stride=(1, n))
        return out.reshape(b, (f + 1) * n)


def perceptual_weight(n_bins: int, sample_rate: int) -> torch.Tensor:
    """Weight per MDCT bin (``[n_bins]``): flat to 4 kHz, falling as (f / 4 kHz)^-0.7 above (both codecs' training
    losses and the MDCT codec's bin scale use it)."""
    f = (torch.arange(n_bins) + 0.5) * sample_rate / (2 * n_bins)
    return torch.clamp(f / 4000.0, min=1.0).pow(-0.7)


class MdctRvqCodec(Codec):
    """MDCT frames -> companding + perceptual weighting -> residual k-means RVQ."""

    name = "mdct_rvq"
    version = "1"
    sample_rate = 24000
    hop_length = 320
    codebook_size = 1024
    n_q = 16
    ladder_n_q = (2, 4, 8, 16)
    encode_context = (320, 0)
    decode_context = (0, 1)
    power = 0.5  # companding exponent: y = sign(x) |x|^power

    def __init__(self, n_q: int = 16):
        super().__init__()
        self.n_q = n_q
        self.ladder_n_q = tuple(k for k in (2, 4, 8, 16, 32) if k <= n_q)
        self.mdct = MDCT(self.hop_length)
        self.rvq = ResidualVQ(self.hop_length, self.codebook_size, n_q)
        # per-bin scale applied after companding (learned: 1 / weighted std); ones until trained
        self.register_buffer("bin_scale", torch.ones(self.hop_length))


    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav: [B, 1, (F+1)*hop]`` -> quantizer-domain features ``[B, hop, F]``."""
        x = self.mdct(wav[:, 0, :])
        y = torch.sign(x) * x.abs().pow(self.power)
        return y * self.bin_scale[None, :, None]

    def unfeatures(self, y: torch.Tensor) -> torch.Tensor:
        y = y / self.bin_scale[None, :, None]
        return torch.sign(y) * y.abs().pow(1.0 / self.power)

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor, n_q: int) -> torch.Tensor:
        return self.rvq.encode(self.features(wav), n_q)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.unfeatures(self.rvq.decode(codes))
        out = self.mdct.inverse(x)  # [B, (F+1)*hop]; complete in [hop, F*hop)
        hop = self.hop_length
        return out[:, None, hop: out.shape[-1] - hop]
