"""The encode job, one module per step: ``config`` (what to do) -> ``inputs`` (what there is) -> ``stages`` (decode,
encode) run by ``executors`` (in-process or Ray) -> ``assemble`` (shards, generations) -> ``job`` (the whole run).

Data flows one way: listed inputs are planned against the catalog, decoded into windows, encoded into codes,
written into shards by the driver and committed through ``archive``, the only writer of commit state."""
from __future__ import annotations

from .config import EXECUTORS, EncodeConfig, EncodeSummary
from .executors import choose_executor
from .inputs import file_id_for, read_input_list
from .job import prepare_archive, run_encode, summarize
from .stages import CodecActor, Progress, decode_file

__all__ = ["EXECUTORS", "CodecActor", "EncodeConfig", "EncodeSummary", "Progress", "choose_executor", "decode_file",
           "file_id_for", "prepare_archive", "read_input_list", "run_encode", "summarize"]
