"""Codecs: the contract (``base``), RVQ, the window cutter/joiner and the registry."""
from .base import Codec, CodecInfo
from .registry import DEFAULT_CODEC, load, names, spec

__all__ = ["Codec", "CodecInfo", "DEFAULT_CODEC", "load", "names", "spec"]
