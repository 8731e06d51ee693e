"""EnCodec (Défossez et al. 2022, ``pip install --no-deps encodec==0.1.1 einops``) as audioarc codecs.

The adapters wrap the real ``encodec.EncodecModel`` architectures and load the checkpoint file the
user points to (``--codec-weights PATH``): the official ``encodec_24khz-d7cc33bc.th`` /
``encodec_48khz-7e698e3e.th`` state dicts, or ``{"model": state_dict}``. Nothing is downloaded.

``encodec_24khz`` (mono, causal, 75 frames/s, 32 x 1024 codebooks, 1.5/3/6/12/24 kbps = 2..32 stages)
----------------------------------------------------------------------------------------------
EnCodec codes a whole file in one pass; its SEANet encoder and decoder each hold a 2-layer LSTM, so
in principle every code depends on everything before it. The adapter makes it *windowed* like every
audioarc codec: the encoder runs over a window plus ``ENCODE_CONTEXT_S`` of real audio before it
(the LSTM state has converged by then) and keeps the window's frames; the decoder likewise re-runs
``DECODE_CONTEXT_S`` of codes before the window. Both networks are causal (every convolution pads
on the left only), so no right context is needed and a file costs exactly ``ceil(T / 320)`` code
frames, as in EnCodec itself. Memory is bounded by the window (30 s by default) whatever the file
length; a file of any length is cut into windows by ``windows.Windower`` and joined by ``Joiner``.

The contexts were chosen by measurement (``python -m jobs.tools.encodec_context``: random weights of the
real architecture with codebooks initialised from its latents, two seeds, 20 s of chirp + tone +
noise, 2 s windows vs one window; table in ``pipeline/codec/weights/encodec.md``): from 0.5 s of
context on, the windowed encoder's latents agree with whole-signal encoding to float rounding
(1.2e-6 of their RMS; 0.03% of the codes at 6 kbps still differ: near-ties between two codewords,
which no context removes) and windowed decoding agrees with whole-signal decoding to 1-2e-6 of the
output RMS at every sample, joins included; 1 s each side doubles that margin for 3% more work.
With no context the joins are off by 40-60% of the RMS. Caveat: a random LSTM with raised forget
biases (much longer memory) never converges, whatever the context; the trained weights cannot be
measured here, so the card asks users to run the measurement once on their checkpoint
(``--weights PATH``). The encoder sees 1 s of silence before a file's first sample (EnCodec
reflects the first samples instead) and the decoder's left context at the start is the code of
that silence (``pad_codes``), not code 0.

``encodec_48khz`` (joint stereo, 150 frames/s, 16 x 1024 codebooks, 3/6/12/24 kbps = 2..16 stages)
-------------------------------------------------------------------------------------------------
Coded as EnCodec codes it, in independent 1 s segments normalised by their RMS and crossfaded over
1%; the per-segment gain is stored beside the codes (archive format 1.1). See ``Encodec48kCodec``.
"""
from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import torch

from ..errors import CodecUnavailableError
from .base import Codec

INSTALL = "pip install --no-deps encodec==0.1.1 einops"
ENCODE_CONTEXT_S = 1.0
DECODE_CONTEXT_S = 1.0


class _TorchaudioPlaceholder(types.ModuleType):
    """Stands in for torchaudio while ``encodec`` is imported: encodec imports it at module top but
    only uses it to load/save/convert files, which audioarc never asks it to do."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"torchaudio.{name}: torchaudio is not installed (audioarc imports encodec "
                          f"without it and does its own audio I/O and resampling)")


def import_encodec():
    """``import encodec``, working around a missing or broken torchaudio; raises CodecUnavailableError
    with the install command when encodec itself is missing."""
    if sys.modules.get("encodec") is not None:
        return sys.modules["encodec"]
    placeholder = None
    try:
        import torchaudio  # noqa: F401 - the real one, when it loads
    except Exception:  # noqa: BLE001 - missing (ImportError) or built for another torch (OSError)
        sys.modules.pop("torchaudio", None)
        placeholder = sys.modules["torchaudio"] = _TorchaudioPlaceholder("torchaudio")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import encodec
    except ImportError as e:
        raise CodecUnavailableError(
            f"the EnCodec codecs need the `encodec` package ({e}); install it with `{INSTALL}` "
            f"(--no-deps: its torchaudio requirement would replace torch, and audioarc does not need it)"
        ) from None
    finally:
        if placeholder is not None and sys.modules.get("torchaudio") is placeholder:
            del sys.modules["torchaudio"]
    return encodec


def _build(which: str):
    encodec = import_encodec()
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated (still exact)
        warnings.simplefilter("ignore")
        if which == "24":
            return encodec.EncodecModel.encodec_model_24khz(pretrained=False)
        return encodec.EncodecModel.encodec_model_48khz(pretrained=False)


class _EncodecBase(Codec):
    """Holds EnCodec's encoder, quantizer and decoder under their own names, so the state dict keys are
    exactly those of ``EncodecModel`` (the official checkpoints load as they are)."""

    codebook_size = 1024
    needs_weights = True

    def __init__(self, which: str):
        super().__init__()
        m = _build(which)
        self.encoder, self.quantizer, self.decoder = m.encoder, m.quantizer, m.decoder
        self.model_hop = int(np.prod(m.encoder.ratios))
        self.target_bandwidths = tuple(float(b) for b in m.target_bandwidths)
        self.eval()

    def _latent_codes(self, emb: torch.Tensor, n_q: int) -> torch.Tensor:
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q must be in [1, {self.n_q}], got {n_q}")
        return self.quantizer.vq.encode(emb, n_q=n_q).transpose(0, 1).to(torch.int64)  # [B, n_q, F]

    def _latent(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.vq.decode(codes.transpose(0, 1))

    def load_weights(self, state: dict, where: str = "checkpoint") -> None:
        sd = state["model"] if "model" in state and isinstance(state["model"], dict) else state
        getattr(self, "_pad", {}).clear()  # codes derived from the old weights
        try:
            self.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CodecUnavailableError(
                f"{where} is not a {self.name} checkpoint ({' '.join(first[:3])[:400]}); pass the "
                f"official {self.checkpoint_file} (or a state dict of the same architecture)") from None

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Encodec24kCodec(_EncodecBase):
    """EnCodec 24 kHz (mono, causal), windowed with measured LSTM context (module docstring)."""

    name = "encodec_24khz"
    version = "encodec-0.1.1-24khz"
    checkpoint_file = "encodec_24khz-d7cc33bc.th"
    sample_rate = 24000
    hop_length = 320
    n_q = 32
    ladder_n_q = (2, 4, 8, 16, 32)
    encode_context = (int(ENCODE_CONTEXT_S * 75) * 320, 0)
    decode_context = (int(DECODE_CONTEXT_S * 75), 0)

    def __init__(self):
        super().__init__("24")
        self._pad: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor, n_q: int) -> torch.Tensor:
        hop = self.hop_length
        if wav.shape[-1] % hop:
            raise ValueError(f"window of {wav.shape[-1]} samples is not a multiple of the hop ({hop})")
        emb = self.encoder(wav)  # causal: frame i from samples < (i + 1) * hop
        lo, hi = self.encode_context[0] // hop, emb.shape[-1] - self.encode_context[1] // hop
        return self._latent_codes(emb[..., lo:hi], n_q)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        wav = self.decoder(self._latent(codes))  # causal: samples of frame i from codes <= i
        hop, (dl, dr) = self.hop_length, self.decode_context
        return wav[..., dl * hop: wav.shape[-1] - dr * hop]

    @torch.inference_mode()
    def pad_codes(self, n_q: int) -> torch.Tensor:
        """``[n_q]``: the code of a silent frame (what the encoder gives for the silence the Windower
        puts before a file); the decoder's left context before a file's first frame."""
        if n_q not in self._pad:
            hop, ctx = self.hop_length, self.encode_context[0]
            x = torch.zeros(1, 1, ctx + 8 * hop, device=next(self.parameters()).device)
            codes = self.encode(x, n_q)
            self._pad[n_q] = codes[0, :, -1].cpu()
        return self._pad[n_q]


class Encodec48kCodec(_EncodecBase):
    """EnCodec 48 kHz: joint stereo, coded in independent 1 s segments, each divided by its RMS.

    EnCodec's 48 kHz model is trained and run on 1 s segments (48000 samples = 150 frames of 320):
    each segment is normalised by the RMS of its mono mix (the float ``scale`` must be kept to decode),
    coded on its own (its SEANet uses time group norm over the whole segment, so a segment's codes do
    not depend on anything outside it), and decoded segments are overlap-added with a linear
    crossfade over 1% of a segment. The adapter does the same, on a grid that keeps
    audioarc's one-code-vector-per-hop contract:

    * segment ``k`` is samples ``[k * 47550, k * 47550 + 48000)``: 150 code frames, overlapping the next
      segment by 450 samples (EnCodec: stride 47520, overlap 480; both ~1%). So ``hop_length`` is the
      new signal per code frame, ``47550 / 150 = 317`` samples, ``segment_frames = 150``: windows hold
      whole segments, ``encode_context = (0, 450)`` (the overlap), ``decode_context = (150, 0)`` (the
      previous segment, for the crossfade; its gain 0 marks "no segment" at the start of a file). A
      last, partial segment of ``m`` frames is coded from ``m * 320`` samples.
    * the gain: per segment and stream, the RMS scale rounded to float16 *before* normalising (the
      encoder sees ``x / g16``, the decoder multiplies by the same ``g16``, so storing it as float16
      loses nothing); floored at 2^-24 so that 0 stays free to mean "absent". The archive keeps it in
      the ``gains`` column (format 1.1): 16 bits per 0.99 s = 16.2 bit/s per stream, +0.27% at
      6 kbps (+0.54% at 3 kbps); EnCodec's own container spends 32 bits per segment.
    * bitrate: the ladder is EnCodec's nominal 3/6/12/24 kbps (2/4/8/16 stages at 150 frames/s per
      stream); the 1% segment overlap makes the stored rate 320/317 = +0.95% higher (EnCodec's own
      overlap: +1.01%), plus the gains; the encode summary's ``effective_kbps`` shows all of it.

    Stereo files are one stream; mono files are coded as identical stereo and restored as the mean;
    files with more channels are refused (the pipeline records them as failed, naming the fix).
    """

    name = "encodec_48khz"
    version = "encodec-0.1.1-48khz"
    checkpoint_file = "encodec_48khz-7e698e3e.th"
    sample_rate = 48000
    channels = 2
    n_q = 16
    ladder_n_q = (2, 4, 8, 16)
    segment_frames = 150
    side_gains = True
    SEGMENT = 48000  # samples per segment (EnCodec: 1 s)
    STRIDE = 47550  # between segment starts (segment_frames * hop_length)
    hop_length = STRIDE // 150  # 317
    encode_context = (0, SEGMENT - STRIDE)
    decode_context = (150, 0)
    GAIN_FLOOR = 2.0 ** -24  # smallest positive float16

    def __init__(self):
        super().__init__("48")
        assert self.model_hop * self.segment_frames == self.SEGMENT
        t = torch.linspace(0, 1, self.SEGMENT + 2)[1:-1]
        self.register_buffer("_fade", 0.5 - (t - 0.5).abs(), persistent=False)  # EnCodec's OLA weight

    def kbps(self, n_q: int) -> float:
        """Nominal (EnCodec's bandwidths): ``n_q`` x 10 bits x 150 frames/s per stereo stream."""
        return float(n_q * np.log2(self.codebook_size) * self.sample_rate / self.model_hop / 1000.0)

    def _segments(self, n_frames: int) -> list[tuple[int, int]]:
        """``(first frame, frames)`` of each segment of a window of ``n_frames`` frames."""
        seg = self.segment_frames
        return [(a, min(seg, n_frames - a)) for a in range(0, n_frames, seg)]

    def _batched(self, fn, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``fn`` over same-length parts in one batch (the full segments), the others one by one."""
        out: list[torch.Tensor | None] = [None] * len(parts)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(parts):
            by_len.setdefault(p.shape[-1], []).append(i)
        for idx in by_len.values():
            y = fn(torch.cat([parts[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = y[j * parts[i].shape[0]:(j + 1) * parts[i].shape[0]]
        return out

    @torch.inference_mode()
    def encode_with_gains(self, wav: torch.Tensor, n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, length = wav.shape
        if c != 2:
            raise ValueError(f"{self.name} codes stereo streams [B, 2, T]; got {c} channels")
        n, rem = divmod(length - self.encode_context[1], self.hop_length)
        if rem or n < 1:
            raise ValueError(f"window of {length} samples is not n * {self.hop_length} + {self.encode_context[1]}")
        parts, gains = [], []
        for a, m in self._segments(n):
            x = wav[..., a * self.hop_length: a * self.hop_length + m * self.model_hop].float()
            rms = x.mean(dim=1).pow(2).mean(dim=-1).sqrt()  # [B], of the mono mix, as EnCodec
            g = (1e-8 + rms).to(torch.float16).float().clamp_min(self.GAIN_FLOOR)
            parts.append(x / g[:, None, None])
            gains.append(g)
        emb = self._batched(self.encoder, parts)
        codes = torch.cat([self._latent_codes(e, n_q) for e in emb], dim=-1)
        return codes, torch.stack(gains, dim=1)

    def encode(self, wav: torch.Tensor, n_q: int) -> torch.Tensor:
        return self.encode_with_gains(wav, n_q)[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.name} decodes with the gains stored beside its codes: use decode_with_gains")

    @torch.inference_mode()
    def decode_with_gains(self, codes: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        seg, hop = self.segment_frames, self.hop_length
        n = codes.shape[-1] - seg  # frames of the window; the first segment is the left context
        segs = self._segments(codes.shape[-1])
        if n < 1 or gains.shape[-1] != len(segs):
            raise ValueError(f"{codes.shape[-1]} frames with {gains.shape[-1]} gains: expected the previous "
                             f"segment + the window's, one gain per {seg}-frame segment")
        gains = gains.float()
        live = [i for i in range(len(segs)) if i > 0 or bool((gains[:, 0] > 0).any())]
        outs = self._batched(lambda z: self.decoder(self._latent(z)),
                           [codes[..., a:a + m] for i, (a, m) in enumerate(segs) if i in live])
        dec = dict(zip(live, outs))
        y = torch.empty(codes.shape[0], 2, n * hop, device=codes.device)
        ov = self.SEGMENT - self.STRIDE
        for i in range(1, len(segs)):
            cur = dec[i] * gains[:, i, None, None]
            own = segs[i][1] * hop
            lo = (i - 1) * self.STRIDE
            y[..., lo:lo + own] = cur[..., :own]
            k = min(ov, own)
            if i - 1 in dec:  # crossfade with the previous segment's tail (EnCodec's linear OLA)
                prev = dec[i - 1][..., self.STRIDE:self.STRIDE + k] * gains[:, i - 1, None, None]
                wp, wc = self._fade[self.STRIDE:self.STRIDE + k], self._fade[:k]
                mix = (wp * prev + wc * cur[..., :k]) / (wp + wc)
                absent = (gains[:, i - 1] <= 0)[:, None, None]  # padding before the file: no crossfade
                y[..., lo:lo + k] = torch.where(absent, cur[..., :k], mix)
        return y


# -- random weights of the real architecture (tests, benchmarks, context measurement) ---------------
def probe_audio(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """``[C, T]`` chirp + tone + noise, the probe signal of the measurements and of codebook init."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = []
    for c in range(channels):
        f0 = 110.0 * (1.5 ** c)
        chirp = np.sin(2 * np.pi * (f0 * t + (6000 - f0) * t ** 2 / (2 * max(seconds, 1e-9))))
        env = 0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t + c)
        x = 0.25 * chirp * env + 0.15 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)
        out.append(x)
    return np.stack(out).astype(np.float32)


@torch.no_grad()
def init_codebooks(codec: _EncodecBase, seed: int = 0, seconds: float = 4.0) -> _EncodecBase:
    """Initialise the codebooks from the encoder's own latents on probe audio (each stage: 1024
    residual vectors drawn with replacement, jittered), so that codes spread over the codebooks and every
    stage lowers the residual, as in a trained model (the constructor leaves them all zero: EnCodec
    initialises them by k-means on the first training batch). Deterministic for ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(probe_audio(seconds, codec.sample_rate, codec.channels, seed))[None]
    if getattr(codec, "normalize", False):
        x = x / x.pow(2).mean().sqrt()
    resid = codec.encoder(x)[0].T.contiguous()  # [F, D]
    for layer in codec.quantizer.vq.layers:
        cb = layer._codebook
        idx = torch.randint(0, resid.shape[0], (cb.codebook_size,), generator=g)
        embed = resid[idx] + 0.05 * resid.std() * torch.randn(cb.codebook_size, resid.shape[1], generator=g)
        cb.embed.copy_(embed)
        cb.embed_avg.copy_(embed)
        cb.cluster_size.fill_(1.0)
        cb.inited.fill_(1.0)
        resid = resid - cb.decode(cb.encode(resid))
    return codec


def random_codec(cls: type[_EncodecBase], seed: int = 0) -> _EncodecBase:
    """The real architecture with seeded random weights (PyTorch's default init, as EnCodec's own
    ``pretrained=False``) and ``init_codebooks`` codebooks; the global RNG is left untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        codec = cls()
    return init_codebooks(codec, seed)


def random_state_dict(cls: type[_EncodecBase], seed: int = 0) -> dict:
    """A state dict in the official checkpoints' layout with ``random_codec`` weights."""
    return random_codec(cls, seed).state_dict()
