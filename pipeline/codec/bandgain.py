"""Band-gain stages: per-frame energy corrections of a decoded MDCT frame, coded as RVQ-like code stages.

A neural decoder at a given number of stages puts about the right energy into each band *on average*, but frame
by frame its band energies err by several dB above ~1 kHz (issue 20: that, not the signs, is what costs STOI and
the log-mel distance at 12-24 kbps, and more RVQ stages on the 64-d latent barely reduce it). ``BandGains`` codes,
for every frame, the ratio between the original's and the decoded frame's energy in each of ``n_bands`` bands
(``edges``: MDCT bins), as a scalar quantizer index per band (``levels``: dB, sorted, per band), and the decoder
scales the band's coefficients by it. The index bits of all bands, band 0 first, are cut into ``code_bits``-bit
code indices: so a prefix of the gain stages codes a prefix of the bands (the bands whose bits are all present are
corrected, the rest get 0 dB), and codes stay ordinary integers in ``[0, 2 ** code_bits)`` that the archive,
rebitrate and verify treat like any other stage.

Tensors: ``energy: [B, n_bands, F]`` (sum of squared MDCT coefficients per band and frame), ``codes: [B, S, F]
int64`` (``S`` gain stages), ``scale: [B, n_bins, F]`` (a factor per MDCT bin).
"""
from __future__ import annotations

import math

import torch
from torch import nn

#: band energies below this (sum of squared MDCT coefficients; ~ -70 dB re full scale per bin) count as silence
ENERGY_FLOOR = 1e-6
#: the largest correction a level may hold (dB): a crafted weights file cannot make a decoder blow up
MAX_DB = 40.0


class BandGains(nn.Module):
    """``levels [n_bands, L]`` dB quantizer levels per band (sorted), ``edges [n_bands + 1]`` MDCT bin edges."""

    def __init__(self, edges: torch.Tensor, levels: torch.Tensor, base_stages: int, code_bits: int = 10,
                 silence_codes: torch.Tensor | None = None):
        super().__init__()
        edges = torch.as_tensor(edges, dtype=torch.int64)
        levels = torch.as_tensor(levels, dtype=torch.float32)
        if edges.ndim != 1 or levels.ndim != 2 or levels.shape[0] != edges.numel() - 1:
            raise ValueError(f"band gains: {edges.numel()} edges for {levels.shape[0]} bands of levels")
        if bool((edges[1:] <= edges[:-1]).any()) or int(edges[0]) != 0:
            raise ValueError("band gains: edges must rise strictly from bin 0")
        L = levels.shape[1]
        if L < 2 or L & (L - 1):
            raise ValueError(f"band gains: the number of levels must be a power of two >= 2, got {L}")
        if not bool(torch.isfinite(levels).all()) or float(levels.abs().max()) > MAX_DB:
            raise ValueError(f"band gains: levels must be finite dB within +-{MAX_DB:g}")
        if bool((levels[:, 1:] < levels[:, :-1]).any()):
            raise ValueError("band gains: levels must be sorted in each band")
        self.code_bits = code_bits
        self.register_buffer("edges", edges)
        self.register_buffer("levels", levels)
        #: the neural stages the gains correct: codes ``[:base_stages]`` are decoded, then scaled by the gain stages
        self.register_buffer("base_stages", torch.tensor(int(base_stages), dtype=torch.int64))
        #: ``[base, base]``: row ``k - 1`` = the codes of digital silence at ``k`` stages (zero-padded): the codec's
        #: padding code, and the code of every silent frame (stored, so every device uses the same)
        sil = torch.zeros(base_stages, base_stages, dtype=torch.int64) if silence_codes is None else \
            torch.as_tensor(silence_codes, dtype=torch.int64)
        if sil.shape != (base_stages, base_stages) or int(sil.min()) < 0 or int(sil.max()) >= 2 ** code_bits:
            raise ValueError(f"band gains: silence codes must be [{base_stages}, {base_stages}] codes in "
                             f"[0, {2 ** code_bits})")
        self.register_buffer("silence_codes", sil)

    @property
    def base(self) -> int:
        return int(self.base_stages)

    def silence(self, k: int) -> torch.Tensor:
        """``[k]`` int64: the code of a frame of digital silence at ``k`` stages (gain stages: 0)."""
        row = self.silence_codes[min(k, self.base) - 1, :min(k, self.base)]
        return torch.cat([row, row.new_zeros(max(0, k - self.base))])

    # -- layout ------------------------------------------------------------------------------------
    @property
    def n_bands(self) -> int:
        return self.levels.shape[0]

    @property
    def band_bits(self) -> int:
        return int(math.log2(self.levels.shape[1]))

    @property
    def n_stages(self) -> int:
        """Code stages that hold every band's index."""
        return math.ceil(self.n_bands * self.band_bits / self.code_bits)

    def bands_in(self, n_stages: int) -> int:
        """How many bands (from band 0) ``n_stages`` gain stages code completely."""
        return min(self.n_bands, (n_stages * self.code_bits) // self.band_bits)

    def band_of_bin(self) -> torch.Tensor:
        """``[edges[-1]]`` int64: the band each MDCT bin belongs to."""
        widths = self.edges[1:] - self.edges[:-1]
        return torch.repeat_interleave(torch.arange(self.n_bands, device=self.edges.device), widths)

    def energy(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``coeffs: [B, n_bins, F]`` MDCT -> ``[B, n_bands, F]`` energy per band (bins past ``edges[-1]``: none)."""
        e = coeffs[:, : int(self.edges[-1])].double().pow(2)
        out = torch.zeros(coeffs.shape[0], self.n_bands, coeffs.shape[2], dtype=torch.float64, device=coeffs.device)
        return out.index_add_(1, self.band_of_bin(), e)

    # -- coding ------------------------------------------------------------------------------------
    def gains_db(self, target: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """``target, decoded: [B, n_bins, F]`` MDCT -> ``[B, n_bands, F]`` dB the decoded bands fall short of the
        target's."""
        et, ed = self.energy(target), self.energy(decoded)
        return (10.0 * torch.log10((et + ENERGY_FLOOR) / (ed + ENERGY_FLOOR))).float()

    def quantize(self, gains_db: torch.Tensor) -> torch.Tensor:
        """``[B, n_bands, F]`` dB -> level index ``[B, n_bands, F]`` int64 (the nearest level of each band)."""
        lev = self.levels[None, :, None, :]  # [1, nb, 1, L]
        return (gains_db[..., None] - lev).abs().argmin(dim=-1)

    def encode(self, target: torch.Tensor, decoded: torch.Tensor, n_stages: int) -> torch.Tensor:
        """Gain codes ``[B, n_stages, F]`` int64 that bring ``decoded``'s band energies to ``target``'s."""
        if not 0 <= n_stages <= self.n_stages:
            raise ValueError(f"band gains hold {self.n_stages} stages, asked for {n_stages}")
        idx = self.quantize(self.gains_db(target, decoded))  # [B, nb, F]
        bits = _to_bits(idx, self.band_bits)  # [B, nb * band_bits, F], band 0 first
        pad = self.n_stages * self.code_bits - bits.shape[1]
        bits = torch.cat([bits, bits.new_zeros(bits.shape[0], pad, bits.shape[2])], dim=1)
        return _from_bits(bits, self.code_bits)[:, :n_stages]

    def decode_db(self, codes: torch.Tensor) -> torch.Tensor:
        """Gain codes ``[B, S, F]`` -> ``[B, n_bands, F]`` dB (0 for the bands the ``S`` stages do not complete)."""
        b, s, f = codes.shape
        if s > self.n_stages:
            raise ValueError(f"band gains hold {self.n_stages} stages, got {s}")
        nb = self.bands_in(s)
        idx = _from_bits(_to_bits(codes, self.code_bits)[:, : nb * self.band_bits], self.band_bits)  # [B, nb, F]
        db = torch.zeros(b, self.n_bands, f, device=codes.device)
        if nb:
            lev = self.levels[:nb].to(codes.device)
            db[:, :nb] = torch.gather(lev[None].expand(b, -1, -1), 2, idx)
        return db

    def scale(self, codes: torch.Tensor, n_bins: int) -> torch.Tensor:
        """Gain codes ``[B, S, F]`` -> amplitude factor per MDCT bin ``[B, n_bins, F]`` (1 past ``edges[-1]``)."""
        amp = torch.pow(10.0, self.decode_db(codes) / 20.0)  # [B, nb, F]
        out = torch.ones(codes.shape[0], n_bins, codes.shape[2], device=codes.device)
        out[:, : int(self.edges[-1])] = amp[:, self.band_of_bin()]
        return out


def _to_bits(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """``x: [B, N, F]`` int64 in ``[0, 2 ** nbits)`` -> ``[B, N * nbits, F]`` bits, most significant first."""
    shifts = torch.arange(nbits - 1, -1, -1, device=x.device)
    return ((x[:, :, None, :] >> shifts[None, None, :, None]) & 1).reshape(x.shape[0], -1, x.shape[2])


def _from_bits(bits: torch.Tensor, nbits: int) -> torch.Tensor:
    """``bits: [B, N * nbits, F]`` -> ``[B, N, F]`` int64, each from ``nbits`` bits, most significant first."""
    weights = 1 << torch.arange(nbits - 1, -1, -1, device=bits.device)
    b, n, f = bits.shape
    return (bits.reshape(b, n // nbits, nbits, f) * weights[None, None, :, None]).sum(2)


def fit_levels(gains_db: torch.Tensor, n_levels: int, iters: int = 40, clip_db: float = 15.0) -> torch.Tensor:
    """Lloyd-Max scalar quantizer levels per band: ``gains_db [n_bands, N]`` (training frames) -> ``[n_bands, L]``
    sorted dB levels minimising the squared dB error (values clipped to +-``clip_db`` first)."""
    g = gains_db.double().clamp(-clip_db, clip_db)
    q = (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels
    lev = torch.quantile(g, q.to(g), dim=1).t().contiguous()  # [nb, L]
    for _ in range(iters):
        idx = (g[..., None] - lev[:, None, :]).abs().argmin(-1)  # [nb, N]
        s = torch.zeros_like(lev).scatter_add_(1, idx, g)
        c = torch.zeros_like(lev).scatter_add_(1, idx, torch.ones_like(g))
        lev = torch.where(c > 0, s / c.clamp_min(1), lev)
        lev, _ = lev.sort(dim=1)
    return lev.float()


def bark_edges(n_bins: int = 320) -> torch.Tensor:
    """The default 40 bands over 320 bins (37.5 Hz each at 24 kHz): 2 bins wide to 600 Hz, 4 to 1.8 kHz, 8 to
    6 kHz, 16 above (narrow where the ear and the mel scale resolve finely)."""
    e: list[int] = []
    for a, b, w in ((0, 16, 2), (16, 48, 4), (48, 160, 8), (160, n_bins, 16)):
        e.extend(range(a, b, w))
    return torch.tensor(e + [n_bins], dtype=torch.int64)
