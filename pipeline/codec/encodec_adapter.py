"""EnCodec (Défossez et al. 2022, ``pip install --no-deps encodec==0.1.1 einops``) as an audioarc codec.

The adapters wrap the real ``encodec.EncodecModel`` architectures and load the checkpoint file the
user points to (``--codec-weights PATH``): the official ``encodec_24khz-d7cc33bc.th`` state
dict, or ``{"model": state_dict}``. Nothing is downloaded.

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

The contexts were chosen by measurement (``python -m jobs.encodec_context``: random weights of the
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
