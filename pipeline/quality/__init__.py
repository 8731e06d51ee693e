"""Quality sampling: ``config`` (what to measure, the ``--min-quality`` floors; light, so the CLI's parser reads its
defaults without numpy) and ``measure`` (stratified seeded sampling, fidelity metrics against the originals, the
results table behind the HTML report, ``audioarc quality``).

Each name is imported from its module on first use (PEP 562): ``import pipeline.quality`` costs nothing."""
from __future__ import annotations

from ..lazy import keep, listing

__all__ = ["DURATION_BUCKETS", "GATE_METRICS", "NUMERIC", "REPORT_ONLY", "Gate", "QualityConfig", "QualityResult",
           "StreamingSampler", "compare", "evaluate", "finish", "listening_clip", "log_spectrogram", "loudness",
           "parse_gates", "rolloff_hz", "run_quality", "sample_manifest", "speech_like", "stratum", "summarize",
           "unit", "write_table"]


def __getattr__(name: str):
    """``pipeline.quality.X``: X imported from its module on first use."""
    if name in ("GATE_METRICS", "Gate", "QualityConfig", "parse_gates"):
        from .config import GATE_METRICS, Gate, QualityConfig, parse_gates  # noqa: F401 - read via locals()
    elif name in __all__:
        from .measure import (DURATION_BUCKETS, NUMERIC, REPORT_ONLY,  # noqa: F401, I001 - read via locals()
                              QualityResult, StreamingSampler, compare, evaluate, finish, listening_clip,
                              log_spectrogram, loudness, rolloff_hz, run_quality, sample_manifest, speech_like,
                              stratum, summarize, unit, write_table)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return keep(globals(), locals(), name)


def __dir__() -> list[str]:
    return listing(globals())
