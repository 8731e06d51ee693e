"""``neural_rvq``: a trained MDCT-domain convolutional autoencoder with a residual vector quantizer.

Signal path (24 kHz mono, one frame per 320 samples = 75 frames/s)::

    wav -> MDCT (hop 320, sine window) -> companding |x|^0.5 -> per-bin normalisation
        -> Conv1d encoder over frames -> latent [B, 64, F] -> RVQ (up to 32 x 1024 codes)
        -> Conv1d decoder -> companded MDCT coefficients -> sign dither -> expansion -> IMDCT -> wav

*Sign dither* (version 2, issue 20): above a stage-dependent frequency (``dither_from_hz``) the decoder does not
code the waveform (its coefficients do not correlate with the original's) and gives bins nearly the same signs
frame after frame, which sounds as stationary tones at multiples of 75 Hz; each decoded frame's bands up there get
a pseudo-random sign hashed from the codes (``dither``), so windowed decoding stays exact.

The encoder is symmetric (looks 16 frames back and ahead); the decoder is causal over codes (32 frames
back, none ahead), so a file costs just one code frame beyond ``ceil(T / hop)``. Entry 0 of every
codebook is pinned to the zero vector: the code-0 padding the pipeline puts before a file's first frame
then decodes like the zero padding seen in training. Every convolution is a *valid* convolution over frames, so a code depends on a fixed, finite span
of samples and a decoded sample on a fixed span of codes; the declared contexts follow from the
receptive fields (``encoder_rf``/``decoder_rf``), which makes windowed encoding and decoding give the
same result as whole-signal processing.

Training (``pipeline/train.py``) runs the same convolutions with zero padding (``pad=True``) so a
training segment keeps its length; at inference the pipeline supplies the real context instead.
The bitrate ladder is 1.5/3/6/12/24 kbps = 2/4/8/16/32 stages (quantizer dropout in training).

*Band gains* (codec version 3, release 7): a checkpoint may carry ``band_gains.*`` tables (``bandgain.py``); the
stages past ``band_gains.base`` (16) are then not RVQ stages but per-frame energy corrections of 40 bands of the
16-stage decode: ``decode`` scales each band by its coded level, ``encode`` decodes its own 16-stage codes (reading
the shared decoder's look-back, so ``encode_context`` grows by its 32 frames) and codes what each band lacks. The
padding code is then the (stored) code of digital silence, and frames of digital silence get it at every rate, so
the encoder's base and the decoder's agree at a file's start.

*Bin spreading* (codec version 4, release 8): a checkpoint may carry ``bin_spread.*`` (``binspread.py``); each
decoded frame's bins from ``bin_spread.first_bin`` up then get the root-mean-square magnitude of their neighbourhood
(signs kept), which fills the fixed comb of near-empty bins the decoder leaves above a few kHz. It acts on the
decoded coefficients before the band gains, in ``decode`` and in the encoder's decode of its own base alike. Such
weights may also carry their own sign-dither cutoffs (``dither_cutoffs.table``, ``set_dither_cutoffs``), which then
replace ``dither_from_hz`` (release 8: 9-16 stages from 2 kHz). Codec version 5 (release 9) lets the spread act only
on decodes of at most ``bin_spread.max_stages`` RVQ stages: release 9's shared decoder, trained with the 7-scale
mel loss, fills much of its comb itself (spreading the rest scored worse), and only its 1.5 kbps decoder (release
8's) is spread.

*Rung decoders*: a checkpoint may carry, beside the shared decoder, a dedicated decoder for one rung
(``rung_decoders.<K>``: the shared decoder's shape, optionally with more residual blocks: a longer look-back,
which widens ``decode_context[0]``; and optionally symmetric *look-ahead* blocks, which widen both sides of
``decode_context``, so every file then stores that many more code frames at every rung), used whenever
exactly ``K`` stages are decoded.
The encoder and codebooks stay shared, so codes are the same; only that rung's reconstruction is
specialised (``audioarc train --rung-decoder K``; stored as float16 in the weights file, run in
float32). A checkpoint without one loads and hashes as before.
"""
from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CodecUnavailableError
from .bandgain import BandGains, bark_edges
from .binspread import BinSpread
from .base import Codec
from .mdct import MDCT
from .rvq import ResidualVQ


class ResBlock(nn.Module):
    """``x + conv1x1(elu(conv3_dilated(elu(x))))``; valid: trims ``dilation`` frames each side
    (``causal``: ``2 * dilation`` frames on the left only)."""

    def __init__(self, channels: int, dilation: int, causal: bool = False):
        super().__init__()
        self.dilation = dilation
        self.trim = (2 * dilation, 0) if causal else (dilation, dilation)
        self.conv1 = nn.Conv1d(channels, channels, 3, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, pad: bool = False) -> torch.Tensor:
        h = F.elu(x)
        if pad:
            h = F.pad(h, self.trim)
        y = self.conv2(F.elu(self.conv1(h)))
        if not pad:
            x = x[..., self.trim[0]:x.shape[-1] - self.trim[1]]
        return x + y


class FrameNet(nn.Module):
    """Conv3 in -> [look-ahead blocks] -> residual dilated blocks -> ELU -> conv1x1 out.

    Receptive field ``rf = (left, right)`` frames: ``1 + sum(dilations)`` each side, or
    ``2 + 2 * sum(dilations)`` on the left only when ``causal``; the optional symmetric ``ahead`` blocks
    (``look_ahead``; none by default, so no state) add their dilations on both sides.
    """

    def __init__(self, c_in: int, width: int, c_out: int, dilations: tuple[int, ...], causal: bool = False):
        super().__init__()
        self.inp = nn.Conv1d(c_in, width, 3)
        self.ahead = nn.ModuleList()  # symmetric blocks giving a causal net some look-ahead
        self.blocks = nn.ModuleList(ResBlock(width, d, causal) for d in dilations)
        self.out = nn.Conv1d(width, c_out, 1)
        self.in_trim = (2, 0) if causal else (1, 1)
        self.causal = causal
        self._set_rf()

    def _set_rf(self) -> None:
        blocks = (*self.ahead, *self.blocks)
        self.rf = (self.in_trim[0] + sum(b.trim[0] for b in blocks), self.in_trim[1] + sum(b.trim[1] for b in blocks))

    def deepen(self, n: int) -> None:
        """Append ``n`` residual blocks, dilations doubling on from the last, each starting as the identity
        (zero output convolution): the net computes the same function, with more capacity and context."""
        width = self.inp.out_channels
        for _ in range(n):
            b = ResBlock(width, 2 * self.blocks[-1].dilation, self.causal).to(self.inp.weight)
            nn.init.zeros_(b.conv2.weight)
            nn.init.zeros_(b.conv2.bias)
            self.blocks.append(b)
        self._set_rf()

    def look_ahead(self, n: int) -> None:
        """Add ``n`` symmetric residual blocks (dilations 1, 2, 4, ...) right after the input convolution,
        each starting as the identity: ``2**n - 1`` frames of look-ahead (and as many more of look-back)."""
        width = self.inp.out_channels
        for _ in range(n):
            b = ResBlock(width, 2 ** len(self.ahead), causal=False).to(self.inp.weight)
            nn.init.zeros_(b.conv2.weight)
            nn.init.zeros_(b.conv2.bias)
            self.ahead.append(b)
        self._set_rf()

    def forward(self, x: torch.Tensor, pad: bool = False) -> torch.Tensor:
        if pad:
            x = F.pad(x, self.in_trim)
        h = self.inp(x)
        for b in (*self.ahead, *self.blocks):
            h = b(h, pad)
        return self.out(F.elu(h))


class DitherCutoffs(nn.Module):
    """A weights file's own sign-dither cutoffs (``table [n, 2]``: rows of (largest stage count, Hz), stage counts
    rising, the last covering every stage), replacing ``NeuralRvqCodec.dither_from_hz``."""

    def __init__(self, pairs, n_q: int, sample_rate: int):
        super().__init__()
        t = torch.as_tensor(pairs, dtype=torch.float32)
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"dither cutoffs: a table of (stage count, Hz) rows, got shape {list(t.shape)}")
        k, hz = t[:, 0], t[:, 1]
        if not 1 <= t.shape[0] <= 16 or not bool((k == k.round()).all()) or bool((k[1:] <= k[:-1]).any()) \
                or float(k[0]) < 1 or float(k[-1]) < n_q:
            raise ValueError(f"dither cutoffs: 1-16 rows of rising whole stage counts, the last >= {n_q}, got "
                             f"{t.tolist()}")
        if not bool(torch.isfinite(hz).all()) or float(hz.min()) < 0 or float(hz.max()) > sample_rate / 2:
            raise ValueError(f"dither cutoffs: frequencies must lie in [0, {sample_rate / 2:g}] Hz")
        self.register_buffer("table", t)

    def pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(hz)) for k, hz in self.table.tolist())


class NeuralRvqCodec(Codec):
    """MDCT-domain conv autoencoder + RVQ (see the module docstring)."""

    name = "neural_rvq"
    #: 2: sign dither above dither_from_hz (decoded audio differs from version 1 there); 3: weights may carry band
    #: gains (``set_band_gains``), which then code the stages past their base (weights without them decode as in 2);
    #: 4: weights may carry a bin spread (``set_bin_spread``) and their own dither cutoffs (``set_dither_cutoffs``;
    #: weights without them decode as in 3); 5: a bin spread may be limited to decodes of at most K stages
    #: (``bin_spread.max_stages``; weights without one decode as in 4)
    version = "5"
    sample_rate = 24000
    hop_length = 320
    codebook_size = 1024
    n_q = 32
    ladder_n_q = (2, 4, 8, 16, 32)
    power = 0.5  # companding exponent
    #: sign dither (``dither_signs``, on by default): for ``n_q`` up to the first number of each pair, the MDCT
    #: bins from the second number (Hz) up get one pseudo-random sign per frame, drawn from the codes (``dither``). Measured (issue 20):
    #: above these frequencies the decoded coefficients do not correlate with the original's (coherence
    #: |sum(XY)| / sqrt(sum X^2 sum Y^2) <= 0.07 on speech and music, at every stage count; HF sines come back
    #: with 1-7 % of their energy and coherence <= 0.01): the decoder fills those bands with
    #: noise of the right level but *fixed signs*, so a stationary input decodes to nearly the same coefficients
    #: frame after frame, which the IMDCT turns into a comb of stationary tones at multiples of 75 Hz.
    #: (The cutoffs are where that coherence falls below ~0.1 at each stage count.)
    dither_from_hz = ((4, 1000.0), (6, 1500.0), (8, 2000.0), (32, 2500.0))
    dither_signs = True
    #: the sign hashes only the first stages' codes: they are the ones encoders agree on (near-tie flips between
    #: thread counts or devices happen deep in the stack), so such a flip does not flip a frame's band
    dither_stages = 2

    def __init__(self, width: int = 256, latent_dim: int = 64, dilations: tuple[int, ...] = (1, 2, 4, 8),
                 n_q: int = 32, codebook_size: int = 1024, rung_decoders: tuple[int, ...] = ()):
        super().__init__()
        hop = self.hop_length
        self.n_q = n_q
        self.codebook_size = codebook_size
        self.ladder_n_q = tuple(k for k in (2, 4, 8, 16, 32) if k <= n_q)
        self.latent_dim = latent_dim
        self.mdct = MDCT(hop)
        self.encoder = FrameNet(hop, width, latent_dim, dilations)
        # causal decoder: a decoded frame needs no codes after it, so a file costs only one extra
        # frame of codes (decode_context[1] = 1); the encoder looks ahead instead (samples are free)
        self.decoder = FrameNet(latent_dim, width, hop, dilations, causal=True)
        self.rvq = ResidualVQ(latent_dim, codebook_size, n_q)
        # dedicated decoders for single rungs (keys: str(n_q)); empty = no extra state, hash unchanged
        self.rung_decoders = nn.ModuleDict()
        for k in rung_decoders:
            self.add_rung_decoder(k)
        # per-bin scale of the companded coefficients (1 / std over training data); set by training
        self.register_buffer("feat_scale", torch.ones(hop))
        self.band_gains = None  # optional gain stages after the first ``band_gains.base`` (see set_band_gains)
        self.bin_spread = None  # optional evening-out of the decoded high bins (see set_bin_spread)
        self.dither_cutoffs = None  # optional: the weights' own dither_from_hz (see set_dither_cutoffs)
        self._set_encode_context()
        self._set_decode_context()

    def _set_encode_context(self) -> None:
        hop = self.hop_length
        el, er = self.encoder.rf
        # encode frames [a, b): MDCT frames [a - el, b + er), MDCT frame i covers [i*hop - hop, i*hop + hop); with
        # band gains, also the base decoder's look-back: the latents of [a - back, a) (see _gain_lookback)
        self.encode_context = (hop + (el + self._gain_lookback()) * hop, er * hop)

    def _gain_lookback(self) -> int:
        """Code frames before a window the encoder codes too, so it can decode the base and code its gains."""
        bg = getattr(self, "band_gains", None)
        return 0 if bg is None else self.decoder_for(bg.base).rf[0]

    def _set_decode_context(self) -> None:
        # decode samples [a*hop, b*hop): MDCT frames [a, b] (overlap-add), each from codes [i - dl, i + dr];
        # the widest decoder sets it; the shared decoder is causal (dr = 0: one frame beyond ceil(T / hop)),
        # a rung decoder with look-ahead adds its dr frames to every file's frame count
        dl = max(d.rf[0] for d in (self.decoder, *self.rung_decoders.values()))
        dr = max(d.rf[1] for d in (self.decoder, *self.rung_decoders.values()))
        self.decode_context = (dl, dr + 1)

    # -- rung decoders ------------------------------------------------------------------------
    def add_rung_decoder(self, n_q: int, extra_blocks: int = 0, ahead_blocks: int = 0) -> FrameNet:
        """Add (or return) the dedicated decoder for exactly ``n_q`` stages, initialised as a copy of
        the shared decoder (so it starts where the shared one is), then deepened by ``extra_blocks``
        identity-initialised residual blocks (``FrameNet.deepen``: more capacity, longer look-back) and
        ``ahead_blocks`` symmetric ones (``FrameNet.look_ahead``: it may see later codes)."""
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"a rung decoder needs 1 <= n_q <= {self.n_q}, got {n_q}")
        key = str(n_q)
        if key not in self.rung_decoders:
            self.rung_decoders[key] = copy.deepcopy(self.decoder)
        if extra_blocks:
            self.rung_decoders[key].deepen(extra_blocks)
        if ahead_blocks:
            self.rung_decoders[key].look_ahead(ahead_blocks)
        self._set_decode_context()
        if self.encoder is not None:
            self._set_encode_context()  # (a deeper decoder of the band gains' base reads further back)
        return self.rung_decoders[key]

    def decoder_for(self, n_q: int) -> FrameNet:
        """The decoder used for ``n_q`` stages: the rung decoder if one exists, else the shared one."""
        return self.rung_decoders[str(n_q)] if str(n_q) in self.rung_decoders else self.decoder

    def prepare_weights(self, keys, where: str = "checkpoint") -> None:
        """Add the rung decoders (and their extra blocks) that a checkpoint's ``rung_decoders.<K>.*`` keys name."""
        blocks: dict[int, list[int]] = {}  # rung -> [residual blocks, look-ahead blocks] in its decoder
        for key in keys:
            m = re.match(r"rung_decoders\.(\d+)\.(?:(blocks|ahead)\.(\d+)\.)?", key)
            if m:
                n = blocks.setdefault(int(m.group(1)), [0, 0])
                if m.group(2):
                    i = 0 if m.group(2) == "blocks" else 1
                    n[i] = max(n[i], int(m.group(3)) + 1)
        for k, (n, a) in sorted(blocks.items()):
            try:
                dec = self.rung_decoders[str(k)] if str(k) in self.rung_decoders else self.decoder
                self.add_rung_decoder(k, max(0, n - len(dec.blocks)), max(0, a - len(dec.ahead)))
            except ValueError as e:
                raise CodecUnavailableError(f"{where}: {e}") from None
        if "band_gains.levels" in keys and self.band_gains is None:  # the default layout; load_weights reshapes
            try:  # (placeholder silence codes: the file's are read in, no encoder pass on zeros at every load)
                self.set_band_gains(bark_edges(self.hop_length), torch.zeros(40, 16), 16,
                                    torch.zeros(16, 16, dtype=torch.int64))
            except ValueError:  # not this codec's shape: load_weights builds the file's own
                pass

    def load_weights(self, state: dict, where: str = "checkpoint") -> None:
        """Load a checkpoint, first adding the rung decoders and band gains it carries (``prepare_weights``)."""
        sd = state["model"] if "model" in state else state
        self.prepare_weights(sd, where)
        if "band_gains.levels" in sd:  # shaped as the file's tables (prepare_weights assumed the default shape)
            try:
                self.set_band_gains(sd["band_gains.edges"], sd["band_gains.levels"], int(sd["band_gains.base_stages"]),
                                    sd["band_gains.silence_codes"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CodecUnavailableError(f"{where}: unusable band gains ({e})") from None
        if "bin_spread.first_bin" in sd:
            try:
                limit = sd.get("bin_spread.max_stages")
                self.set_bin_spread(int(sd["bin_spread.first_bin"]), int(sd["bin_spread.width"]),
                                    None if limit is None else int(limit))
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CodecUnavailableError(f"{where}: unusable bin spread ({e})") from None
        if "dither_cutoffs.table" in sd:
            try:
                self.set_dither_cutoffs(sd["dither_cutoffs.table"].tolist())
            except (ValueError, TypeError, RuntimeError, AttributeError) as e:
                raise CodecUnavailableError(f"{where}: unusable dither cutoffs ({e})") from None
        self.load_state_dict(sd)

    def set_dither_cutoffs(self, pairs) -> DitherCutoffs:
        """Dither decoded bins from these frequencies up instead of ``dither_from_hz``'s: ``pairs`` of (largest stage
        count, Hz), e.g. ``((4, 1000), (6, 1500), (16, 2000), (32, 2500))``."""
        self.dither_cutoffs = DitherCutoffs(pairs, self.n_q, self.sample_rate).to(self.feat_scale.device)
        return self.dither_cutoffs

    def clear_dither_cutoffs(self) -> bool:
        had = self.dither_cutoffs is not None
        self.dither_cutoffs = None
        return had

    # -- bin spread ----------------------------------------------------------------------------
    def set_bin_spread(self, first_bin: int, width: int, max_stages: int | None = None) -> BinSpread:
        """Even out each decoded frame's energy over ``width`` neighbouring bins from ``first_bin`` up
        (``binspread.BinSpread``), in ``decode`` and in the band-gain encoder's decode of its base; only in decodes
        of at most ``max_stages`` RVQ stages when given."""
        self.bin_spread = BinSpread(first_bin, width, self.hop_length, max_stages, self.n_q).to(self.feat_scale.device)
        return self.bin_spread

    def clear_bin_spread(self) -> bool:
        """Drop the bin spread; True if there was one."""
        had = self.bin_spread is not None
        self.bin_spread = None
        return had

    def decoded_coeffs(self, y: torch.Tensor, n_stages: int) -> torch.Tensor:
        """A decoder's output ``y: [B, hop, F]`` (normalised, companded), decoded from ``n_stages`` RVQ stages ->
        MDCT coefficients ``[B, hop, F]``, spread (``bin_spread``) when the weights carry a spread for that many
        stages; before any band gains."""
        coeffs = self.unfeatures(y)
        return coeffs if self.bin_spread is None or not self.bin_spread.applies(n_stages) else self.bin_spread(coeffs)

    # -- band gains ----------------------------------------------------------------------------
    def set_band_gains(self, edges, levels, base_stages: int = 16, silence_codes=None) -> BandGains:
        """Code the stages after the first ``base_stages`` as band gains (``bandgain.BandGains``): decoding
        ``K > base_stages`` stages decodes the first ``base_stages`` and scales each band of each frame by the gain
        the others code. ``K <= base_stages`` decodes as without them, except that digital silence and the frames
        before a file get the codes of silence (``silence_codes``; default: what this encoder gives for it)."""
        if silence_codes is None and self.encoder is not None:
            silence_codes = self._codes_of_silence(base_stages)
        bg = BandGains(edges, levels, base_stages, code_bits=int(math.log2(self.codebook_size)),
                       silence_codes=silence_codes)
        if int(bg.edges[-1]) > self.hop_length:
            raise ValueError(f"band gains: edges reach bin {int(bg.edges[-1])}, a frame has {self.hop_length}")
        if not 1 <= base_stages or base_stages + bg.n_stages > self.n_q:
            raise ValueError(f"band gains: {base_stages} base + {bg.n_stages} gain stages exceed {self.n_q}")
        if 2 ** bg.code_bits != self.codebook_size:
            raise ValueError(f"band gains: codebook size {self.codebook_size} is not a power of two")
        self.band_gains = bg.to(self.feat_scale.device)
        self._set_encode_context()
        return self.band_gains

    @torch.inference_mode()
    def _codes_of_silence(self, base_stages: int) -> torch.Tensor:
        """``[base, base]``: row ``k - 1`` = the codes this encoder gives a frame of digital silence at ``k`` stages."""
        el, er = self.encoder.rf
        z = self.encoder(torch.zeros(1, self.hop_length, el + er + 1, device=self.feat_scale.device))  # features of 0
        out = torch.zeros(base_stages, base_stages, dtype=torch.int64)
        for k in range(1, min(base_stages, self.n_q) + 1):
            out[k - 1, :k] = self.rvq.encode(z, k)[0, :, 0].cpu()
        return out

    def pad_codes(self, n_q: int) -> torch.Tensor:
        """``[n_q]``: code 0 (the zero latent), or with band gains the codes of digital silence
        (``_silence_padded``)."""
        if self.band_gains is None:
            return super().pad_codes(n_q)
        return self.band_gains.silence(n_q).cpu()

    def clear_band_gains(self) -> bool:
        """Drop the band gains (a training run changes the codes and the decoder they were fitted to); True if there
        were any. Refit them with ``python -m jobs.fit_band_gains`` on the new weights."""
        had = self.band_gains is not None
        self.band_gains = None
        self._set_encode_context()
        return had

    # -- feature transforms -----------------------------------------------------------------
    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav: [B, 1, (F+1)*hop]`` -> normalised companded MDCT ``[B, hop, F]``."""
        x = self.mdct(wav[:, 0, :])
        y = torch.sign(x) * (x.abs() + 1e-12).pow(self.power)
        return y * self.feat_scale[None, :, None]

    def unfeatures(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised companded MDCT -> MDCT coefficients."""
        y = y / self.feat_scale[None, :, None]
        return torch.sign(y) * y.abs().pow(1.0 / self.power)

    def frames_of(self, x) -> torch.Tensor:
        """``x: [T]`` samples -> MDCT ``[1, hop, ceil(T / hop) + 1]`` on the code-frame grid (frame ``i`` covers samples
        ``[i*hop - hop, i*hop + hop)``, zeros outside ``x``): the frames ``encode`` and ``decode`` work on, e.g. to
        compare a decoded file's band energies with its original's (``band_gains.gains_db``)."""
        hop = self.hop_length
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
        x = F.pad(x, (hop, 2 * hop - x.numel() % hop))
        return self.mdct(x[None].to(self.feat_scale.device))

    def synthesize(self, coeffs: torch.Tensor) -> torch.Tensor:
        """MDCT ``[B, hop, F]`` -> complete samples ``[B, 1, (F-1)*hop]`` (the span between frame centres)."""
        out = self.mdct.inverse(coeffs)
        hop = self.hop_length
        return out[:, None, hop: out.shape[-1] - hop]

    # -- the contract ---------------------------------------------------------------------------
    def _release_for_decoding(self, n_q: int) -> None:
        # the encoder, the decoders other than decoder_for(n_q), codebooks past n_q; decode_context stays (it is
        # the archive's frame layout, set by the widest decoder of the full weights)
        n_rvq = self._rvq_stages(n_q)
        keep = self.decoder_for(n_rvq)
        self.encoder = None
        for k in [k for k, d in self.rung_decoders.items() if d is not keep]:
            del self.rung_decoders[k]
        if keep is not self.decoder:
            self.decoder = None
        self.rvq.codebooks = self.rvq.codebooks[:n_rvq].clone()
        self.rvq.n_q = n_rvq  # (band gains stay at every rate: their silence codes are the padding code)

    def _rvq_stages(self, n_q: int) -> int:
        """How many of ``n_q`` stages are RVQ stages (the rest are band gains)."""
        return n_q if self.band_gains is None else min(n_q, self.band_gains.base)

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor, n_q: int) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError(f"{self.name}: loaded for decoding only (for_decoding), it cannot encode")
        if n_q < 1 or n_q > self.n_q:
            raise ValueError(f"n_q must be in [1, {self.n_q}], got {n_q}")
        if self.band_gains is None:
            return self.rvq.encode(self.encoder(self.features(wav)), n_q)
        back = self._gain_lookback()
        if n_q <= self.band_gains.base:  # no gain stages: the look-back samples are not needed
            wav = wav[..., back * self.hop_length:]
            return self._silence_padded(self.rvq.encode(self.encoder(self.features(wav)), n_q), wav)
        z = self.encoder(self.features(wav))  # latents of frames [a - back, b)
        codes = self._silence_padded(self.rvq.encode(z, self.band_gains.base), wav)
        # band gains: decode the base (frames a..b-1 from the codes of [a - back, b)), code what it lacks
        bg = self.band_gains
        y = self.decoder_for(bg.base)(self.rvq.decode(codes))  # [B, hop, b - a]
        el = self.encoder.rf[0]
        target = self.mdct(wav[:, 0, :])[..., back + el: back + el + y.shape[-1]]
        gains = bg.encode(target, self.decoded_coeffs(y, bg.base), n_q - bg.base)
        return torch.cat([codes[..., back:], gains], dim=1)

    def _silence_padded(self, codes: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        """``codes [B, K, F]`` of the latents of ``wav``, with the padding code (``pad_codes``: the codes of digital
        silence) for every frame whose MDCT frame is digital silence (weights with band gains). Frames before a file
        are such frames, and the decoder reads the padding code there: so the base the encoder decodes to code its
        gains is the one the decoder will decode at a file's start too (the encoder's own codes of the silence
        before a file, which also see the file's first samples, put up to 39 dB of error into the first frames'
        gains, measured)."""
        hop, el = self.hop_length, self.encoder.rf[0]
        silent = (wav[:, 0].unfold(-1, 2 * hop, hop) == 0).all(-1)[:, el: el + codes.shape[-1]]  # [B, F]
        pad = self.pad_codes(codes.shape[1]).to(codes.device)[None, :, None]
        return torch.where(silent[:, None, :], pad, codes)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        kept = getattr(self, "_decode_only", None)
        if kept and codes.shape[1] > kept[1]:
            raise ValueError(f"{self.name}: kept for decoding {kept[1]} stages (for_decoding), got {codes.shape[1]}")
        k = self._rvq_stages(codes.shape[1])
        z = self.rvq.decode(codes[:, :k])
        dec = self.decoder_for(k)
        # a decoder with less context than the widest one skips the codes it does not read
        dl, dr = self.decode_context[0], self.decode_context[1] - 1
        y = dec(z[..., dl - dec.rf[0]: z.shape[-1] - (dr - dec.rf[1])])  # [B, hop, b - a + 1] = MDCT frames a..b
        if self.dither_signs:
            y = y * self.dither(codes[:, :k], y.shape[-1])
        coeffs = self.decoded_coeffs(y, k)
        if k < codes.shape[1]:  # band gains of MDCT frames a..b (code frames dl .. dl + b - a)
            coeffs = coeffs * self.band_gains.scale(codes[:, k:, dl: dl + y.shape[-1]], self.hop_length)
        return self.synthesize(coeffs)

    _P = 2147483647  # 2^31 - 1: every product below stays under 2^62, exact in int64 on any device

    def dither(self, codes: torch.Tensor, n_frames: int) -> torch.Tensor:
        """``[B, hop, n_frames]`` of +-1 (float): the sign ``decode`` gives decoded MDCT frame ``j`` (codes frame
        ``decode_context[0] + j``) in the bins from ``dither_from_hz`` (or the weights' ``dither_cutoffs``) up (1 below): one pseudo-random sign per frame,
        a hash of the codes of that frame and of the one before (their first ``dither_stages`` stages). It needs no more context than the
        decoder reads (windowed decoding stays exact) and is the same on every device (integer arithmetic). Within a
        frame the decoder's coefficients keep their relative signs (its spectral and temporal shape); across frames
        the band's sign varies, so a band decoded alike frame after frame is noise again, not a comb of tones.
        Stationary noise gets codes that differ from frame to frame; only identical code pairs repeat their sign
        (e.g. digital silence, which decodes ~100 dB down)."""
        n_q, hop, P = codes.shape[1], self.hop_length, self._P
        table = self.dither_from_hz if self.dither_cutoffs is None else self.dither_cutoffs.pairs()
        hz = next((f for k, f in table if n_q <= k), table[-1][1])
        k0 = min(hop, math.ceil(hz * 2 * hop / self.sample_rate))  # first bin whose lower edge is >= hz
        dl = self.decode_context[0]
        c = codes[..., dl - 1: dl + n_frames].to(torch.int64)  # [B, K, n_frames + 1]: the frame before, then each
        h = torch.full_like(c[:, 0, 1:], 12345)
        for frame in (c[..., 1:], c[..., :-1]):
            for q in range(min(n_q, self.dither_stages)):
                h = (h * 1000003 + frame[:, q] + 1) % P
        for _ in range(3):  # xor-shift-multiply rounds: every code bit reaches the sign bit
            h = ((h ^ (h >> 13)) * 1103515245 + 12345) % P
        s = torch.ones(codes.shape[0], hop, n_frames, device=codes.device)
        s[:, k0:] = (1.0 - 2.0 * ((h >> 15) & 1).float())[:, None, :]
        return s

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
