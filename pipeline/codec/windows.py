"""Cutting a stream of samples into codec windows with context, and joining decoded windows back.

Because every codec declares its encode/decode context (see ``base.py``), windows are encoded
independently and joined sample-exactly: no overlap bits are stored and no seam is audible. Memory
is bounded by the window length, whatever the length of the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .base import Codec


@dataclass(frozen=True)
class CodecGeometry:
    """What cutting windows needs to know of a codec."""

    sample_rate: int
    hop_length: int
    encode_context: tuple[int, int]
    decode_context: tuple[int, int]

    @staticmethod
    def of(codec: Codec) -> "CodecGeometry":
        return CodecGeometry(codec.sample_rate, codec.hop_length, tuple(codec.encode_context),
                             tuple(codec.decode_context))


@dataclass(frozen=True)
class Window:
    """Frames ``[start, stop)`` of a signal and the samples the codec needs for them.

    ``samples: [C, (stop-start)*hop + ctx_l + ctx_r] float32``.
    """

    seq: int
    start: int
    stop: int
    samples: np.ndarray


class Windower:
    """Feed ``[C, n]`` blocks at the codec's rate with ``push``; collect ``Window``s; call ``finish``.

    ``codec`` may be a ``Codec`` or any object with its geometry (``CodecGeometry``): the decode
    stage cuts windows without loading the model.
    """

    def __init__(self, codec: "Codec | CodecGeometry", window_frames: int, channels: int):
        if window_frames < 1:
            raise ValueError("window_frames must be >= 1")
        self.hop = codec.hop_length
        self.ctx_l, self.ctx_r = codec.encode_context
        self.dctx_r = codec.decode_context[1]
        self.w = window_frames
        self.channels = channels
        # buffer holds samples starting at absolute position self.buf_start (may be negative: zeros)
        self.buf = np.zeros((channels, self.ctx_l), dtype=np.float32)
        self.buf_start = -self.ctx_l
        self.total = 0
        self.next_frame = 0
        self.seq = 0

    def _emit(self, start: int, stop: int) -> Window:
        lo = start * self.hop - self.ctx_l
        hi = stop * self.hop + self.ctx_r
        a, b = lo - self.buf_start, hi - self.buf_start
        seg = self.buf[:, a:min(b, self.buf.shape[1])]
        if seg.shape[1] < b - a:  # past the end of the signal: zeros
            seg = np.concatenate([seg, np.zeros((self.channels, b - a - seg.shape[1]), np.float32)], 1)
        win = Window(self.seq, start, stop, np.ascontiguousarray(seg))
        self.seq += 1
        self.next_frame = stop
        # drop what no later window needs
        keep_from = stop * self.hop - self.ctx_l - self.buf_start
        if keep_from > 0:
            self.buf = self.buf[:, keep_from:]
            self.buf_start += keep_from
        return win

    def push(self, block: np.ndarray) -> Iterator[Window]:
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[0] != self.channels:
            raise ValueError(f"expected [{self.channels}, n] samples, got {block.shape}")
        self.buf = np.concatenate([self.buf, block], axis=1)
        self.total += block.shape[1]
        end = self.buf_start + self.buf.shape[1]
        while (self.next_frame + self.w) * self.hop + self.ctx_r <= end:
            yield self._emit(self.next_frame, self.next_frame + self.w)

    def finish(self) -> Iterator[Window]:
        n_frames = -(-self.total // self.hop) + self.dctx_r
        while self.next_frame < n_frames:
            yield self._emit(self.next_frame, min(self.next_frame + self.w, n_frames))


class Joiner:
    """Decode windows of codes in order and yield ``[C, n]`` sample blocks, exactly ``n_samples`` long.

    ``feed(codes: [C, K, frames])`` with consecutive windows; ``finish()`` flushes the last one.
    """

    def __init__(self, codec: Codec, n_samples: int, device: str = "cpu"):
        self.codec = codec
        self.hop = codec.hop_length
        self.dctx_l, self.dctx_r = codec.decode_context
        self.n_samples = n_samples
        self.device = device
        self.pending: np.ndarray | None = None  # codes not yet decoded [C, K, f]
        self.history: np.ndarray | None = None  # last dctx_l frames already decoded
        self.emitted = 0

    def _decode(self, codes: np.ndarray, n_out_frames: int) -> np.ndarray:
        c, k, _ = codes.shape
        with torch.inference_mode():
            wav = self.codec.decode(torch.from_numpy(codes.astype(np.int64)).to(self.device))
        out = wav[:, 0, : n_out_frames * self.hop].float().cpu().numpy()
        remaining = self.n_samples - self.emitted
        out = out[:, :remaining]
        self.emitted += out.shape[1]
        return out

    def _left(self, c: int, k: int) -> np.ndarray:
        if self.dctx_l == 0:
            return np.zeros((c, k, 0), np.int64)
        if self.history is None:
            return np.zeros((c, k, self.dctx_l), np.int64)
        return self.history

    def feed(self, codes: np.ndarray) -> Iterator[np.ndarray]:
        codes = np.asarray(codes)
        self.pending = codes if self.pending is None else np.concatenate([self.pending, codes], axis=2)
        c, k, f = self.pending.shape
        n_out = f - self.dctx_r  # frames whose right context is available
        if n_out <= 0:
            return
        block = np.concatenate([self._left(c, k), self.pending], axis=2)
        yield self._decode(block, n_out)
        if self.dctx_l:
            self.history = block[:, :, self.dctx_l + n_out - self.dctx_l: self.dctx_l + n_out]
        self.pending = self.pending[:, :, n_out:]

    def finish(self) -> Iterator[np.ndarray]:
        if self.pending is not None and self.pending.shape[2] > 0 and self.emitted < self.n_samples:
            c, k, f = self.pending.shape
            pad = np.zeros((c, k, self.dctx_r), np.int64)
            block = np.concatenate([self._left(c, k), self.pending, pad], axis=2)
            yield self._decode(block, f)
        if self.emitted != self.n_samples:
            raise ValueError(f"codes decode to {self.emitted} samples, expected {self.n_samples}")


def encode_array(codec: Codec, x: np.ndarray, n_q: int, window_frames: int = 1500) -> np.ndarray:
    """Whole-signal helper: ``x: [C, T]`` at the codec rate -> ``codes: [C, n_q, n_frames(T)] int64``."""
    win = Windower(codec, window_frames, x.shape[0])
    parts = []
    for w in list(win.push(x)) + list(win.finish()):
        with torch.inference_mode():
            parts.append(codec.encode(torch.from_numpy(w.samples)[:, None, :], n_q).numpy())
    return np.concatenate(parts, axis=2)


def decode_array(codec: Codec, codes: np.ndarray, n_samples: int, window_frames: int = 1500) -> np.ndarray:
    """Whole-signal helper: ``codes: [C, K, F]`` -> ``[C, n_samples] float32``."""
    j = Joiner(codec, n_samples)
    out = []
    for a in range(0, codes.shape[2], window_frames):
        out.extend(j.feed(codes[:, :, a:a + window_frames]))
    out.extend(j.finish())
    return np.concatenate(out, axis=1) if out else np.zeros((codes.shape[0], 0), np.float32)
