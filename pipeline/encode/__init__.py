"""The encode job, one module per step: ``config`` (what to do) -> ``inputs`` (what there is) -> ``stages`` (decode,
encode) run by ``executors`` (in-process or Ray) -> ``assemble`` (shards, generations) -> ``job`` (the whole run).

Data flows one way: listed inputs are planned against the catalog, decoded into windows, encoded into codes,
written into shards by the driver and committed through ``archive``, the only writer of commit state."""
from __future__ import annotations

from ..lazy import keep, listing

__all__ = ["EXECUTORS", "CodecActor", "EncodeConfig", "EncodeSummary", "Progress", "choose_executor", "decode_file",
           "file_id_for", "prepare_archive", "read_input_list", "run_encode", "summarize"]


def __getattr__(name: str):
    """``pipeline.encode.X``: X imported from its module on first use (PEP 562), so ``import pipeline.encode`` and
    its ``config`` stay light (no torch) for the CLI's parser."""
    if name in ("EXECUTORS", "EncodeConfig", "EncodeSummary"):
        from .config import EXECUTORS, EncodeConfig, EncodeSummary  # noqa: F401 - read via locals()
    elif name == "choose_executor":
        from .executors import choose_executor  # noqa: F401 - read via locals()
    elif name in ("file_id_for", "read_input_list"):
        from .inputs import file_id_for, read_input_list  # noqa: F401 - read via locals()
    elif name in ("prepare_archive", "run_encode", "summarize"):
        from .job import prepare_archive, run_encode, summarize  # noqa: F401 - read via locals()
    elif name in ("CodecActor", "Progress", "decode_file"):
        from .stages import CodecActor, Progress, decode_file  # noqa: F401 - read via locals()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return keep(globals(), locals(), name)


def __dir__() -> list[str]:
    return listing(globals())
