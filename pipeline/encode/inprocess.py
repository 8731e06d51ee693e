"""In-process execution of the encode stages (no Ray): decoder threads feed one codec in the caller's thread.

A job on one machine with no cluster to join runs here by default (``--executor auto``): no Ray start-up, no
object store, the codec loaded once, and torch using every core while decoding (libsndfile, soxr) proceeds in
threads beside it (both release the GIL). Rows are those of the Ray pipeline (``encode.decode_file`` in,
``CodecActor`` batches out), so the driver's assembler and commits are the same whichever executor ran.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from .stages import COLUMNS, INFO, WINDOW

_END = object()
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


def _trimmer() -> Callable[[], None]:
    """A call that hands freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Windows of a
    long file are allocated in the decoder threads and freed in the codec's: without it glibc keeps their pages in
    per-thread arenas and the process grows with file length (measured: 475 -> 624 MiB USS from a 3-minute to a
    3-hour input; fixing glibc's mmap threshold instead halved the codec's speed)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


TRIM_EVERY_S = 2.0


class _Buffer:
    """A FIFO of rows between the decoder threads and the codec, bounded by the bytes of their payloads (one row
    always fits, however large): what is held in memory does not grow with file length."""

    def __init__(self, max_bytes: int):
        self.rows: collections.deque = collections.deque()
        self.bytes, self.max_bytes = 0, max_bytes
        self.cv = threading.Condition()

    def put(self, row, stop: threading.Event) -> bool:
        n = len(row["payload"]) if isinstance(row, dict) else 0
        with self.cv:
            while self.rows and self.bytes + n > self.max_bytes and not stop.is_set():
                self.cv.wait(0.1)
            if stop.is_set():
                return False
            self.rows.append((row, n))
            self.bytes += n
            self.cv.notify_all()
            return True

    def get(self):
        with self.cv:
            while not self.rows:
                self.cv.wait()
            row, n = self.rows.popleft()
            self.bytes -= n
            self.cv.notify_all()
            return row

    def empty(self) -> bool:
        return not self.rows


def stream(items: Iterable[dict], decode: Callable[[dict], Iterator[dict]],
           encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], batch_samples: int,
           decoders: int = 1, queue_bytes: int | None = None, max_rows: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Encoded batches of ``items``: ``decoders`` threads run ``decode(item)`` (rows, windows then one info row
    per item) into a buffer of at most ``queue_bytes`` of payload (default: two batches' worth; memory stays flat
    in file length); the caller's thread gathers rows and calls ``encode`` on a batch once it holds
    ``batch_samples`` samples of windows (or ``max_rows`` rows, or the decoders are through). An exception in a
    decoder thread is raised here."""
    it = iter(items)
    lock = threading.Lock()
    stop = threading.Event()
    buf = _Buffer(queue_bytes if queue_bytes is not None else 2 * 4 * batch_samples)
    errors: list[BaseException] = []

    def work():
        try:
            while not stop.is_set():
                with lock:
                    item = next(it, None)
                if item is None:
                    return
                for row in decode(item):
                    if not buf.put(row, stop):
                        return
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            buf.put(_END, stop)

    threads = [threading.Thread(target=work, name=f"audioarc-decode-{i}", daemon=True) for i in range(decoders)]
    for t in threads:
        t.start()
    pending: list[dict] = []
    samples = 0
    ended = 0
    trim, trimmed = _trimmer(), time.monotonic()
    try:
        while ended < len(threads):
            row = buf.get()
            if row is _END:
                ended += 1
                continue
            pending.append(row)
            if row["kind"] == WINDOW:
                samples += len(row["payload"]) // 4
            if samples >= batch_samples or len(pending) >= max_rows or (buf.empty() and _only_info(pending)):
                yield encode(to_batch(pending))
                pending, samples = [], 0
                if time.monotonic() - trimmed > TRIM_EVERY_S:
                    trim()
                    trimmed = time.monotonic()
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
