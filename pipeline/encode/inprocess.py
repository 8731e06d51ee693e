"""In-process execution of the encode stages (no Ray): decoder threads feed one codec in the caller's thread.

A job on one machine with no cluster to join runs here by default (``--executor auto``): no Ray start-up, no
object store, the codec loaded once, and torch using every core while decoding (libsndfile, soxr) proceeds in
threads beside it (both release the GIL). Rows are those of the Ray pipeline (``encode.decode_file`` in,
``CodecActor`` batches out), so the driver's assembler and commits are the same whichever executor ran.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, Iterator

import numpy as np

from .stages import INFO, WINDOW

_END = object()
COLUMNS = ("kind", "file_id", "seq", "frame_start", "n_frames", "channels", "payload", "gains", "info")
OBJECT_COLUMNS = ("kind", "payload", "gains", "info")


def machine_cores() -> int:
    """CPU cores this process may use (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> tuple[int, int]:
    """(torch threads, decoder threads) for an in-process job on ``cores`` cores: torch gets every core, and one
    decoder thread per 4 cores (at least one) decodes the next windows while the codec runs. Measured on 2 cores
    (jobs/bench/bench_throughput.py): the codec's forward pass is most of the work, so the decoder overlaps it
    rather than taking a core of its own."""
    cores = cores or machine_cores()
    return cores, max(1, cores // 4)


def to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows (``stages._row`` dicts) as the column batch Ray Data hands a ``map_batches`` callable."""
    out = {}
    for c in COLUMNS:
        vals = [r[c] for r in rows]
        if c in OBJECT_COLUMNS:
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            out[c] = arr
        else:
            out[c] = np.array(vals, dtype=np.int64)
    return out


def stream(items: Iterable[dict], decode: Callable[[dict], Iterator[dict]],
           encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], batch_samples: int,
           decoders: int = 1, queue_rows: int = 16, max_rows: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Encoded batches of ``items``: ``decoders`` threads run ``decode(item)`` (rows, windows then one info row
    per item) into a bounded queue (``queue_rows`` rows: memory stays flat in file length); the caller's thread
    gathers rows and calls ``encode`` on a batch once it holds ``batch_samples`` samples of windows (or
    ``max_rows`` rows, or the decoders are through). An exception in a decoder thread is raised here."""
    it = iter(items)
    lock = threading.Lock()
    stop = threading.Event()
    q: queue.Queue = queue.Queue(maxsize=queue_rows)
    errors: list[BaseException] = []

    def put(obj) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            while not stop.is_set():
                with lock:
                    item = next(it, None)
                if item is None:
                    return
                for row in decode(item):
                    if not put(row):
                        return
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            put(_END)

    threads = [threading.Thread(target=work, name=f"audioarc-decode-{i}", daemon=True) for i in range(decoders)]
    for t in threads:
        t.start()
    pending: list[dict] = []
    samples = 0
    ended = 0
    try:
        while ended < len(threads):
            row = q.get()
            if row is _END:
                ended += 1
                continue
            pending.append(row)
            if row["kind"] == WINDOW:
                samples += len(row["payload"]) // 4
            if samples >= batch_samples or len(pending) >= max_rows or (q.empty() and _only_info(pending)):
                yield encode(to_batch(pending))
                pending, samples = [], 0
        if errors:
            raise errors[0]
        if pending:
            yield encode(to_batch(pending))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def _only_info(rows: list[dict]) -> bool:
    """Nothing to encode yet: info rows only (failed or skipped files), which need not wait for a batch."""
    return all(r["kind"] == INFO for r in rows)
