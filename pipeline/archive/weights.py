"""The codec weights an archive carries: ``weights/<checkpoint hash>.safetensors``, written once, checked on use.

safetensors holds tensors and a string map only (no code runs on load: an archive may come from anyone). The
file's metadata names the codec and its checkpoint hash; loading checks the file's sha256 against the archive
record, then the loaded tensors' checkpoint hash against the name, before any decode.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
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
    codec = _load(_Hashing(io.BytesIO(data), len(data)), name, where)
    return _checked(codec, expect_hash, where).to(device)


def _checked(codec, expect_hash: str, where: str):
    if codec.checkpoint_hash() != expect_hash:
        raise IntegrityError(f"{where}: its tensors hash to {codec.checkpoint_hash()}, the archive was made with "
                             f"{expect_hash} (a damaged or replaced weights file)")
    return codec.eval()


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
MAX_HEADER = 64 << 20  # bytes of JSON header a weights file may have (the shipped codec's: ~20 KiB)


class _Hashing:
    """Reads ``raw`` (``size`` bytes long) exactly, hashing every byte read (the file's sha256 once drained)."""

    def __init__(self, raw, size: int):
        self.raw, self.size, self.sha = raw, size, hashlib.sha256()

    def into(self, buf: memoryview) -> None:
        """Fill ``buf`` (a writable byte view) from the stream; ValueError if the file ends first."""
        got = 0
        while got < len(buf):
            n = self.raw.readinto(buf[got:])
            if not n:
                raise ValueError("the file ends inside a tensor (a byte range past its end)")
            got += n
        self.sha.update(buf)

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        self.into(memoryview(buf))
        return bytes(buf)

    def drain(self) -> int:
        """Hash the rest of the stream; returns how many bytes were left."""
        left = 0
        while chunk := self.raw.read(1 << 20):
            self.sha.update(chunk)
            left += len(chunk)
        return left


def _entries(header: dict, end: int) -> list[tuple[str, str, list[int], int, int]]:
    """The header's tensors as (key, dtype, shape, start, end) by start, checked against the format: a known
    dtype, a shape whose size matches its byte range, ranges inside the ``end`` bytes of data that tile it from 0
    without gaps or overlaps (as the safetensors library requires): nothing is allocated for a range the file
    does not hold."""
    import torch
    out = []
    for key, v in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(v, dict) or v.get("dtype") not in _DTYPES:
            raise ValueError(f"tensor {key!r}: unknown dtype {v.get('dtype') if isinstance(v, dict) else v!r}")
        a, b = (int(x) for x in v["data_offsets"])
        shape = [int(d) for d in v["shape"]]
        count = 1
        for d in shape:
            if d < 0:
                raise ValueError(f"tensor {key!r}: negative dimension in {shape}")
            count *= d
        if not 0 <= a <= b <= end or b - a != count * getattr(torch, _DTYPES[v["dtype"]]).itemsize:
            raise ValueError(f"tensor {key!r}: byte range {a}..{b} does not hold shape {shape} of {v['dtype']}")
        out.append((key, v["dtype"], shape, a, b))
    out.sort(key=lambda e: (e[3], e[4]))
    pos = 0
    for _, _, _, a, b in out:
        if a != pos:
            raise ValueError("tensor byte ranges overlap or leave gaps")
        pos = b
    return out


def _load(src: _Hashing, name: str, where: str):
    """Codec ``name`` with the weights the safetensors stream ``src`` holds (drained: ``src.sha`` is then the
    file's sha256).

    The tensors are read straight into the codec's own parameters and buffers where dtype and shape agree (no
    second copy of the weights in memory at any moment); anything else is read into a tensor of its own and left
    to the codec's ``load_weights`` (which refuses what it does not know). The header is checked before any
    tensor is read; every malformed file is an IntegrityError naming ``where``."""
    import torch

    from ..codec import registry
    try:
        (n,) = struct.unpack("<Q", src.read(8))
        if n > MAX_HEADER or n > src.size - 8:
            raise ValueError(f"a header of {n} bytes (more than {min(MAX_HEADER, src.size - 8)})")
        header = json.loads(src.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except Exception:  # noqa: BLE001
        raise IntegrityError(f"{where}: not a safetensors weights file (damaged or replaced)") from None
    md = dict(header.get("__metadata__") or {})
    if md.get("format") != MAGIC:
        raise IntegrityError(f"{where}: not an audioarc weights file (format {md.get('format')!r})")
    if md.get("version") != VERSION:
        raise CodecUnavailableError(f"{where}: weights file version {md.get('version')} is newer than this "
                                    f"audioarc reads ({VERSION}); upgrade audioarc")
    if md.get("codec") != name:
        raise IntegrityError(f"{where}: holds weights of codec {md.get('codec')!r}, the archive needs {name!r}")
    try:
        entries = _entries(header, src.size - 8 - n)
        codec = registry.spec(name).factory()
        codec.prepare_weights([e[0] for e in entries], where)
        targets = codec.state_dict()  # (detached tensors sharing the model's storage)
        state = {}
        for key, dtype, shape, a, b in entries:
            dt = getattr(torch, _DTYPES[dtype])
            t = targets.get(key)
            if t is None or t.dtype != dt or list(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
                t = torch.empty(shape, dtype=dt)
            if b > a:
                src.into(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            state[key] = t
        if src.drain():
            raise ValueError("bytes after the last tensor")
        codec.load_weights({"model": state}, where)  # (the tensors read in place are copied onto themselves)
    except CodecUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001
        raise IntegrityError(f"{where}: unreadable weights ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
    return codec


def _size(raw) -> int:
    return raw.getbuffer().nbytes if isinstance(raw, io.BytesIO) else os.fstat(raw.fileno()).st_size


def _stream(url: str):
    """A reader of ``url``: a local file is read as it is loaded; an object is fetched whole first (retried)."""
    if storage.is_local(url):
        return open(storage.local_path(url), "rb")
    return io.BytesIO(storage.read_bytes(url))


def _fix(dest: str) -> str:
    return f"copy them back from a replica, or run `audioarc adopt-weights {dest} WEIGHTS` with the checkpoint"


def read_checked(dest: str, ref: WeightsRef) -> bytes:
    """The bytes of the archive's weights file ``ref``, checked against the record's sha256 (``verify``)."""
    url = storage.join(dest, ref.path)
    try:
        data = storage.read_bytes(url)
    except StorageError:
        raise CodecUnavailableError(f"{url}: the archive's codec weights are missing; {_fix(dest)} that made the "
                                    f"archive") from None
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise IntegrityError(f"{url}: the archive's codec weights fail their sha256 check (damaged); {_fix(dest)}")
    return data


def load_checked(dest: str, ref: WeightsRef, name: str, expect_hash: str, device: str = "cpu"):
    """The archive's codec from its weights file ``ref``: the file's sha256 checked against the archive record
    (a damaged file is named as such, whatever else is wrong with it), then its tensors' checkpoint hash against
    ``expect_hash``. A local file is read once, straight into the model (never whole in memory)."""
    url = storage.join(dest, ref.path)
    try:
        raw = _stream(url)
    except (StorageError, OSError):
        raise CodecUnavailableError(f"{url}: the archive's codec weights are missing; {_fix(dest)} that made "
                                    f"the archive") from None
    with raw:
        src = _Hashing(raw, _size(raw))
        damaged = IntegrityError(f"{url}: the archive's codec weights fail their sha256 check (damaged); {_fix(dest)}")
        try:
            codec = _load(src, name, url)
        except (IntegrityError, CodecUnavailableError):
            src.drain()
            if src.sha.hexdigest() != ref.sha256:
                raise damaged from None
            raise
    if src.sha.hexdigest() != ref.sha256:
        raise damaged
    return _checked(codec, expect_hash, url).to(device)


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
        return load_checked(dest, ref, want.name, want.checkpoint_hash, device)
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
