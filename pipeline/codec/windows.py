"""Cutting a stream of samples into codec windows with context, and joining decoded windows back.

Because every codec declares its encode/decode context (see ``base.py``), windows are encoded
independently and joined sample-exactly: no overlap bits are stored and no seam is audible. Memory
is bounded by the window length, whatever the length of the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .identity import CodecInfo

if TYPE_CHECKING:  # torch is imported where a model runs: cutting windows (a decode worker) never loads it
    from .base import Codec

#: the most audio one decoder pass of ``Joiner`` makes (its working memory: ~1 MiB a second for neural_rvq)
DECODE_BLOCK_SECONDS = 10.0


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

    ``codec`` may be a ``Codec`` or its record (``CodecInfo``, ``codec.info()``): the decode stage cuts
    windows without loading the model.
    """

    def __init__(self, codec: "Codec | CodecInfo", window_frames: int, channels: int):
        if window_frames < 1:
            raise ValueError("window_frames must be >= 1")
        seg = getattr(codec, "segment_frames", 1)
        if window_frames % seg:
            raise ValueError(f"window_frames ({window_frames}) must be a multiple of the codec's segment "
                             f"({seg} frames)")
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

    ``feed(codes: [S, K, frames], gains: [S, segments] | None)`` with consecutive windows (``S`` code
    streams; gains only for ``side_gains`` codecs); ``finish()`` flushes the last one. ``channels``: the
    file's channel count, when a joint-stereo codec's output must be mixed down (a mono file coded as
    stereo); default: whatever the codec gives, ``S * codec.channels``. ``block_seconds``: the most audio one
    decoder pass makes (a long window is decoded in such blocks, each with its context: the same samples, and
    memory bounded whatever window length the archive was written with); None: each window in one pass.
    """

    def __init__(self, codec: Codec, n_samples: int, device: str = "cpu", channels: int | None = None,
                 block_seconds: float | None = DECODE_BLOCK_SECONDS):
        self.codec = codec
        self.hop = codec.hop_length
        self.dctx_l, self.dctx_r = codec.decode_context
        self.seg = codec.segment_frames
        self.n_samples = n_samples
        self.device = device
        self.channels = channels
        self.pending: np.ndarray | None = None  # codes not yet decoded [S, K, f]
        self.pending_g: np.ndarray | None = None  # their gains, one per frame [S, f] (side_gains codecs)
        self.history: np.ndarray | None = None  # last dctx_l frames already decoded
        self.history_g: np.ndarray | None = None
        self.emitted = 0
        self.fed = 0
        # frames per pass; codecs with per-segment gains decode whole windows (their blocks must start on segments)
        self.block = (max(1, math.ceil(block_seconds * codec.sample_rate / self.hop))
                      if block_seconds and self.seg == 1 else None)

    def _decode(self, codes: np.ndarray, gains: np.ndarray | None, n_out_frames: int) -> np.ndarray:
        import torch
        with torch.inference_mode():
            c = torch.from_numpy(codes.astype(np.int64)).to(self.device)
            if self.codec.side_gains:
                g = torch.from_numpy(np.ascontiguousarray(gains[:, ::self.seg], np.float32)).to(self.device)
                wav = self.codec.decode_with_gains(c, g)
            else:
                wav = self.codec.decode(c)
        out = wav[..., : n_out_frames * self.hop].float().cpu().numpy()
        out = out.reshape(-1, out.shape[-1])  # [S * codec.channels, n]
        if self.channels is not None and out.shape[0] != self.channels:
            if self.channels != 1:
                raise ValueError(f"codec gives {out.shape[0]} channels, the file has {self.channels}")
            out = out.mean(axis=0, keepdims=True)  # a mono file coded by a stereo codec
        remaining = self.n_samples - self.emitted
        out = out[:, :remaining]
        self.emitted += out.shape[1]
        return out

    def _left(self, c: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.dctx_l == 0:
            return np.zeros((c, k, 0), np.int64), np.zeros((c, 0), np.float32)
        if self.history is None:  # before the first frame: the codec's padding code, gain 0 (absent)
            pad = self.codec.pad_codes(k).cpu().numpy().astype(np.int64)
            return (np.broadcast_to(pad[None, :, None], (c, k, self.dctx_l)).copy(),
                    np.zeros((c, self.dctx_l), np.float32))
        return self.history, self.history_g

    def _frame_gains(self, codes: np.ndarray, gains: np.ndarray | None) -> np.ndarray:
        s, _, f = codes.shape
        if not self.codec.side_gains:
            return np.ones((s, f), np.float32)
        if gains is None:
            raise ValueError(f"codec {self.codec.name!r} needs the gains stored beside its codes")
        g = np.repeat(np.asarray(gains, np.float32).reshape(s, -1), self.seg, axis=1)[:, :f]
        if g.shape[1] != f:
            raise ValueError(f"{gains.shape[-1]} gains for {f} frames of {self.seg}-frame segments")
        return g

    def feed(self, codes: np.ndarray, gains: np.ndarray | None = None) -> Iterator[np.ndarray]:
        codes = np.asarray(codes)
        if self.fed % self.seg:
            raise ValueError(f"windows before this one hold {self.fed} frames, not a multiple of the codec's "
                             f"segment ({self.seg} frames)")
        self.fed += codes.shape[2]
        g = self._frame_gains(codes, gains)
        if self.pending is None:
            self.pending, self.pending_g = codes, g
        else:
            self.pending = np.concatenate([self.pending, codes], axis=2)
            self.pending_g = np.concatenate([self.pending_g, g], axis=1)
        while True:
            c, k, f = self.pending.shape
            n_out = f - self.dctx_r  # frames whose right context is available
            if n_out <= 0:
                return
            if self.block is not None:
                n_out = min(n_out, self.block)
            left, left_g = self._left(c, k)
            block = np.concatenate([left, self.pending[:, :, :n_out + self.dctx_r]], axis=2)
            block_g = np.concatenate([left_g, self.pending_g[:, :n_out + self.dctx_r]], axis=1)
            yield self._decode(block, block_g, n_out)
            if self.dctx_l:
                self.history = block[:, :, n_out: self.dctx_l + n_out]
                self.history_g = block_g[:, n_out: self.dctx_l + n_out]
            self.pending = self.pending[:, :, n_out:]
            self.pending_g = self.pending_g[:, n_out:]

    def finish(self) -> Iterator[np.ndarray]:
        if self.pending is not None and self.pending.shape[2] > 0 and self.emitted < self.n_samples:
            c, k, f = self.pending.shape
            left, left_g = self._left(c, k)
            block = np.concatenate([left, self.pending, np.zeros((c, k, self.dctx_r), np.int64)], axis=2)
            block_g = np.concatenate([left_g, self.pending_g, np.ones((c, self.dctx_r), np.float32)], axis=1)
            yield self._decode(block, block_g, f)
        if self.emitted != self.n_samples:
            raise ValueError(f"codes decode to {self.emitted} samples, expected {self.n_samples}")


def encode_array(codec: Codec, x: np.ndarray, n_q: int, window_frames: int = 1500, with_gains: bool = False,
                 device: str = "cpu"):
    """Whole-signal helper: ``x: [C, T]`` at the codec rate -> ``codes: [S, n_q, n_frames(T)] int64``
    (``S = C / codec.channels`` streams); with ``with_gains``: ``(codes, gains [S, segments] or None)``.
    ``device``: where ``codec`` lives (windows go there, codes come back to the host)."""
    import torch
    cc = codec.channels
    if x.shape[0] % cc:
        raise ValueError(f"codec {codec.name!r} codes {cc}-channel streams; got {x.shape[0]} channels")
    win = Windower(codec, window_frames, x.shape[0])
    parts, gparts = [], []
    for w in list(win.push(x)) + list(win.finish()):
        with torch.inference_mode():
            wav = torch.from_numpy(w.samples).reshape(-1, cc, w.samples.shape[1]).to(device)
            codes, gains = codec.encode_with_gains(wav, n_q)
        parts.append(codes.cpu().numpy())
        if gains is not None:
            gparts.append(gains.float().cpu().numpy())
    codes = np.concatenate(parts, axis=2)
    if with_gains:
        return codes, (np.concatenate(gparts, axis=1) if gparts else None)
    if gparts:
        raise ValueError(f"codec {codec.name!r} returns gains beside its codes: call with with_gains=True")
    return codes


def decode_array(codec: Codec, codes: np.ndarray, n_samples: int, window_frames: int = 1500,
                 gains: np.ndarray | None = None, channels: int | None = None, device: str = "cpu") -> np.ndarray:
    """Whole-signal helper: ``codes: [S, K, F]`` (and ``gains`` of a ``side_gains`` codec) ->
    ``[S * codec.channels, n_samples] float32`` (``channels``: mix down to the file's channel count)."""
    seg = codec.segment_frames
    if window_frames % seg:
        raise ValueError(f"window_frames ({window_frames}) must be a multiple of {seg}")
    j = Joiner(codec, n_samples, device=device, channels=channels)
    out = []
    for a in range(0, codes.shape[2], window_frames):
        g = None if gains is None else gains[:, a // seg: (a + window_frames) // seg]
        out.extend(j.feed(codes[:, :, a:a + window_frames], g))
    out.extend(j.finish())
    n_ch = channels or codes.shape[0] * codec.channels
    return np.concatenate(out, axis=1) if out else np.zeros((n_ch, 0), np.float32)
