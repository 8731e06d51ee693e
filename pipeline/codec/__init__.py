"""Codecs: the contract (``base``), RVQ, the window cutter/joiner and the registry.

The names below are resolved on first use (PEP 562), so importing ``pipeline.codec.registry`` (e.g. for
``DEFAULT_CODEC`` in ``audioarc --help``) does not import torch."""
from __future__ import annotations

__all__ = ["Codec", "DEFAULT_CODEC", "load", "names", "spec"]


def __getattr__(name: str):
    if name == "Codec":
        from .base import Codec
        return Codec
    if name in ("DEFAULT_CODEC", "load", "names", "spec"):
        from . import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
