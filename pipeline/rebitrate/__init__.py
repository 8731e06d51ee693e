"""Rebitrate: a lower-rate copy of an archive's files, in a new archive, from a prefix of their RVQ stages.

RVQ stage k only refines stages 1..k-1, so the first ``n_q(B)`` stages of a file's codes are its codes at a lower
rate B. No codec forward pass: code rows are read (checked), sliced, packed again and written as a complete format
2.0 archive at NEW_DEST through the archive API; a re-run skips files NEW_DEST holds with the same content hash.
Not done: lowering the rate of selected files in place (the format fixes one ``n_q`` per archive). A rung whose
encoder searches stages jointly (neural_rvq's 1.5 kbps pair search) differs from a plain prefix of a higher rate
(``jobs/bench/bench_rebitrate.py`` measures it).

Layout: ``config`` (``RebitrateConfig``; light) and ``job`` (``run_rebitrate``), each name imported from its module
on first use (PEP 562), so the CLI's parser reads the defaults without pyarrow.
"""
from __future__ import annotations

from ..lazy import keep, listing

__all__ = ["RebitrateConfig", "run_rebitrate"]


def __getattr__(name: str):
    """``pipeline.rebitrate.X``: X imported from its module on first use."""
    if name == "RebitrateConfig":
        from .config import RebitrateConfig  # noqa: F401 - read via locals()
    elif name == "run_rebitrate":
        from .job import run_rebitrate  # noqa: F401 - read via locals()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return keep(globals(), locals(), name)


def __dir__() -> list[str]:
    return listing(globals())
