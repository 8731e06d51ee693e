"""Code rows as bytes: bit-packed indices, float16 side gains, and the CRC-32C every 2.0 row carries."""
from __future__ import annotations

import math
import struct

import crc32c as _crc
import numpy as np

from ..errors import ArchiveFormatError


def bits_for(codebook_size: int) -> int:
    return max(1, int(math.ceil(math.log2(codebook_size))))


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """``codes: [C, K, F]`` non-negative ints < 2**bits -> tightly bit-packed bytes."""
    flat = np.ascontiguousarray(codes, dtype=np.uint32).ravel()
    if flat.size and int(flat.max()) >= (1 << bits):
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    b = ((flat[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(b.ravel()).tobytes()


def unpack_codes(data: bytes, shape: tuple[int, int, int], bits: int) -> np.ndarray:
    """Bit-packed bytes -> ``codes: [C, K, F] int64``; raises ArchiveFormatError if they do not fit ``shape``."""
    n = shape[0] * shape[1] * shape[2]
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * bits]
    if b.size != n * bits:
        raise ArchiveFormatError(f"codes payload holds {b.size} bits, expected {n * bits}")
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return (b.reshape(n, bits).astype(np.int64) @ weights).reshape(shape)


def pack_gains(gains: np.ndarray) -> bytes:
    """``[C, n_segments]`` gains -> float16 little-endian bytes (codecs quantise them to float16 first: lossless)."""
    return np.ascontiguousarray(gains, dtype="<f2").tobytes()


def unpack_gains(data: bytes, channels: int) -> np.ndarray:
    g = np.frombuffer(data, dtype="<f2")
    if g.size % max(channels, 1):
        raise ArchiveFormatError(f"gains payload holds {g.size} values, not a multiple of {channels} channels")
    return g.astype(np.float32).reshape(channels, -1)


_HEADER = struct.Struct("<qiqihh")


def row_checksum(file_id: int, seq: int, frame_start: int, n_frames: int, channels: int, n_q: int,
                 codes: bytes, gains: bytes | None) -> int:
    """CRC-32C of one code row: its identity (file, window, frames, shape) and payload, so a row damaged,
    truncated or moved to another file or window fails the check."""
    c = _crc.crc32c(_HEADER.pack(file_id, seq, frame_start, n_frames, channels, n_q))
    c = _crc.crc32c(codes, c)
    return _crc.crc32c(gains or b"", c)
