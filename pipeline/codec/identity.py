"""The one record of a codec build (``CodecInfo``) and its projection an archive stores (``CodecRecord``); torch-free.

A loaded ``Codec`` describes itself with ``codec.info()``: its name, its ``version`` (the architecture and decoding
rules: a new version decodes the same codes differently), the hash of its weights, and every fact the pipeline needs
without the model: rates, geometry (contexts, segments, channels per code stream) and its bitrate ladder. The decode
stage cuts windows from it, ``audioarc codecs`` prints it, and ``record(n_q)`` is what an archive made with ``n_q``
stages writes into ``archive.json``. The registry (``registry.load_for``) resolves a record back to a codec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CodecRecord:
    """What an archive records about the codec that made it (``archive.json``, key ``codec``)."""

    name: str
    version: str
    checkpoint_hash: str
    sample_rate: int
    hop_length: int
    codebook_size: int
    n_q: int  # stages stored in this archive
    kbps_per_channel: float

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


def kbps(n_q: int, codebook_size: int, frame_rate: float) -> float:
    """Nominal bitrate of ``n_q`` stages of ``codebook_size``-entry codebooks at ``frame_rate`` frames/s."""
    return n_q * math.log2(codebook_size) * frame_rate / 1000.0


@dataclass(frozen=True)
class CodecInfo:
    """Everything static about one codec build (see the module docstring); ``checkpoint_hash`` is None for an
    architecture described without its weights (a codec that ships none)."""

    name: str
    version: str
    checkpoint_hash: str | None
    sample_rate: int
    hop_length: int
    codebook_size: int
    n_q: int  # stages the codec has
    kbps_per_stage: float  # nominal kbps of one stage per code stream (the codec's rule: bitrates are linear in n_q)
    ladder_n_q: tuple[int, ...]  # the stage counts it was trained to decode well
    encode_context: tuple[int, int]  # samples (left, right)
    decode_context: tuple[int, int]  # frames (left, right)
    channels: int = 1  # audio channels per code stream (2: joint stereo)
    segment_frames: int = 1  # windows start at multiples of this many frames
    side_gains: bool = False  # one gain per segment is stored beside the codes

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def kbps(self, n_q: int) -> float:
        return n_q * self.kbps_per_stage

    def bitrates_kbps(self) -> list[float]:
        """The ladder as nominal kbps per code stream, ascending."""
        return sorted(round(self.kbps(k), 3) for k in self.ladder_n_q)

    def record(self, n_q: int) -> CodecRecord:
        """What an archive made with ``n_q`` stages of this codec records about it."""
        if self.checkpoint_hash is None:
            raise ValueError(f"codec {self.name!r} has no weights loaded: an archive cannot name it")
        return CodecRecord(self.name, self.version, self.checkpoint_hash, self.sample_rate, self.hop_length,
                           self.codebook_size, n_q, round(self.kbps(n_q), 4))


