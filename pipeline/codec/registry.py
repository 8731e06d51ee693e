"""Codec registry: names -> loaded codecs, with the shipped weights."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import CodecUnavailableError
from .base import Codec

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class CodecSpec:
    name: str
    description: str
    factory: Callable[[], Codec]
    default_weights: Path | None


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

register(CodecSpec("neural_rvq", "MDCT-domain conv autoencoder + 32-stage RVQ, trained (1.5-24 kbps)",
                   _neural_rvq, WEIGHTS_DIR / "neural_rvq.pt"))

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


def load(name: str, weights: str | Path | None = None, device: str = "cpu") -> Codec:
    """Instantiate codec ``name`` with ``weights`` (default: the shipped checkpoint), in eval mode."""
    s = spec(name)
    codec = s.factory()
    path = Path(weights) if weights else s.default_weights
    if path is not None:
        if not path.exists():
            raise CodecUnavailableError(
                f"weights for codec {name!r} not found at {path}; pass --codec-weights PATH "
                f"or train them (jobs/train_*.py)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        codec.load_state_dict(state["model"] if "model" in state else state)
    return codec.eval().to(device)
