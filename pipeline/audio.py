"""Audio decoding (soundfile), streaming resampling (soxr) and writing; ``[C, T] float32`` throughout."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np
import soundfile as sf
import soxr

from .errors import InputError

#: file name endings audioarc reads as audio (listing SRC, input lists, training corpora)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".w64", ".rf64",
                    ".caf", ".opus")

_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str | None


def probe(f: BinaryIO | str, name: str) -> AudioInfo:
    """Header of ``f``; raises InputError naming ``name`` if it is not decodable audio."""
    try:
        with sf.SoundFile(f) as snd:
            info = AudioInfo(snd.samplerate, snd.channels, snd.frames, snd.format, snd.subtype)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"{name}: not a readable audio file ({e}); supported: WAV, FLAC, OGG/Vorbis, "
                         f"MP3 and the other formats of libsndfile {sf.__libsndfile_version__}", code="not_audio") from None
    if info.channels < 1 or info.sample_rate < 1:
        raise InputError(f"{name}: audio header has {info.channels} channels at {info.sample_rate} Hz",
                         code="not_audio")
    return info


def read_blocks(f: BinaryIO | str, name: str, block_frames: int = 65536) -> Iterator[np.ndarray]:
    """Decode ``f`` in blocks of at most ``block_frames``: yields ``[C, n] float32``.

    Raises InputError naming ``name`` when the stream breaks off (truncated or corrupt).
    """
    try:
        with sf.SoundFile(f) as snd:
            # libsndfile shortens a WAV whose data chunk breaks off, noting it in its log
            m = _SHORT_DATA.search(snd.extra_info or "")
            if m:
                raise InputError(f"{name}: truncated audio: the data chunk announces {m.group(1)} bytes but "
                                 f"only {m.group(2)} are present; re-export or replace the file", code="truncated")
            # container formats whose header states the exact frame count
            expected = snd.frames if snd.format in ("WAV", "WAVEX", "FLAC", "AIFF", "RF64", "W64") else 0
            got = 0
            while True:
                block = snd.read(block_frames, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                got += block.shape[0]
                yield np.ascontiguousarray(block.T)
    except sf.LibsndfileError as e:
        raise InputError(f"{name}: audio stream is corrupt or truncated ({e}); re-export or replace the file",
                         code="truncated") from None
    if got < expected:
        raise InputError(f"{name}: truncated audio: header announces {expected} frames but only {got} "
                         f"could be decoded; re-export or replace the file", code="truncated")


class Resampler:
    """Streaming resampler for ``[C, n]`` blocks (soxr, high quality); identity when rates agree."""

    def __init__(self, in_rate: int, out_rate: int, channels: int):
        self.in_rate, self.out_rate, self.channels = in_rate, out_rate, channels
        self.stream = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, channels, dtype="float32", quality="HQ")

    def process(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        if self.stream is None:
            return block
        out = self.stream.resample_chunk(np.ascontiguousarray(block.T), last=last)
        return np.ascontiguousarray(out.T.reshape(self.channels, -1))

    def flush(self) -> np.ndarray:
        if self.stream is None:
            return np.zeros((self.channels, 0), np.float32)
        return self.process(np.zeros((self.channels, 0), np.float32), last=True)


def resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Whole-array resampling ``[C, T] -> [C, T']``."""
    if in_rate == out_rate:
        return x.astype(np.float32, copy=False)
    return np.ascontiguousarray(soxr.resample(x.T, in_rate, out_rate, quality="HQ").T.astype(np.float32))


def load(path: str, rate: int | None = None, mono: bool = False) -> tuple[np.ndarray, int]:
    """Read a whole file (for training/evaluation, not for the pipeline): ``[C, T]``, rate."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    x = data.T
    if mono:
        x = x.mean(axis=0, keepdims=True)
    if rate is not None and rate != sr:
        x, sr = resample(x, sr, rate), rate
    return np.ascontiguousarray(x), sr


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad ``[C, T]`` to exactly ``n`` samples."""
    if x.shape[1] >= n:
        return x[:, :n]
    return np.concatenate([x, np.zeros((x.shape[0], n - x.shape[1]), x.dtype)], axis=1)


FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}


def open_writer(f: BinaryIO | str, rate: int, channels: int, fmt: str) -> sf.SoundFile:
    major, subtype = FORMATS[fmt]
    if fmt == "flac" and rate > 655350:
        raise ValueError("FLAC cannot store this sample rate; use --format wav")
    return sf.SoundFile(f, mode="w", samplerate=rate, channels=channels, format=major, subtype=subtype)


def pick_segment(x: np.ndarray, n: int) -> np.ndarray:
    """The loudest of six evenly spaced ``n``-sample segments of ``x: [T]`` (the whole signal if shorter): the
    excerpt codec evaluation and ``tune`` score."""
    if len(x) <= n:
        return x
    starts = np.linspace(0, len(x) - n, 6).astype(int)
    rms = [np.sqrt(np.mean(x[s:s + n] ** 2)) for s in starts]
    s = starts[int(np.argmax(rms))]
    return x[s:s + n]
