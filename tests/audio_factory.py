"""Synthetic test audio: sines, chirps, noise, silence, and broken files, written with soundfile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0, amp: float = 0.3,
         kind: str = "sine", seed: int = 0) -> np.ndarray:
    """``[T, C]`` float32 test signal: sine (each channel a different pitch), chirp, noise or silence."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    chans = []
    for c in range(channels):
        f = freq * (1.5 ** c)
        if kind == "sine":
            x = np.sin(2 * np.pi * f * t)
        elif kind == "chirp":
            f1 = min(rate / 2 * 0.9, 8000.0)
            x = np.sin(2 * np.pi * (f * t + (f1 - f) * t ** 2 / (2 * max(seconds, 1e-9))))
        elif kind == "noise":
            x = rng.standard_normal(n) * 0.5
        elif kind == "silence":
            x = np.zeros(n)
        else:
            raise ValueError(kind)
        chans.append(amp * x)
    return np.stack(chans, axis=1).astype(np.float32)


def write(path: Path, seconds: float, rate: int, channels: int = 1, kind: str = "sine", fmt: str | None = None,
          subtype: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, rate, channels, kind=kind, **kw), rate, format=fmt, subtype=subtype)
    return path


def truncated(path: Path, seconds: float = 2.0, rate: int = 16000) -> Path:
    """A WAV whose data chunk breaks off halfway (header announces more frames than are there)."""
    write(path, seconds, rate)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def not_audio(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is a text file with an audio extension\n" * 10)
    return path


def empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def zero_length(path: Path, rate: int = 16000) -> Path:
    """A valid WAV header with no samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros((0, 1), np.float32), rate)
    return path
