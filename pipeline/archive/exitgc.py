"""A GC pass at interpreter exit, so Arrow objects in reference cycles are freed before torch's exit handlers.

With torch 2.13 and pyarrow 26 in one process, Arrow objects still alive in reference cycles at interpreter
shutdown make the process abort ("terminate called without an active exception", exit 134). atexit runs
handlers last-in first-out, so registering at the first read (after torch is imported) collects them first.
"""
from __future__ import annotations

import atexit
import gc

_registered = False


def exit_gc() -> None:
    global _registered
    if not _registered:
        atexit.register(gc.collect)
        _registered = True
