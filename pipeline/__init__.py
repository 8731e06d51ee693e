"""audioarc: distributed batch archive compression for audio with RVQ codecs on Ray."""

__version__ = "0.1.0"
