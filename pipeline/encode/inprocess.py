"""In-process execution of the encode stages (no Ray): decoder threads feed codec threads sharing one codec.

A job on one machine with no cluster to join runs here by default (``--executor auto``): no Ray start-up, no
object store, the codec loaded once and shared by one codec thread per core (torch single-threaded in each, on
its own windows), while decoding (libsndfile, soxr) proceeds in threads beside them (all release the GIL).
Rows are those of the Ray pipeline (``encode.decode_file`` in, ``CodecActor`` batches out), so the driver's
assembler and commits are the same whichever executor ran.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from .stages import COLUMNS, INFO, WINDOW

_END = object()  # a decoder is through (in the buffer); a codec thread is through (in the output queue)
_DONE = object()  # the last decoder is through: a codec thread finishes what it holds
OBJECT_COLUMNS = ("kind", "payload", "gains", "info")


def machine_cores() -> int:
    """CPU cores this process may use (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> tuple[int, int, int]:
    """(codec threads, torch threads each, decoder threads) for an in-process job on ``cores`` cores: one codec
    thread per core, each running torch single-threaded on its own windows (up to 8 of them; past that each gets
    ``cores // 8`` torch threads), and one decoder thread per 4 cores (at least one) decoding the next windows
    beside them. Measured on 2 cores (``jobs/bench/bench_throughput.py``): two single-threaded codec threads
    encode ~11 % more per second than one with two torch threads (no barrier at every operator for a core the
    decoder holds), and the decoder overlaps them rather than taking a core of its own. Larger machines are not
    measured here."""
    cores = cores or machine_cores()
    encoders = min(cores, MAX_ENCODERS)
    return encoders, max(1, cores // encoders), max(1, cores // 4)


MAX_ENCODERS = 8  # windows in flight at once (each forward pass holds its activations)


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


class _Buffer:
    """A FIFO of rows between the decoder threads and the codec, bounded by the bytes of their payloads (one row
    always fits, however large): what is held in memory does not grow with file length."""

    def __init__(self, max_bytes: int):
        self.rows: collections.deque = collections.deque()
        self.bytes, self.max_bytes = 0, max_bytes
        self.cv = threading.Condition()

    def put(self, row, stop: threading.Event, force: bool = False) -> bool:
        """Append ``row`` once there is room (``force``: at once, a marker); False if ``stop`` came first."""
        n = len(row["payload"]) if isinstance(row, dict) else 0
        with self.cv:
            while not force and self.rows and self.bytes + n > self.max_bytes and not stop.is_set():
                self.cv.wait(0.1)
            if stop.is_set() and not force:
                return False
            self.rows.append((row, n))
            self.bytes += n
            self.cv.notify_all()
            return True

    def get(self, stop: threading.Event | None = None):
        """The oldest row, waiting for one (``_DONE`` once ``stop`` is set and none is left)."""
        with self.cv:
            while not self.rows:
                if stop is not None and stop.is_set():
                    return _DONE
                self.cv.wait(0.1 if stop is not None else None)
            row, n = self.rows.popleft()
            self.bytes -= n
            self.cv.notify_all()
            return row

    def empty(self) -> bool:
        return not self.rows


def stream(items: Iterable[dict], decode: Callable[[dict], Iterator[dict]],
           encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], batch_samples: int,
           decoders: int = 1, encoders: int = 1, queue_bytes: int | None = None, max_rows: int = 256,
           stats: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Encoded batches of ``items``, in the order they are done: ``decoders`` threads run ``decode(item)`` (rows,
    windows then one info row per item) into a buffer of at most ``queue_bytes`` of payload (default: a batch's
    worth per codec thread and one more; memory stays flat in file length); each of ``encoders`` threads gathers
    rows and calls ``encode`` on a batch once it holds ``batch_samples`` samples of windows (or ``max_rows``
    rows, or the decoders are through). An exception in any thread is raised here. ``stats["idle"]`` (when
    given) adds up the seconds codec threads waited for decoded rows."""
    it = iter(items)
    lock = threading.Lock()
    stop = threading.Event()
    buf = _Buffer(queue_bytes if queue_bytes is not None else (encoders + 1) * 4 * batch_samples)
    done: queue.Queue = queue.Queue()  # encoded batches, then one _END per codec thread
    errors: list[BaseException] = []
    ended = [0]  # decoders through

    def decoder():
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
            stop.set()
        finally:
            buf.put(_END, stop, force=True)

    def encoder():
        pending: list[dict] = []
        samples = 0
        waited = 0.0
        try:
            while not stop.is_set():
                t = time.perf_counter()
                row = buf.get(stop)
                waited += time.perf_counter() - t
                if row is _END:
                    with lock:
                        ended[0] += 1
                        last = ended[0] == decoders
                    if last:  # every row is taken: the other codec threads finish what they hold
                        for _ in range(encoders - 1):
                            buf.put(_DONE, stop, force=True)
                        break
                    continue
                if row is _DONE:
                    break
                pending.append(row)
                if row["kind"] == WINDOW:
                    samples += len(row["payload"]) // 4
                if samples >= batch_samples or len(pending) >= max_rows or (buf.empty() and _only_info(pending)):
                    done.put(encode(to_batch(pending)))
                    pending, samples = [], 0
            if pending and not stop.is_set():
                done.put(encode(to_batch(pending)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
            stop.set()
        finally:
            if stats is not None:
                with lock:
                    stats["idle"] = stats.get("idle", 0.0) + waited
            done.put(_END)

    threads = [threading.Thread(target=decoder, name=f"audioarc-decode-{i}", daemon=True) for i in range(decoders)]
    threads += [threading.Thread(target=encoder, name=f"audioarc-codec-{i}", daemon=True) for i in range(encoders)]
    for t in threads:
        t.start()
    try:
        finished = 0
        while finished < encoders:
            batch = done.get()
            if batch is _END:
                finished += 1
            elif not errors:
                yield batch
        if errors:
            raise errors[0]
    finally:
        stop.set()
        with buf.cv:
            buf.cv.notify_all()
        for t in threads:
            t.join(timeout=5)


def _only_info(rows: list[dict]) -> bool:
    """Nothing to encode yet: info rows only (failed or skipped files), which need not wait for a batch."""
    return all(r["kind"] == INFO for r in rows)
