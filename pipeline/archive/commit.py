"""Concurrency: job leases, generation numbers no two jobs share, and garbage collection that spares live jobs.

* A job holds a lease, ``_jobs/<job id>.json``, refreshed every ``HEARTBEAT_S`` seconds by a thread.
* Each generation number is claimed by an exclusive create of ``_gens/gNNNNNN.json`` (S3 ``If-None-Match``,
  a local hard link), naming the job: two jobs never write under the same shard folder, and a number is
  never reused, even after its job died.
* A generation is committed once its rows are in the catalog (``catalog.append``).
* Garbage: a ``shards/gN`` folder whose generation is not committed and whose job's lease is gone or dead
  (same host and its process gone, or no heartbeat for ``LEASE_TTL_S``). A job refuses to commit after its
  own heartbeat failed for half that time, so a collector can never remove what is about to be committed.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from .. import storage
from ..errors import ConcurrencyError, StorageError
from . import layout

HEARTBEAT_S = float(os.environ.get("AUDIOARC_HEARTBEAT_S", "15"))
LEASE_TTL_S = float(os.environ.get("AUDIOARC_LEASE_TTL_S", "900"))
MAX_CLAIM_TRIES = 10000


def _lease_url(dest: str, job_id: str) -> str:
    return storage.join(dest, layout.LEASES_DIR, f"{job_id}.json")


class Lease:
    """A running job's lease on ``dest``: created now, refreshed in the background until ``release``."""

    def __init__(self, dest: str, job_id: str, command: str = "encode"):
        self.dest, self.job_id, self.url = dest, job_id, _lease_url(dest, job_id)
        self.body = {"job_id": job_id, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.time()}
        self._beat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audioarc-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        body = dict(self.body, heartbeat=time.time())
        storage.write_bytes(self.url, json.dumps(body).encode())
        self.last_beat = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - checked before every commit (``check``)
                pass

    def check(self) -> None:
        """Raise ConcurrencyError when the lease may have expired in a collector's eyes (no heartbeat landed
        for half the TTL): committing now could point the catalog at shards already collected."""
        age = time.monotonic() - self.last_beat
        if age > LEASE_TTL_S / 2:
            raise ConcurrencyError(
                f"{self.dest}: this job could not refresh its lease for {age:.0f} s, so another job may have "
                f"collected its uncommitted shards; nothing was committed for the current generation. "
                f"Re-run the same command to resume")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        storage.remove(self.url)
        if storage.is_local(self.url):  # no empty folder left behind by a finished job
            try:
                os.rmdir(os.path.dirname(storage.local_path(self.url)))
            except OSError:
                pass


def claim_generation(dest: str, job_id: str, after: int) -> int:
    """The first generation number above ``after`` that no job has claimed, claimed for ``job_id``."""
    gen = after + 1
    for _ in range(MAX_CLAIM_TRIES):
        url = storage.join(dest, layout.GENS_DIR, f"{layout.gen_name(gen)}.json")
        try:
            storage.write_bytes(url, json.dumps({"job_id": job_id, "claimed": time.time()}).encode(), exclusive=True)
            return gen
        except FileExistsError:
            gen += 1
    raise ConcurrencyError(f"{dest}: could not claim a generation number after {MAX_CLAIM_TRIES} tries")


def highest_claimed(dest: str) -> int:
    gens = [layout.gen_of(u) for u in storage.list_dir(storage.join(dest, layout.GENS_DIR))]
    return max([g for g in gens if g is not None], default=0)


def _alive(dest: str, job_id: str | None) -> bool:
    if not job_id:
        return False
    try:
        lease = json.loads(storage.read_bytes(_lease_url(dest, job_id)))
    except (StorageError, ValueError):
        return False  # released (the job ended) or never written
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        # same host, process exists: alive unless the heartbeat is long stale (pid reused)
    return time.time() - float(lease.get("heartbeat", 0)) < LEASE_TTL_S


def _owner(dest: str, gen: int) -> str | None:
    try:
        return json.loads(storage.read_bytes(storage.join(dest, layout.GENS_DIR,
                                                          f"{layout.gen_name(gen)}.json"))).get("job_id")
    except (StorageError, ValueError):
        return None


def garbage(dest: str, committed: set[int], own_job: str | None = None) -> list[str]:
    """Shard folders of generations that are not committed and whose job is no longer alive (or is ``own_job``,
    which asks to clean its own). Staging leftovers of format 1.x jobs too."""
    out = list(storage.list_dir(storage.join(dest, "_staging")))
    for d in storage.list_dir(storage.join(dest, layout.SHARDS_DIR)):
        gen = layout.gen_of(d)
        if gen is None or gen in committed:
            continue
        owner = _owner(dest, gen)
        if owner is not None and owner != own_job and _alive(dest, owner):
            continue
        out.append(d)
    return out


def dead_leases(dest: str) -> list[str]:
    out = []
    for u in storage.list_dir(storage.join(dest, layout.LEASES_DIR)):
        job = u.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
        if not _alive(dest, job):
            out.append(u)
    return out


def collect(dest: str, committed, own_job: str | None = None) -> list[str]:
    """Remove ``garbage`` (and leases of dead jobs); returns what was removed. ``committed()`` gives the
    committed generations; it is asked again after the leases were checked, so a generation that its job
    committed just before it ended is never taken for garbage."""
    candidates = garbage(dest, set(committed()), own_job)
    if not candidates:
        removed = []
    else:
        now = set(committed())
        removed = [u for u in candidates if layout.gen_of(u) is None or "/_staging/" in u or layout.gen_of(u) not in now]
    for url in removed:
        storage.remove(url, recursive=True)
    for url in dead_leases(dest):
        storage.remove(url)
        removed.append(url)
    return removed
