"""The codec contract: a pure torch.nn.Module that turns audio into RVQ code indices and back.

A codec works at its own ``sample_rate`` on ``channels`` audio channels per code stream: a mono codec
(``channels = 1``, the usual case) codes each channel of a file as its own stream; a joint-stereo codec
(``channels = 2``) codes a stereo file as one stream, a mono file duplicated to stereo (restored as
their average), and refuses files with more channels. A codec is *frame-exact*: it produces exactly
one code vector per ``hop_length`` samples, and it declares the context it needs around a span of
frames, so the pipeline can cut any length of audio into windows, encode them independently and join
the decoded windows sample-exactly (no seams, no overlap bits spent; a codec with recurrent state, like
EnCodec's LSTMs, declares the context after which windowed coding agrees with whole-signal coding to
a measured, negligible difference):

* encode: to get codes for frames ``[a, b)`` the codec needs samples
  ``[a*hop - encode_context[0], b*hop + encode_context[1])`` (zeros outside the signal).
* decode: to get samples ``[a*hop, b*hop)`` the codec needs codes of frames
  ``[a - decode_context[0], b + decode_context[1])`` (``pad_codes`` stand in before the signal,
  code 0 after it, and their contribution is outside the returned span).
* a signal of ``T`` samples has ``n_frames(T) = ceil(T / hop) + decode_context[1]`` frames,
  the last ones covering the tail.

Two optional extensions, for codecs that code fixed segments (EnCodec 48 kHz):

* ``segment_frames``: windows start at multiples of this many frames (``Windower`` checks it).
* ``side_gains``: the codec normalises each segment and returns its gain beside the codes
  (``encode_with_gains`` -> ``gains [B, n_segments] float32``, ``decode_with_gains`` takes them back).
  The archive stores them (float16) in the ``gains`` column of the window's row.
"""
from __future__ import annotations

import hashlib
import math
import torch
from torch import nn

from ..errors import ConfigError
from .identity import CodecInfo, CodecRecord, kbps


class Codec(nn.Module):
    """Base class of every codec. Subclasses set the class attributes and implement the four methods.

    Tensors: ``wav: [B, channels, T] float32`` in [-1, 1] at ``sample_rate`` (``channels`` is 1 for a
    mono codec); ``codes: [B, K, F] int64`` in ``[0, codebook_size)`` with ``K <= n_q``.
    """

    name: str = "base"
    version: str = "0"
    #: audio channels of one code stream: 1 = a mono codec (the pipeline codes each channel of a file
    #: as its own stream); 2 = a joint-stereo codec (one stream per file; see the module docstring)
    channels: int = 1
    sample_rate: int = 24000
    hop_length: int = 320
    codebook_size: int = 1024
    n_q: int = 8
    #: the n_q values this codec was trained to decode well (the bitrate ladder)
    ladder_n_q: tuple[int, ...] = (8,)
    encode_context: tuple[int, int] = (0, 0)  # samples (left, right)
    decode_context: tuple[int, int] = (0, 0)  # frames (left, right)
    #: windows must start at multiples of this many frames (codecs that code fixed segments)
    segment_frames: int = 1
    #: the codec returns one gain per segment per stream beside the codes (``encode_with_gains``)
    side_gains: bool = False
    #: True when the codec has no shipped weights: the user must pass its checkpoint (--codec-weights)
    needs_weights: bool = False

    # -- the contract -------------------------------------------------------------------------
    def encode(self, wav: torch.Tensor, n_q: int) -> torch.Tensor:
        """``wav: [B, channels, (b-a)*hop + ctx_l + ctx_r]`` -> ``codes: [B, n_q, b-a] int64``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes: [B, K, (b-a) + dctx_l + dctx_r] int64`` -> ``wav: [B, channels, (b-a)*hop] float32``."""
        raise NotImplementedError

    def encode_with_gains(self, wav: torch.Tensor, n_q: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encode``, plus ``gains [B, ceil(F / segment_frames)] float32`` for ``side_gains`` codecs
        (else None). ``wav: [B, channels, ...]``."""
        return self.encode(wav, n_q), None

    def decode_with_gains(self, codes: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
        """``decode`` with the gains ``encode_with_gains`` returned (one per segment of ``codes``, the
        left context included; gain 0 marks a padding segment before the signal)."""
        return self.decode(codes)

    def pad_codes(self, n_q: int) -> torch.Tensor:
        """``[n_q] int64``: the code that stands in for frames before the signal (the decoder's left
        context at the start of a file). Code 0 unless the codec knows better (e.g. its silence code)."""
        return torch.zeros(n_q, dtype=torch.int64)

    def prepare_weights(self, keys, where: str = "checkpoint") -> None:
        """Shape this codec for a checkpoint whose state dict has ``keys`` (e.g. add the optional modules it
        carries), so its own ``state_dict()`` then has a tensor for each key a loader can fill in place."""

    def load_weights(self, state: dict, where: str = "checkpoint") -> None:
        """Load a checkpoint: a state dict, or ``{"model": state_dict, ...}``."""
        self.load_state_dict(state["model"] if "model" in state else state)

    # -- derived ------------------------------------------------------------------------------
    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def n_frames(self, n_samples: int) -> int:
        return int(math.ceil(n_samples / self.hop_length)) + self.decode_context[1]

    def ladder(self) -> dict[float, int]:
        """Bitrate ladder: nominal kbps (per mono channel) -> number of quantizer stages."""
        return {round(self.kbps(k), 3): k for k in self.ladder_n_q}

    def kbps(self, n_q: int) -> float:
        return kbps(n_q, self.codebook_size, self.frame_rate)

    def n_q_for_kbps(self, kbps: float) -> int:
        """The ladder entry for ``kbps``; raises ValueError naming the ladder if it is not on it."""
        for rate, k in self.ladder().items():
            if abs(rate - kbps) < 1e-6 * max(1.0, kbps) or abs(rate - kbps) < 0.01:
                return k
        rates = ", ".join(f"{r:g}" for r in sorted(self.ladder()))
        raise ConfigError(f"codec {self.name!r} has no {kbps:g} kbps setting; its ladder is: {rates} kbps")

    def for_decoding(self, n_q: int) -> "Codec":
        """This codec, keeping only what decoding ``n_q`` stages needs (``_release_for_decoding``: e.g. the
        encoder, other rungs' decoders, deeper codebooks), for a restore that never encodes. Its checkpoint hash
        stays that of the full weights; decoding ``n_q`` stages gives the same samples as before."""
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q must be in [1, {self.n_q}], got {n_q}")
        full = self.checkpoint_hash()
        self._release_for_decoding(n_q)
        self._decode_only = (full, n_q)
        return self

    def _release_for_decoding(self, n_q: int) -> None:
        """Drop the modules and tensors that decoding ``n_q`` stages does not use (default: none)."""

    def checkpoint_hash(self) -> str:
        """Content hash of every parameter and buffer: two codecs with the same hash decode alike."""
        if getattr(self, "_decode_only", None):
            return self._decode_only[0]
        h = hashlib.sha256()
        for key, tensor in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().data)  # (the buffer itself: no copy)
        return h.hexdigest()[:16]

    def info(self, weights: bool = True) -> CodecInfo:
        """This codec's one record of itself (``identity.py``); ``weights=False``: the architecture alone (no
        checkpoint hash), for a codec whose weights are not loaded."""
        return CodecInfo(self.name, self.version, self.checkpoint_hash() if weights else None, self.sample_rate,
                         self.hop_length, self.codebook_size, self.n_q, self.kbps(1), tuple(self.ladder_n_q),
                         tuple(self.encode_context), tuple(self.decode_context), self.channels, self.segment_frames,
                         self.side_gains)

    def record(self, n_q: int) -> CodecRecord:
        """What an archive made with ``n_q`` stages of this codec records about it (``archive.json``)."""
        return self.info().record(n_q)
