"""The codec weights an archive carries: ``weights/<checkpoint hash>.safetensors``, written once, checked on use.

safetensors holds tensors and a string map only (no code runs on load: an archive may come from anyone). The
file's metadata names the codec and its checkpoint hash; loading checks the file's sha256 against the archive
record, then the loaded tensors' checkpoint hash against the name, before any decode.
"""
from __future__ import annotations

import hashlib
import json
import struct

from .. import storage
from ..errors import CodecUnavailableError, IntegrityError, StorageError
from ..manifest import CodecRecord, WeightsRef
from . import layout

MAGIC = "audioarc-weights"
VERSION = "1"


def to_bytes(codec) -> bytes:
    """``codec``'s parameters and buffers as a safetensors file (deterministic bytes for equal weights)."""
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in codec.state_dict().items()}
    return save(tensors, metadata={"format": MAGIC, "version": VERSION, "codec": codec.name,
                                   "checkpoint_hash": codec.checkpoint_hash()})


def _metadata(data: bytes, where: str) -> dict:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        return dict(header.get("__metadata__") or {})
    except Exception:  # noqa: BLE001
        raise IntegrityError(f"{where}: not a safetensors weights file (damaged or replaced)") from None


def from_bytes(data: bytes, name: str, expect_hash: str, where: str, device: str = "cpu"):
    """The codec ``name`` with the weights in ``data``; raises unless they hash to ``expect_hash``."""
    from ..codec import registry
    md = _metadata(data, where)
    if md.get("format") != MAGIC:
        raise IntegrityError(f"{where}: not an audioarc weights file (format {md.get('format')!r})")
    if md.get("version") != VERSION:
        raise CodecUnavailableError(f"{where}: weights file version {md.get('version')} is newer than this "
                                    f"audioarc reads ({VERSION}); upgrade audioarc")
    if md.get("codec") != name:
        raise IntegrityError(f"{where}: holds weights of codec {md.get('codec')!r}, the archive needs {name!r}")
    try:
        tensors = _views(data)
    except Exception as e:  # noqa: BLE001
        raise IntegrityError(f"{where}: unreadable weights ({type(e).__name__}: {str(e)[:200]})") from None
    codec = registry.spec(name).factory()
    codec.load_weights({"model": tensors}, where)  # copied out of the views: no third copy of the weights
    del tensors
    if codec.checkpoint_hash() != expect_hash:
        raise IntegrityError(f"{where}: its tensors hash to {codec.checkpoint_hash()}, the archive was made with "
                             f"{expect_hash} (a damaged or replaced weights file)")
    return codec.eval().to(device)


def embed(dest: str, codec) -> WeightsRef:
    """Write ``codec``'s weights into the archive (once: an existing file is kept if it holds these weights)."""
    data = to_bytes(codec)
    rel = layout.weights_relpath(codec.checkpoint_hash())
    url = storage.join(dest, rel)
    try:
        storage.write_bytes(url, data, exclusive=True)
    except FileExistsError:
        have = storage.read_bytes(url)
        if hashlib.sha256(have).hexdigest() != hashlib.sha256(data).hexdigest():
            try:  # another writer's bytes of the same weights (another safetensors version) are as good
                from_bytes(have, codec.name, codec.checkpoint_hash(), url)
                data = have
            except Exception:  # noqa: BLE001 - damaged: replace it with the good copy
                storage.write_bytes(url, data)
    return WeightsRef(rel, hashlib.sha256(data).hexdigest(), len(data))


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _views(data: bytes) -> dict:
    """The tensors of the safetensors file ``data`` as read-only views into it (no copy: loading the weights
    holds the file's bytes and the model, not a third copy). Every entry is checked against the format: a known
    dtype, a shape whose size matches its byte range, ranges inside the data that tile it without gaps or
    overlaps (as the safetensors library requires)."""
    import warnings

    import torch
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(data[8:8 + n])
    base, end = 8 + n, len(data) - 8 - n
    out, spans = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": the views are only read
        for key, v in header.items():
            if key == "__metadata__":
                continue
            if v.get("dtype") not in _DTYPES:
                raise ValueError(f"tensor {key!r}: unknown dtype {v.get('dtype')!r}")
            dt = getattr(torch, _DTYPES[v["dtype"]])
            a, b = (int(x) for x in v["data_offsets"])
            shape = [int(d) for d in v["shape"]]
            count = 1
            for d in shape:
                count *= d
            if not 0 <= a <= b <= end or b - a != count * dt.itemsize:
                raise ValueError(f"tensor {key!r}: byte range {a}..{b} does not hold shape {shape} of {v['dtype']}")
            spans.append((a, b))
            out[key] = (torch.frombuffer(data, dtype=dt, count=count, offset=base + a) if count
                        else torch.empty(0, dtype=dt)).reshape(shape)
    pos = 0
    for a, b in sorted(spans):
        if a != pos:
            raise ValueError("tensor byte ranges overlap or leave gaps")
        pos = b
    if pos != end:
        raise ValueError("bytes after the last tensor")
    return out


def read_checked(dest: str, ref: WeightsRef) -> bytes:
    url = storage.join(dest, ref.path)
    try:
        data = storage.read_bytes(url)
    except StorageError:
        raise CodecUnavailableError(f"{url}: the archive's codec weights are missing; copy them back from a "
                                    f"replica, or run `audioarc adopt-weights {dest} WEIGHTS` with the checkpoint "
                                    f"that made the archive") from None
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise IntegrityError(f"{url}: the archive's codec weights fail their sha256 check (damaged); copy them back "
                             f"from a replica, or run `audioarc adopt-weights {dest} WEIGHTS` with the checkpoint")
    return data


def find(dest: str, codec: CodecRecord) -> WeightsRef | None:
    """The weights file for ``codec`` in ``dest`` if there is one (format 1.x archives after ``adopt-weights``)."""
    rel = layout.weights_relpath(codec.checkpoint_hash)
    url = storage.join(dest, rel)
    try:
        data = storage.read_bytes(url)
    except StorageError:
        return None
    return WeightsRef(rel, hashlib.sha256(data).hexdigest(), len(data))


def load_codec(dest: str, rec, weights: str | None = None, device: str = "cpu"):
    """The codec that decodes the archive ``rec`` at ``dest``: ``weights`` (a path the user gave) if given,
    else the archive's own weights, else a shipped checkpoint with the archive's hash. Always checked against
    the archive's codec name and checkpoint hash."""
    from ..codec import registry
    want = rec.codec
    if weights:
        if str(weights).endswith(".safetensors"):
            data = storage.read_bytes(str(weights))
            codec = from_bytes(data, want.name, _md_hash(data, str(weights)), str(weights), device)
        else:
            codec = registry.load(want.name, weights, device)
        check_codec(want, codec, dest)
        return codec
    ref = rec.weights or find(dest, want)
    if ref is not None:
        return from_bytes(read_checked(dest, ref), want.name, want.checkpoint_hash, storage.join(dest, ref.path), device)
    shipped = registry.shipped_weights_for(want)
    if shipped is not None:
        return registry.load(want.name, shipped, device)
    spec = registry.spec(want.name)
    hint = f" ({spec.weights_hint})" if spec.weights_hint else ""
    raise CodecUnavailableError(
        f"{dest}: archive was made by codec {want.name!r} with checkpoint {want.checkpoint_hash}, which the archive "
        f"does not carry and this audioarc does not ship; pass --codec-weights PATH with that checkpoint{hint}, or "
        f"store it in the archive once: `audioarc adopt-weights {dest} PATH`")


def _md_hash(data: bytes, where: str) -> str:
    return _metadata(data, where).get("checkpoint_hash", "")


def check_codec(record: CodecRecord, available, where: str) -> None:
    """Refuse to decode with a codec other than the archive's (name and checkpoint hash)."""
    from ..errors import CodecMismatchError
    if available.name != record.name or available.checkpoint_hash() != record.checkpoint_hash:
        raise CodecMismatchError(
            f"{where}: archive was made by codec {record.name!r} (checkpoint {record.checkpoint_hash}), "
            f"but the loaded codec is {available.name!r} (checkpoint {available.checkpoint_hash()}); "
            f"pass --codec {record.name} --codec-weights PATH with the checkpoint that made the archive")


def adopt(dest: str, rec, path: str) -> WeightsRef:
    """Store the checkpoint at ``path`` in the archive, after checking it is the one that made it."""
    return embed(dest, load_codec(dest, rec, path))


def load_path(name: str, path: str | None, expect_hash: str, device: str = "cpu"):
    """The codec ``name`` from ``path``: an archive's (or any) ``.safetensors`` weights URL, a checkpoint file,
    or None for the shipped weights; checked to hash to ``expect_hash``."""
    from ..codec import registry
    from ..errors import CodecMismatchError
    if path and str(path).endswith(".safetensors"):
        return from_bytes(storage.read_bytes(str(path)), name, expect_hash, str(path), device)
    codec = registry.load(name, path, device=device)
    if codec.checkpoint_hash() != expect_hash:
        raise CodecMismatchError(f"codec {name!r} from {path or 'the shipped weights'} has checkpoint "
                                 f"{codec.checkpoint_hash()}, expected {expect_hash}")
    return codec
