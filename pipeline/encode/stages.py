"""The stages' rows and functions: ``decode_file`` (input -> windows, then one info row), ``CodecActor`` (windows -> codes), ``Progress``."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Iterator

import numpy as np

from .. import archive, audio, placement, storage, telemetry
from ..codec.identity import CodecInfo
from ..codec.windows import Windower
from ..errors import InputError, StorageError
from ..manifest import ARCHIVED, FAILED


# -- rows flowing through the pipeline ------------------------------------------------------------
# Every row has the same columns (Ray Data's blocks need one schema). kind WINDOW: payload = float32 samples
# [channels, n] of one window, then (after CodecActor) packed codes [streams, n_q, n_frames], channels becoming
# the number of code streams, gains the packed side gains of codecs that have them. kind INFO: one per input,
# after its windows; info = a FileInfo as JSON.
WINDOW, INFO = "win", "info"
SKIPPED = "skipped"  # an input whose bytes hash as committed: it keeps its committed entry (never a catalog status)


@dataclass
class FileInfo:
    """What decoding one input found (the INFO row's payload). ``status``: ARCHIVED, FAILED or SKIPPED;
    ``reason_code``: the failure kind metrics and the catalog use (``errors.InputError.code``, "storage", ...)."""

    source: str
    size: int
    status: str = FAILED
    reason: str = ""
    reason_code: str = ""
    content_hash: str = ""
    sample_rate: int = 0
    channels: int = 0
    frames: int = 0  # at the source rate
    duration_s: float = 0.0
    codec_samples: int = 0
    codec_frames: int = 0
    n_windows: int = 0
    stage_s: dict = field(default_factory=dict)  # seconds in fetch (open, download, hash), decode, resample, windowing

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "FileInfo":
        return FileInfo(**json.loads(text))


def _row(kind: str, file_id: int, seq: int = 0, frame_start: int = 0, n_frames: int = 0, channels: int = 0,
         payload: bytes = b"", info: str = "") -> dict:
    return {"kind": kind, "file_id": file_id, "seq": seq, "frame_start": frame_start, "n_frames": n_frames,
            "channels": channels, "payload": payload, "gains": b"", "info": info}


COLUMNS = tuple(_row(INFO, 0))  # every row's columns, in order


def info_row(file_id: int, info: FileInfo) -> dict:
    return _row(INFO, file_id, info=info.to_json())


def timed_iter(it: Iterable, spent: dict[str, float], key: str) -> Iterator:
    """The items of ``it``, adding to ``spent[key]`` the seconds spent producing them (not the time the consumer
    holds each one)."""
    it = iter(it)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            spent[key] += time.perf_counter() - t
        yield item


class HeapTrimmer:
    """Hands freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere), at most every
    ``every_s`` seconds whatever the number of callers. Windows are allocated, serialized and freed by the
    thousand: without it glibc keeps their pages in its arenas and a process grows with file length (measured on
    the in-process executor: 475 -> 624 MiB USS from a 3-minute to a 3-hour input; lowering glibc's mmap threshold
    instead halved the codec's speed)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last = every_s, time.monotonic()
        self.lock = threading.Lock()
        try:
            import ctypes
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def maybe(self) -> None:
        if self._trim is None or time.monotonic() - self.last < self.every_s:
            return
        with self.lock:
            if time.monotonic() - self.last < self.every_s:
                return
            self.last = time.monotonic()
        self._trim(0)


_TRIM = HeapTrimmer()  # one per process: decode tasks and codec actors of a Ray worker, the in-process threads


def decode_file(item: dict, geom: CodecInfo, window_frames: int, block_frames: int = 1 << 16,
                job_tags: dict | None = None) -> Iterator[dict]:
    """One input -> its windows at the codec rate (bounded memory), then one info row.

    Never raises for a bad input: the failure goes into the info row.
    """
    uri, fid = item["source"], item["file_id"]
    info = FileInfo(source=uri, size=item["size"])
    em, t0 = telemetry.Emitter(job_tags), time.perf_counter()
    em.inc("audioarc_files_in", stage="decode")
    st = dict.fromkeys(("fetch", "decode", "resample", "windowing"), 0.0)

    def timed(key, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            st[key] += time.perf_counter() - t

    try:
        t = time.perf_counter()
        with storage.open_input(uri) as (f, digest):
            st["fetch"] += time.perf_counter() - t
            info.content_hash = digest
            if isinstance(f, str):
                info.size = os.path.getsize(f)
            if item["prev_hash"] and digest == item["prev_hash"]:
                info.status = SKIPPED
                yield info_row(fid, info)
                return
            em.inc("audioarc_bytes_read", item["size"])
            if item["size"] == 0:
                raise InputError(f"{uri}: empty file (0 bytes); remove it or replace it with the real recording",
                                 code="empty")
            ai = timed("decode", audio.probe, f, uri)
            info.sample_rate, info.channels = ai.sample_rate, ai.channels
            cc = geom.channels  # channels per code stream: 1 = each channel its own stream
            if cc > 1 and ai.channels > cc:
                raise InputError(
                    f"{uri}: {ai.channels} channels, but codec {geom.name!r} codes one joint-stereo stream per "
                    f"file (mono or stereo inputs only); archive it with a mono codec (--codec encodec_24khz "
                    f"or neural_rvq), which codes every channel separately", code="channels")
            up = cc if cc > 1 and ai.channels == 1 else 1  # a mono file is coded as stereo (restored as mono)
            res = audio.Resampler(ai.sample_rate, geom.sample_rate, ai.channels)
            win = Windower(geom, window_frames, ai.channels * up)
            frames = 0

            def rows(ws):
                for w in ws:
                    yield _row(WINDOW, fid, w.seq, w.start, w.stop - w.start, ai.channels * up, w.samples.tobytes())

            def window(block):  # resampled samples -> whole windows (a mono file coded as stereo is widened)
                return list(win.push(np.repeat(block, up, axis=0) if up > 1 else block))

            for block in timed_iter(audio.read_blocks(f, uri, block_frames), st, "decode"):
                frames += block.shape[1]
                _TRIM.maybe()
                yield from rows(timed("windowing", window, timed("resample", res.process, block)))
            if frames == 0:
                raise InputError(f"{uri}: zero-length audio (the file has a header but no samples)", code="zero_length")
            yield from rows(timed("windowing", window, timed("resample", res.flush)))
            yield from rows(timed("windowing", lambda: list(win.finish())))
            info = replace(info, status=ARCHIVED, frames=frames, duration_s=frames / ai.sample_rate,
                           codec_samples=win.total, codec_frames=win.next_frame, n_windows=win.seq)
    except InputError as e:
        info.reason, info.reason_code = str(e), e.code
    except StorageError as e:
        info.reason, info.reason_code = str(e), "storage"
    except Exception as e:  # noqa: BLE001 - anything else is recorded against the file, not fatal
        info.reason, info.reason_code = f"{uri}: unexpected {type(e).__name__} while decoding: {e}", "unexpected"
    info.stage_s = {k: round(v, 6) for k, v in st.items()}
    if info.status == ARCHIVED:
        em.inc("audioarc_files_out", stage="decode")
        em.inc("audioarc_audio_seconds_out", info.duration_s, stage="decode")
        em.observe("audioarc_decode_file_seconds", time.perf_counter() - t0)
    else:
        em.inc("audioarc_failures", stage="decode", reason=info.reason_code or "other")
    yield info_row(fid, info)


class CodecActor:
    """Loads the codec once; encodes batches of windows. Info rows pass through. ``loaded``: the job's codec
    already loaded in this process (the in-process executor), used instead of loading ``weights`` again when it
    hashes to ``checkpoint_hash``."""

    def __init__(self, codec: str, weights: str | None, checkpoint_hash: str, n_q: int, device: str,
                 threads: int, progress=None, job_tags: dict | None = None, precision: str = "fp32", loaded=None):
        import torch

        from ..placement import resolve_device
        device = resolve_device(device)
        if device == "cpu":
            torch.set_num_threads(threads)
        placement.strict_fp32(device, precision)
        self.torch = torch
        self.precision = precision
        self.node_id = self.actor_id = None
        ray = sys.modules.get("ray")  # in-process (no Ray imported) or inside a Ray worker
        if ray is not None and ray.is_initialized():  # outside Ray asking for the context would start a local Ray
            rc = ray.get_runtime_context()
            self.node_id, self.actor_id = rc.get_node_id(), rc.get_actor_id()
        if loaded is not None and loaded.checkpoint_hash() == checkpoint_hash:
            self.codec = loaded.to(device)
        else:
            self.codec = archive.weights.load_path(codec, weights, checkpoint_hash, device)
        self.n_q, self.device = n_q, device
        self.bits = archive.bits_for(self.codec.codebook_size)
        self.ctx = sum(self.codec.encode_context)
        self.hop = self.codec.hop_length
        self.progress = progress
        self._unreported = dict.fromkeys(PROGRESS_COUNTS, 0)
        self._reported_at = 0.0
        self.em = telemetry.Emitter(job_tags)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        t0 = time.perf_counter()
        payload = list(batch["payload"])
        gains_out = list(batch["gains"])
        streams = [int(c) for c in batch["channels"]]
        info = list(batch["info"])
        kinds = batch["kind"]
        cc = self.codec.channels
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(kinds):
            if k == WINDOW:
                groups.setdefault(int(batch["n_frames"][i]), []).append(i)
        seconds = forward = pack = 0.0
        for n_frames, idx in groups.items():
            chans = [int(batch["channels"][i]) // cc for i in idx]  # code streams per window
            length = n_frames * self.hop + self.ctx
            x = np.concatenate([np.frombuffer(payload[i], np.float32).reshape(c, cc, length)
                                for i, c in zip(idx, chans)])
            t1 = time.perf_counter()
            with torch.inference_mode(), placement.autocast(self.device, self.precision):
                wav = placement.to_device(x, self.device)  # [streams, cc, length]
                codes, gains = self.codec.encode_with_gains(wav, self.n_q)
                codes = codes.cpu().numpy()
                gains = None if gains is None else gains.float().cpu().numpy()
            t2 = time.perf_counter()
            forward += t2 - t1
            off = 0
            for i, c in zip(idx, chans):
                payload[i] = archive.pack_codes(codes[off:off + c], self.bits)
                if gains is not None:
                    gains_out[i] = archive.pack_gains(gains[off:off + c])
                streams[i] = c
                off += c
            pack += time.perf_counter() - t2
            seconds += len(idx) * n_frames * self.hop / self.codec.sample_rate
        files = sum(1 for k in kinds if k == INFO)
        if self.progress is not None:
            self._report(files=files, seconds=seconds, windows=sum(len(v) for v in groups.values()),
                         forward_s=forward, pack_s=pack)
        if self.em.on:  # per batch: a handful of metric updates
            n_win = len(kinds) - files
            self.em.inc("audioarc_audio_seconds_in", seconds, stage="encode")
            self.em.inc("audioarc_audio_seconds_out", seconds, stage="encode")
            self.em.inc("audioarc_files_out", sum(1 for i, k in enumerate(kinds) if k == INFO
                                                  and FileInfo.from_json(info[i]).status == ARCHIVED), stage="encode")
            if n_win:
                self.em.observe("audioarc_encode_batch_seconds", time.perf_counter() - t0)
                self.em.observe("audioarc_encode_batch_windows", n_win)
            if self.device != "cpu":
                self.em.gpu(torch)
        _TRIM.maybe()
        out = dict(batch)
        out["payload"] = np.array(payload, dtype=object)
        out["gains"] = np.array(gains_out, dtype=object)
        out["channels"] = np.array(streams, dtype=batch["channels"].dtype)
        out["info"] = np.array(info, dtype=object)
        return out

    def _report(self, **counts: float) -> None:
        """Add a batch's counts to the progress actor: at once in this process (a plain call), and from a Ray
        actor whenever files completed or ``PROGRESS_EVERY_S`` passed, else summed with the next batch's. Each
        report is an actor task, and Ray keeps an event of every task in its GCS (``runtime.init_ray``): with one
        report a batch, a 24-hour input's gcs_server grew from 45 to 65 MiB. Windows of a batch without a file's
        end may stay unreported when the actor's last batch follows its last report within ``PROGRESS_EVERY_S``:
        the bar and the summary's codec seconds may then lag by that much; files are always counted (the catalog,
        not this, is what the job commits)."""
        u = self._unreported
        for k, v in counts.items():
            u[k] += v
        remote = getattr(self.progress.add, "remote", None)
        now = time.monotonic()
        if remote is not None and not u["files"] and now - self._reported_at < PROGRESS_EVERY_S:
            return
        (remote or self.progress.add)(node=self.node_id, actor=self.actor_id, **u)
        self._reported_at = now
        self._unreported = dict.fromkeys(PROGRESS_COUNTS, 0)


PROGRESS_EVERY_S = 0.5  # a Ray codec actor reports its progress at most this often unless a file completed
PROGRESS_COUNTS = ("files", "seconds", "windows", "forward_s", "pack_s")  # what it reports (``Progress.add``)


# -- progress -------------------------------------------------------------------------------------
class Progress:
    """Counters the codec actors report to (a Ray actor); the driver polls it for the progress bar."""

    def __init__(self):
        self.files = 0
        self.seconds = 0.0
        self.beats: dict[str, float] = {}  # codec actor -> last report (unix time)
        self.nodes: dict[str, dict] = {}  # node id -> {"actors": set, "windows": n, "seconds": s}
        self.stage_s = {"codec_forward": 0.0, "packing": 0.0}  # summed over the codec actors
        self.lock = threading.Lock()  # in-process, codec threads report at once

    def add(self, files: int = 0, seconds: float = 0.0, node: str | None = None, actor: str | None = None,
            windows: int = 0, forward_s: float = 0.0, pack_s: float = 0.0) -> None:
        with self.lock:
            self._add(files, seconds, node, actor, windows, forward_s, pack_s)

    def _add(self, files, seconds, node, actor, windows, forward_s, pack_s) -> None:
        self.files += files
        self.seconds += seconds
        self.stage_s["codec_forward"] += forward_s
        self.stage_s["packing"] += pack_s
        if actor:
            self.beats[actor] = time.time()
        if node is not None:
            n = self.nodes.setdefault(node, {"actors": set(), "windows": 0, "seconds": 0.0})
            n["actors"].add(actor)
            n["windows"] += windows
            n["seconds"] += seconds

    def by_node(self) -> dict[str, dict]:
        return {k: {"actors": len(v["actors"]), "windows": v["windows"], "seconds": round(v["seconds"], 3)}
                for k, v in self.nodes.items()}

    def get(self) -> tuple[int, float]:
        return self.files, self.seconds

    def stages(self) -> dict[str, float]:
        return dict(self.stage_s)

    def actors(self) -> dict[str, float]:
        return dict(self.beats)
