"""Weights files at rest: a state dict's tensors as LZMA-compressed byte planes (lossless, ~15 % smaller).

Trained float32 weights compress poorly as they are (their low mantissa bytes are noise), but their high bytes
(sign, exponent, top of the mantissa) repeat a lot: splitting every tensor into byte planes (all first bytes,
then all second bytes, ...) before LZMA saves ~15 % of a ``neural_rvq`` file, enough to keep every shipped
release under Ray's 100 MiB cap on a job's uploaded package.

A packed file is an ordinary ``torch.save`` file (loadable with ``weights_only=True``)::

    {"packed": ["audioarc-packed", 1], "meta": [[key, dtype, shape], ...], "blob": uint8 tensor,
     ...every other entry of the original dict (config, step, checkpoint hash, ...) unchanged}

where ``meta`` lists the tensors of the original ``"model"`` dict in order and ``blob`` is their byte planes,
concatenated, LZMA-compressed. ``unpack`` rejects another magic or a newer version, naming the fix.

Decompression is most of a codec load (0.5-0.7 s of 20 MiB, in every job and every Ray codec actor), so the
decompressed planes are kept in a local cache, ``<folder>/<sha256 of the blob>.planes`` (the folder:
``$AUDIOARC_WEIGHTS_CACHE``, else ``$AUDIOARC_CACHE/weights``, else ``~/.cache/audioarc/weights``;
``AUDIOARC_WEIGHTS_CACHE=0`` turns it off): content-addressed by what they came from,
checked by their own sha256 on every read (a damaged or truncated entry is ignored and written again), written
atomically, and optional (a cache that cannot be written is skipped).
"""
from __future__ import annotations

import hashlib
import lzma
import math
import os
from pathlib import Path

import torch

from ..errors import CodecUnavailableError

MAGIC = "audioarc-packed"
VERSION = 1
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def is_packed(state: dict) -> bool:
    return isinstance(state, dict) and "packed" in state


def pack(state: dict) -> dict:
    """``state`` (``{"model": {key: tensor}, ...}``) -> the packed dict (see the module docstring)."""
    model = state["model"]
    meta, planes = [], []
    for key, t in model.items():
        t = t.detach().cpu().contiguous()
        if str(t.dtype) not in _DTYPES:
            raise ValueError(f"cannot pack tensor {key} of dtype {t.dtype}")
        meta.append([key, str(t.dtype), list(t.shape)])
        b = t.reshape(-1).view(torch.uint8).reshape(-1, t.element_size())  # [numel, bytes per element]
        planes.append(b.t().contiguous().numpy().tobytes())
    blob = lzma.compress(b"".join(planes), preset=6)
    out = {k: v for k, v in state.items() if k != "model"}
    out.update(packed=[MAGIC, VERSION], meta=meta, blob=torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    return out


def unpack(state: dict, where: str = "weights file") -> dict:
    """The packed dict ``state`` -> the original dict with its ``"model"`` tensors. Raises
    CodecUnavailableError for another format or a newer version, or a blob that does not match its list."""
    magic = state.get("packed")
    if not (isinstance(magic, (list, tuple)) and len(magic) == 2 and magic[0] == MAGIC):
        raise CodecUnavailableError(f"{where}: packed in an unknown format {magic!r}; pass a weights file "
                                    f"written by audioarc")
    if not isinstance(magic[1], int) or magic[1] > VERSION:
        raise CodecUnavailableError(f"{where}: packed by a newer audioarc (format version {magic[1]}, this one "
                                    f"reads up to {VERSION}); upgrade audioarc to load it")
    try:
        raw = decompress(state["blob"].numpy().tobytes())
    except lzma.LZMAError as e:
        raise CodecUnavailableError(f"{where}: its packed tensors are damaged ({e}); reinstall the file") from None
    model, off = {}, 0
    for key, dtype, shape in state["meta"]:
        dt = _DTYPES[dtype]
        size = torch.empty((), dtype=dt).element_size()
        n = math.prod(shape)
        chunk = raw[off:off + n * size]
        if len(chunk) != n * size:
            raise CodecUnavailableError(f"{where}: its packed tensors end before {key}; reinstall the file")
        b = torch.frombuffer(bytearray(chunk), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        # planes [size, n] -> elements [n, size]: stacking the planes is ~6x faster than a transposed copy
        model[key] = torch.stack(list(b.reshape(size, n)), dim=1).reshape(-1).view(dt).reshape(shape)
        off += n * size
    if off != len(raw):
        raise CodecUnavailableError(f"{where}: {len(raw) - off} packed bytes beyond its tensors; reinstall the file")
    out = {k: v for k, v in state.items() if k not in ("packed", "meta", "blob")}
    out["model"] = model
    return out


def cache_dir() -> Path | None:
    """Where decompressed planes are cached (None: caching is off)."""
    env = os.environ.get("AUDIOARC_WEIGHTS_CACHE", "").strip()
    if env.lower() in ("0", "off", "no", "false"):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("AUDIOARC_CACHE") or Path.home() / ".cache" / "audioarc") / "weights"


def decompress(blob: bytes) -> bytes:
    """``lzma.decompress(blob)``, from the cache when it holds an entry for ``blob`` that passes its checksum
    (an entry: the 32-byte sha256 of the planes, then the planes)."""
    d = cache_dir()
    if d is None:
        return lzma.decompress(blob)
    path = d / f"{hashlib.sha256(blob).hexdigest()}.planes"
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    if len(data) > 32:
        view = memoryview(data)
        if hashlib.sha256(view[32:]).digest() == data[:32]:
            return bytes(view[32:])
    raw = lzma.decompress(blob)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(hashlib.sha256(raw).digest())
            f.write(raw)
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache: loading works without it
        try:
            tmp.unlink()
        except OSError:
            pass
    return raw


def pack_file(path: Path) -> Path:
    """Pack the weights file ``path`` in place (a packed one is left as it is), checking it unpacks to the same
    tensors."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if is_packed(state):
        return path
    packed = pack(state)
    back = unpack(packed, str(path))["model"]
    if set(back) != set(state["model"]) or not all(torch.equal(back[k], v) for k, v in state["model"].items()):
        raise AssertionError(f"{path}: packing did not round-trip")
    torch.save(packed, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return path
