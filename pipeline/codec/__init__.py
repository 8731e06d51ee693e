"""Codecs: the contract (``base``), RVQ, the window cutter/joiner and the registry."""
from .base import Codec
from .registry import DEFAULT_CODEC, load, names, spec

__all__ = ["Codec", "DEFAULT_CODEC", "load", "names", "spec"]
