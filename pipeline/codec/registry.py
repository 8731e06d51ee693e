"""Codec registry: names -> loaded codecs, with the shipped weights or the user's checkpoint.

A codec is registered with a ``CodecSpec``: a factory building the architecture, and either shipped
weights (``default_weights``) or ``needs_weights=True``: the user must pass the checkpoint
(``--codec-weights PATH``), e.g. for pretrained codecs whose licence does not allow shipping them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import CodecUnavailableError

if TYPE_CHECKING:  # torch (and the codec modules) are imported when a codec is loaded, not for names/specs
    from .base import Codec

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class CodecSpec:
    name: str
    description: str
    factory: Callable[[], Codec]
    default_weights: Path | None
    needs_weights: bool = False  # no shipped weights: --codec-weights PATH is required
    weights_hint: str = ""  # where the user gets the checkpoint (shown when it is missing)
    #: other checkpoints installed with the package that archives may name by hash
    previous_weights: tuple[Path, ...] = ()


def _mdct_rvq() -> Codec:
    from .mdct import MdctRvqCodec
    return MdctRvqCodec()


def _neural_rvq() -> Codec:
    from .neural import NeuralRvqCodec
    return NeuralRvqCodec()


_REGISTRY: dict[str, CodecSpec] = {}


def register(spec: CodecSpec) -> None:
    _REGISTRY[spec.name] = spec


register(CodecSpec("mdct_rvq", "MDCT frames + residual k-means codebooks learned from real audio (fast)",
                   _mdct_rvq, WEIGHTS_DIR / "mdct_rvq.pt"))

# Only the current release ships in full: an archive carries the exact weights it was made with
# (archive/weights.py). Release 8 ships beside it as a 3.8 MiB delta (release 9 with release 8's shared decoder and
# band gains, and its spread at every rate), release 7 as a 1.8 KiB delta over release 8 (less its bin spread and
# dither cutoffs), release 6 as a 2 KiB delta over release 7 (less its band gains), so archives of format 1 made with
# release 6 restore as they did, and a codec loads releases 7 and 8 by hash without their archive; earlier releases live in
# the repository's deploy/weights/ for archives made before archives carried them
# (`audioarc adopt-weights DEST deploy/weights/neural_rvq-<hash>.pt`).
register(CodecSpec("neural_rvq", "MDCT-domain conv autoencoder + 16-stage RVQ + 16 band-gain stages, trained "
                   "(1.5-24 kbps)", _neural_rvq, WEIGHTS_DIR / "neural_rvq.pt",
                   previous_weights=(WEIGHTS_DIR / "neural_rvq-29818680.pt", WEIGHTS_DIR / "neural_rvq-6fe03fa4.pt",
                                     WEIGHTS_DIR / "neural_rvq-011c0d1d.pt")))


def _encodec_24khz() -> Codec:
    from .encodec_adapter import Encodec24kCodec
    return Encodec24kCodec()


ENCODEC_HINT = ("the official EnCodec checkpoint {file} from github.com/facebookresearch/encodec (CC-BY-NC 4.0; "
                "see pipeline/codec/weights/encodec.md)")

register(CodecSpec("encodec_24khz", "EnCodec 24 kHz (Meta, pretrained; mono, causal, 1.5-24 kbps)",
                   _encodec_24khz, None, needs_weights=True,
                   weights_hint=ENCODEC_HINT.format(file="encodec_24khz-d7cc33bc.th")))

def _encodec_48khz() -> Codec:
    from .encodec_adapter import Encodec48kCodec
    return Encodec48kCodec()


register(CodecSpec("encodec_48khz", "EnCodec 48 kHz (Meta, pretrained; joint stereo, 1 s segments + gains, "
                   "3-24 kbps per stereo stream)", _encodec_48khz, None, needs_weights=True,
                   weights_hint=ENCODEC_HINT.format(file="encodec_48khz-7e698e3e.th")))

DEFAULT_CODEC = "neural_rvq"


def names() -> list[str]:
    return sorted(_REGISTRY)


def spec(name: str) -> CodecSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecUnavailableError(
            f"unknown codec {name!r}; available codecs: {', '.join(names())} (see `audioarc codecs`)"
        ) from None


def describe() -> list[dict]:
    """One row per registered codec (``audioarc codecs``): its spec and its record of itself (``Codec.info``).
    Codecs that ship no weights are described from their architecture, without a checkpoint hash, and marked
    ``needs_weights`` (with where to get them)."""
    out = []
    for name in names():
        s = spec(name)
        row = {"name": name, "description": s.description, "needs_weights": s.needs_weights}
        try:
            info = (s.factory() if s.needs_weights else load(name)).info(weights=not s.needs_weights)
            row.update(sample_rate=info.sample_rate, channels=info.channels, frame_rate=info.frame_rate,
                       codebook_size=info.codebook_size, n_q=info.n_q, checkpoint_hash=info.checkpoint_hash,
                       bitrates_kbps=info.bitrates_kbps(), default=name == DEFAULT_CODEC)
            if s.needs_weights:
                row["weights"] = s.weights_hint
        except Exception as e:  # noqa: BLE001 - a codec that cannot be built is listed as unavailable
            row["unavailable"] = str(e)
        out.append(row)
    return out


def load(name: str, weights: str | Path | None = None, device: str = "cpu") -> Codec:
    """Instantiate codec ``name`` with ``weights`` (default: the shipped checkpoint), in eval mode.

    Raises CodecUnavailableError naming the fix when the codec cannot be built (a package is missing)
    or its weights are missing (not shipped and not given, or not found at the path given)."""
    s = spec(name)
    if s.needs_weights and not weights:
        raise CodecUnavailableError(
            f"codec {name!r} ships no weights: pass --codec-weights PATH with its checkpoint "
            f"({s.weights_hint or 'see `audioarc codecs`'})")
    path = Path(weights) if weights else s.default_weights
    if path is None:
        return s.factory().eval().to(device)
    if not path.exists():
        fix = f" ({s.weights_hint})" if s.weights_hint else " or train them (jobs/train_*.py)"
        raise CodecUnavailableError(
            f"weights for codec {name!r} not found at {path}; pass --codec-weights PATH{fix}")
    return _codec_from(name, _read_state(name, path), path).eval().to(device)


def _read_state(name: str, path: Path) -> dict:
    import torch

    from . import packing
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a checkpoint (or not a torch one)
        raise CodecUnavailableError(f"{path}: not a readable checkpoint for codec {name!r} "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise CodecUnavailableError(f"{path}: not a state dict (a {type(state).__name__}); "
                                    f"pass the checkpoint of codec {name!r}")
    return packing.unpack(state, str(path)) if packing.is_packed(state) else state


def read_weights(path: str | Path, name: str = "neural_rvq") -> dict:
    """The full weights of the file ``path`` (a packed one unpacked, a delta file rebuilt over its base), e.g.
    for a training run to start from. Raises CodecUnavailableError naming the fix."""
    state = _read_state(name, Path(path))
    return _apply_delta(name, state, Path(path)) if "delta_of" in state else state


def _codec_from(name: str, state: dict, path: Path) -> Codec:
    """Codec ``name`` with the weights ``state`` read from ``path`` (a delta file rebuilt over its base)."""
    codec = spec(name).factory()
    if "delta_of" in state:
        state = _apply_delta(name, state, path)
    codec.load_weights(state, str(path))
    if "checkpoint_hash" in state and codec.checkpoint_hash() != state["checkpoint_hash"]:
        raise CodecUnavailableError(f"{path}: its tensors hash to {codec.checkpoint_hash()}, not the "
                                    f"{state['checkpoint_hash']} it was written for (a damaged or mismatched file)")
    return codec


def write_extended(codec: Codec, src: str | Path | None, parts: dict[str, dict | None], out: Path,
                   name: str = "neural_rvq") -> str:
    """Write ``out``: the weights file ``src`` (default: the shipped one) as stored (float16 rung decoders stay
    float16), with, for each ``prefix, info`` of ``parts``, its tensors whose keys start with ``prefix`` replaced by
    ``codec``'s (e.g. fitted ``band_gains.`` tables; none when ``codec`` has none) and ``info`` as
    ``config[prefix without the dot]`` (``None``: that entry removed); packed, and checked to load back as
    ``codec``. Returns its checkpoint hash."""
    import torch

    from . import packing
    src_state = read_weights(src or spec(name).default_weights, name)
    model = dict(src_state.get("model", src_state))
    config = dict(src_state.get("config", {}))
    for prefix, info in parts.items():
        model = {k: v for k, v in model.items() if not k.startswith(prefix)}
        model.update({k: v.detach().clone() for k, v in codec.state_dict().items() if k.startswith(prefix)})
        config.pop(prefix.rstrip("."), None)
        if info is not None:
            config[prefix.rstrip(".")] = info
    state = {"model": model, "config": config}
    if "step" in src_state:
        state["step"] = src_state["step"]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    packing.pack_file(out)
    back = load(name, out)
    if back.checkpoint_hash() != codec.checkpoint_hash():
        raise AssertionError(f"{out}: does not load back as the codec it was written from")
    return back.checkpoint_hash()


# -- delta weights files --------------------------------------------------------------------------------
# An earlier release that shares most tensors with another shipped file is stored as only what differs: the
# package stays small enough to ship with a Ray job (a runtime env upload is capped at 100 MiB). A delta's
# base may itself be a delta (release N-1 over release N, release N-2 over N-1, ...): it is rebuilt first.
MAX_DELTA_CHAIN = 8


def make_delta(full: Path, base: Path, out: Path, name: str = "neural_rvq") -> Path:
    """Write ``out``: the weights ``full`` as the tensors that differ from ``base`` (matched by its checkpoint hash
    at load, so renaming ``base`` keeps it working), the keys ``base`` has and ``full`` lacks, and ``full``'s
    checkpoint hash, which loading checks."""
    import torch
    f, b = read_weights(full, name), read_weights(base, name)  # (either may be a delta file: rebuilt)
    fm, bm = f.get("model", f), b.get("model", b)
    delta = {k: v for k, v in fm.items() if k not in bm or bm[k].dtype != v.dtype or not torch.equal(bm[k], v)}
    state = {"delta_of": _codec_from(name, b, base).checkpoint_hash(), "drop": sorted(set(bm) - set(fm)),
             "model": delta, "config": f.get("config", {}), "checkpoint_hash": _codec_from(name, f, full).checkpoint_hash()}
    torch.save(state, out)
    if load(name, out).checkpoint_hash() != state["checkpoint_hash"]:
        raise AssertionError(f"{out}: the delta does not rebuild {full}")
    return out


def _apply_delta(name: str, state: dict, path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The full state dict of a delta file: its base (a file of codec ``name`` with the hash
    ``state["delta_of"]``, shipped or in the delta's folder; itself rebuilt first if a delta) minus the dropped
    keys, plus the delta's tensors. ``chain``: the delta files being rebuilt above this one (no file is its own
    base, however deep the chain)."""
    chain = (*chain, path.resolve())
    if len(chain) > MAX_DELTA_CHAIN:
        raise CodecUnavailableError(f"{path}: more than {MAX_DELTA_CHAIN} delta files deep")
    seen = set(chain)
    siblings = sorted(path.parent.glob("*.pt"))  # the shipped files, then any beside the delta
    for cand in (spec(name).default_weights, *spec(name).previous_weights, *siblings):
        if cand is None or not cand.exists() or cand.resolve() in seen:
            continue
        seen.add(cand.resolve())
        if _SHIPPED_HASHES.get(cand, state["delta_of"]) != state["delta_of"]:
            continue  # hashed before, and not the base: not read (or rebuilt) again
        try:
            base = _read_state(name, cand)  # read once: hashed from this, and rebuilt over if it matches
            if "delta_of" in base:
                base = _apply_delta(name, base, cand, chain)
            if _hash_of(name, cand, base) != state["delta_of"]:
                continue
        except Exception:  # noqa: BLE001 - a file beside the delta that is no checkpoint of this codec
            continue
        drop = set(state["drop"])
        model = {k: v for k, v in base.get("model", base).items() if k not in drop}
        model.update(state["model"])
        return {"model": model, "config": state.get("config", {}), "checkpoint_hash": state["checkpoint_hash"]}
    raise CodecUnavailableError(f"{path}: stores only its differences from the {name} weights with checkpoint hash "
                                f"{state['delta_of']}, and no shipped {name} file has that hash; reinstall audioarc "
                                f"or pass the full checkpoint with --codec-weights PATH")


def _hash_of(name: str, path: Path, state: dict | None = None) -> str:
    """Checkpoint hash of the weights file ``path`` (cached; ``state``: the file, when already read)."""
    if path not in _SHIPPED_HASHES:
        _SHIPPED_HASHES[path] = (load(name, path) if state is None else _codec_from(name, state, path)).checkpoint_hash()
    return _SHIPPED_HASHES[path]


_SHIPPED_HASHES: dict[Path, str] = {}


def shipped_weights_for(record) -> Path | None:
    """The shipped checkpoint (current or from an earlier release) whose hash is ``record.checkpoint_hash``.

    ``record`` is an archive's ``CodecRecord``; None when no shipped file matches (the caller's codec check
    then names the fix: ``--codec-weights PATH``)."""
    s = spec(record.name)
    for path in (s.default_weights, *s.previous_weights):
        if path is None or not path.exists():
            continue
        if _hash_of(record.name, path) == record.checkpoint_hash:
            return path
    return None


def load_for(record, weights: str | Path | None = None, device: str = "cpu") -> Codec:
    """The codec that decodes an archive made with ``record``: ``weights`` if given, else the matching
    shipped checkpoint, else the default one (which the caller's ``archive.check_codec`` then refuses)."""
    return load(record.name, weights or shipped_weights_for(record), device)
