"""The encode job: list a collection, decode/resample in CPU tasks, encode in codec actors, write shards,
commit a manifest generation; resumable and fault tolerant (every input ends archived or failed)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from . import archive, audio, inprocess, metrics, placement, storage
from .audio import AUDIO_EXTENSIONS
from . import quality as quality_mod
from .codec import registry
from .codec.windows import CodecGeometry, Windower
from .errors import ArchiveFormatError, CodecMismatchError, ConfigError, InputError, StorageError
from .runtime import init_ray
from .manifest import ARCHIVED, FAILED, ArchiveRecord, CodecRecord, Location, ManifestEntry
from .quality import QualityConfig, StreamingSampler



EXECUTORS = ("auto", "local", "ray")


@dataclass(frozen=True)
class EncodeConfig:
    """Everything an encode job needs; validated once by ``validate``."""

    src: str
    dest: str
    bitrate_kbps: float = 6.0
    codec: str = registry.DEFAULT_CODEC
    codec_weights: str | None = None
    window_seconds: float = 30.0
    actors: int | None = None  # codec actors; default: 1 per GPU slot, else 1 per CPU
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    threads_per_actor: int | None = None  # torch threads in each CPU codec actor (Ray: 1; in-process: every core)
    batch_windows: int | None = None  # windows per codec forward pass; default 1 on CPU, 64 on GPU
    batch_seconds: float | None = None  # the same in seconds of audio (whole windows, at least one)
    min_actors: int | None = None  # autoscaling pool bounds (ActorPoolStrategy); default: --actors or 1
    max_actors: int | None = None  # ... default: --actors, else 1 per GPU slot or 1 per CPU
    precision: str = "fp32"  # GPU autocast: fp32 | bf16 | fp16 (check fidelity first: jobs/bench_codec.py)
    commit_every: int = 500  # files per committed generation (resume granularity)
    shard_mb: float = 64.0  # target shard size: rows are bundled into write tasks of about this much
    address: str | None = None
    quality: "QualityConfig | None" = None  # quality sampling beside the encode; None = off
    input_list: str | None = None  # text/CSV/Parquet list of inputs (e.g. an S3 Inventory report) instead of listing SRC
    metrics_port: int | None = None  # serve job-level metrics (prometheus_client) on this port; 0: any free
    metrics_host: str = "127.0.0.1"
    metrics_linger: float = 0.0  # after the job: keep serving until its final values were scraped, <= this
    emit_metrics: bool = True  # worker-side Ray metrics (also off with AUDIOARC_METRICS=0)
    rehash: bool = False  # read and hash every input, even those whose listed size and version are unchanged
    executor: str = "auto"  # "ray" | "local" (in-process, no Ray) | "auto": local unless there is a cluster to use

    def windows_per_batch(self) -> int | None:
        """``batch_windows``, or ``batch_seconds`` in whole windows of ``window_seconds`` (at least 1)."""
        if self.batch_seconds is None:
            return self.batch_windows
        return max(1, int(round(self.batch_seconds / self.window_seconds)))

    def validate(self) -> "EncodeConfig":
        if self.bitrate_kbps <= 0:
            raise ConfigError(f"--bitrate must be positive, got {self.bitrate_kbps}")
        if not 1.0 <= self.window_seconds <= 600:
            raise ConfigError(f"--window-seconds must be in [1, 600], got {self.window_seconds}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError("--actors must be >= 1")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ConfigError("--threads-per-actor must be >= 1")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor == "local" and self.address:
            raise ConfigError("--executor local runs in this process: drop --address (or use --executor ray)")
        if self.commit_every < 1:
            raise ConfigError("--commit-every must be >= 1")
        if self.shard_mb <= 0:
            raise ConfigError("--shard-mb must be positive")
        if self.batch_windows is not None and self.batch_windows < 1:
            raise ConfigError("--batch-windows must be >= 1")
        if self.batch_seconds is not None:
            if self.batch_windows is not None:
                raise ConfigError("give --batch-windows or --batch-seconds, not both")
            if self.batch_seconds <= 0:
                raise ConfigError(f"--batch-seconds must be positive, got {self.batch_seconds:g}")
        from .placement import PRECISIONS
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.src.rstrip("/") == self.dest.rstrip("/"):
            raise ConfigError("SRC and DEST must differ")
        return self


@dataclass
class EncodeSummary:
    archive: str
    generation: int
    files_total: int
    files_archived: int
    files_skipped: int  # already archived with the same content hash (resume)
    files_failed: int
    audio_seconds: float
    source_bytes: int
    pcm_bytes: int  # 16-bit PCM equivalent of the archived audio
    archive_bytes: int
    codec: str
    bitrate_kbps: float  # nominal, per channel
    effective_kbps: float  # archive bits actually stored per second of audio (all channels)
    compression_ratio: float  # source bytes / archive bytes
    pcm_compression_ratio: float
    wall_seconds: float
    x_realtime: float
    failures: list[dict] = field(default_factory=list)
    report: str = ""  # URL of this summary, saved in the archive
    quality: dict | None = None  # sampled fidelity: summary, gate violations, table and report URLs
    job_id: str = ""  # the job_id label of this run's metrics
    placement: dict | None = None  # codec actor plan + per node {actors, windows, seconds} that really ran

    def to_json(self) -> dict:
        return asdict(self)


def file_id_for(uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "big", signed=True)


# -- rows flowing through the pipeline ------------------------------------------------------------
# every row has the same columns; kind is "win" (a window: payload = float32 samples [channels, n], later
# packed codes [streams, n_q, n_frames], and channels becomes the number of code streams; gains: packed
# side gains of codecs that have them) or "info" (one per input, at its end: info = JSON about the file).
def _row(kind: str, file_id: int, seq: int = 0, frame_start: int = 0, n_frames: int = 0, channels: int = 0,
         payload: bytes = b"", info: str = "") -> dict:
    return {"kind": kind, "file_id": file_id, "seq": seq, "frame_start": frame_start, "n_frames": n_frames,
            "channels": channels, "payload": payload, "gains": b"", "info": info}


def decode_file(item: dict, geom: CodecGeometry, window_frames: int, block_frames: int = 1 << 16,
                job_tags: dict | None = None) -> Iterator[dict]:
    """One input -> its windows at the codec rate (bounded memory), then one info row.

    Never raises for a bad input: the failure goes into the info row.
    """
    uri, fid = item["source"], item["file_id"]
    info: dict = {"source": uri, "status": FAILED, "reason": "", "content_hash": "", "size": item["size"]}
    em, t0 = metrics.Emitter(job_tags), time.perf_counter()
    em.inc("audioarc_files_in", stage="decode")
    try:
        with storage.open_input(uri) as (f, digest):
            info["content_hash"] = digest
            if isinstance(f, str):
                info["size"] = os.path.getsize(f)
            if item["prev_hash"] and digest == item["prev_hash"]:
                info["status"] = "skipped"
                yield _row("info", fid, info=json.dumps(info))
                return
            em.inc("audioarc_bytes_read", item["size"])
            if item["size"] == 0:
                raise InputError(f"{uri}: empty file (0 bytes); remove it or replace it with the real recording",
                                 code="empty")
            ai = audio.probe(f, uri)
            info.update(sample_rate=ai.sample_rate, channels=ai.channels)
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
                    yield _row("win", fid, w.seq, w.start, w.stop - w.start, ai.channels * up, w.samples.tobytes())

            def widen(block):
                return np.repeat(block, up, axis=0) if up > 1 else block

            for block in audio.read_blocks(f, uri, block_frames):
                frames += block.shape[1]
                yield from rows(win.push(widen(res.process(block))))
            if frames == 0:
                raise InputError(f"{uri}: zero-length audio (the file has a header but no samples)", code="zero_length")
            yield from rows(win.push(widen(res.flush())))
            yield from rows(win.finish())
            info.update(status=ARCHIVED, frames=frames, duration_s=frames / ai.sample_rate,
                        codec_samples=win.total, codec_frames=win.next_frame, n_windows=win.seq)
    except InputError as e:
        info["reason"], info["reason_code"] = str(e), e.code
    except StorageError as e:
        info["reason"], info["reason_code"] = str(e), "storage"
    except Exception as e:  # noqa: BLE001 - anything else is recorded against the file, not fatal
        info["reason"], info["reason_code"] = f"{uri}: unexpected {type(e).__name__} while decoding: {e}", "unexpected"
    if info["status"] == ARCHIVED:
        em.inc("audioarc_files_out", stage="decode")
        em.inc("audioarc_audio_seconds_out", info["duration_s"], stage="decode")
        em.observe("audioarc_decode_file_seconds", time.perf_counter() - t0)
    else:
        em.inc("audioarc_failures", stage="decode", reason=info.get("reason_code") or "other")
    yield _row("info", fid, info=json.dumps(info))


class CodecActor:
    """Loads the codec once; encodes batches of windows. Info rows pass through."""

    def __init__(self, codec: str, weights: str | None, checkpoint_hash: str, n_q: int, device: str,
                 threads: int, progress=None, job_tags: dict | None = None, precision: str = "fp32"):
        import torch

        from .placement import resolve_device
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
        self.codec = archive.weights.load_path(codec, weights, checkpoint_hash, device)
        self.n_q, self.device = n_q, device
        self.bits = archive.bits_for(self.codec.codebook_size)
        self.ctx = sum(self.codec.encode_context)
        self.hop = self.codec.hop_length
        self.progress = progress
        self.em = metrics.Emitter(job_tags)

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
            if k == "win":
                groups.setdefault(int(batch["n_frames"][i]), []).append(i)
        seconds = 0.0
        for n_frames, idx in groups.items():
            chans = [int(batch["channels"][i]) // cc for i in idx]  # code streams per window
            length = n_frames * self.hop + self.ctx
            x = np.concatenate([np.frombuffer(payload[i], np.float32).reshape(c, cc, length)
                                for i, c in zip(idx, chans)])
            with torch.inference_mode(), placement.autocast(self.device, self.precision):
                wav = placement.to_device(x, self.device)  # [streams, cc, length]
                codes, gains = self.codec.encode_with_gains(wav, self.n_q)
                codes = codes.cpu().numpy()
                gains = None if gains is None else gains.float().cpu().numpy()
            off = 0
            for i, c in zip(idx, chans):
                payload[i] = archive.pack_codes(codes[off:off + c], self.bits)
                if gains is not None:
                    gains_out[i] = archive.pack_gains(gains[off:off + c])
                streams[i] = c
                off += c
            seconds += len(idx) * n_frames * self.hop / self.codec.sample_rate
        files = sum(1 for k in kinds if k == "info")
        if self.progress is not None:  # a Ray actor handle, or a Progress in this process
            add = getattr(self.progress.add, "remote", self.progress.add)
            add(files=files, seconds=seconds, node=self.node_id, actor=self.actor_id,
                windows=sum(len(v) for v in groups.values()))
        if self.em.on:  # per batch: a handful of metric updates
            n_win = len(kinds) - files
            self.em.inc("audioarc_audio_seconds_in", seconds, stage="encode")
            self.em.inc("audioarc_audio_seconds_out", seconds, stage="encode")
            self.em.inc("audioarc_files_out", sum(1 for i, k in enumerate(kinds) if k == "info"
                                                  and f'"status": "{ARCHIVED}"' in info[i]), stage="encode")
            if n_win:
                self.em.observe("audioarc_encode_batch_seconds", time.perf_counter() - t0)
                self.em.observe("audioarc_encode_batch_windows", n_win)
            if self.device != "cpu":
                self.em.gpu(torch)
        out = dict(batch)
        out["payload"] = np.array(payload, dtype=object)
        out["gains"] = np.array(gains_out, dtype=object)
        out["channels"] = np.array(streams, dtype=batch["channels"].dtype)
        out["info"] = np.array(info, dtype=object)
        return out


# -- progress -------------------------------------------------------------------------------------
class Progress:
    """Counters the codec actors report to (a Ray actor); the driver polls it for the progress bar."""

    def __init__(self):
        self.files = 0
        self.seconds = 0.0
        self.beats: dict[str, float] = {}  # codec actor -> last report (unix time)
        self.nodes: dict[str, dict] = {}  # node id -> {"actors": set, "windows": n, "seconds": s}

    def add(self, files: int = 0, seconds: float = 0.0, node: str | None = None, actor: str | None = None,
            windows: int = 0) -> None:
        self.files += files
        self.seconds += seconds
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

    def actors(self) -> dict[str, float]:
        return dict(self.beats)


# -- the job --------------------------------------------------------------------------------------
def _list_inputs(src: str, input_list: str | None = None) -> Iterator[storage.ObjectInfo]:
    """Inputs, lazily: SRC listed page by page, or the rows of an input list file streamed."""
    if input_list:
        yield from read_input_list(input_list, src)
        return
    yield from storage.walk_files(src, AUDIO_EXTENSIONS)


def _resolve(entry: str, base: str, bucket: str | None = None) -> str:
    entry = entry.strip()
    if "://" in entry or entry.startswith("/"):
        return entry
    if bucket:
        proto = base.split("://", 1)[0] if "://" in base else "s3"
        return f"{proto}://{bucket}/{entry.lstrip('/')}"
    return storage.join(base, entry)


def read_input_list(url: str, base: str, batch_rows: int = 8192) -> Iterator[storage.ObjectInfo]:
    """Stream an input list: ``.parquet`` or ``.csv`` with a ``uri`` or ``key`` column (optional ``bucket``
    and ``size`` columns; a headerless CSV is read as S3 Inventory: bucket, key, size, ...), or text with one
    URI per line. Keys without a scheme are relative to ``base`` (SRC), or to their ``bucket``.
    Sizes that are not listed are -1 (measured when the file is read). Never holds the list in memory.
    """
    import csv
    import io
    from urllib.parse import unquote_plus

    low = url.lower().split("?", 1)[0]
    if low.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq
        with storage.open_read(url) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            col = next((c for c in ("uri", "url", "key", "source") if c in names), None)
            if col is None:
                raise ConfigError(f"{url}: input list has no uri/key column (columns: {', '.join(names)})")
            cols = [c for c in (col, "bucket", "size") if c in names]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                d = batch.to_pydict()
                for i, v in enumerate(d[col]):
                    if not v:
                        continue
                    if not v.lower().endswith(AUDIO_EXTENSIONS):
                        continue
                    sz = d["size"][i] if "size" in d and d["size"][i] is not None else -1
                    yield storage.ObjectInfo(_resolve(v, base, d.get("bucket", [None] * (i + 1))[i]), int(sz), "")
        return
    with storage.open_read(url) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        if low.endswith((".csv", ".csv.txt")):
            reader = csv.reader(text)
            header = next(reader, None)
            if header is None:
                return
            h = [c.strip().lower() for c in header]
            inventory = not any(c in h for c in ("uri", "url", "key", "source"))
            if inventory:  # S3 Inventory CSV: no header; bucket, key (URL-encoded), size, ...
                ib, ik, isz = 0, 1, 2
                rows = _chain_first(header, reader)
            else:
                ik = next(h.index(c) for c in ("uri", "url", "key", "source") if c in h)
                ib = h.index("bucket") if "bucket" in h else None
                isz = h.index("size") if "size" in h else None
                rows = reader
            for r in rows:
                if len(r) <= ik or not r[ik].strip():
                    continue
                key = unquote_plus(r[ik]) if inventory else r[ik]
                if not key.lower().endswith(AUDIO_EXTENSIONS):
                    continue
                bucket = r[ib] if ib is not None and len(r) > ib else None
                sz = r[isz] if isz is not None and len(r) > isz else ""
                yield storage.ObjectInfo(_resolve(key, base, bucket), int(sz) if sz.strip().isdigit() else -1, "")
            return
        for line in text:
            line = line.strip()
            if line and not line.startswith("#") and line.lower().endswith(AUDIO_EXTENSIONS):
                yield storage.ObjectInfo(_resolve(line, base), -1, "")


def _chain_first(first, rest):
    yield first
    yield from rest


def _batches(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _peek(it: Iterator) -> Iterator:
    """``it`` with its first item already fetched (a listing error or an empty SRC shows before any work)."""
    first = next(it, None)
    if first is None:
        return iter(())
    return _chain_first(first, it)


def prepare_archive(cfg: EncodeConfig, codec, n_q: int) -> ArchiveRecord:
    """Check DEST against the codec and bitrate (creating the archive if there is none)."""
    storage.check_bucket(cfg.dest)
    if storage.is_local(cfg.dest) and os.path.isfile(storage.local_path(cfg.dest)):
        raise ConfigError(f"{cfg.dest}: DEST is a file, not a folder; choose a folder (or URL prefix) for the archive")
    return archive.create_or_open(cfg.dest, codec, n_q)


def run_encode(cfg: EncodeConfig, on_progress: Callable[[int, int, float], None] | None = None,
               on_metrics: Callable[[str], None] | None = None) -> EncodeSummary:
    """Run the whole job; ``on_progress(files_done, files_total_so_far, audio_seconds)`` while it runs;
    ``on_metrics(url)`` once the job's metrics endpoint serves (with ``cfg.metrics_port``)."""
    cfg.validate()
    job_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(3).hex()}"
    dm = None
    if cfg.metrics_port is not None:
        dm = metrics.DriverMetrics(job_id, cfg.codec, cfg.bitrate_kbps, cfg.src, cfg.dest)
        port = dm.serve(cfg.metrics_host, cfg.metrics_port)
        if on_metrics:
            on_metrics(f"http://{cfg.metrics_host}:{port}/metrics")
    try:
        s = _run_encode(cfg, on_progress, job_id, dm)
        if dm is not None:
            dm.finished()
            dm.linger(cfg.metrics_linger)
        return s
    finally:
        if dm is not None:
            dm.close()


def _load_codec(cfg: EncodeConfig):
    """The codec of this job: ``--codec-weights`` if given, else the weights the archive at DEST carries (or
    the shipped checkpoint with its hash), else the shipped default weights."""
    try:
        existing = archive.read_record(cfg.dest)
    except (StorageError, ArchiveFormatError):
        existing = None  # prepare_archive reports it
    if existing is not None and existing.codec.name == cfg.codec:
        try:
            return archive.load_codec(cfg.dest, existing, cfg.codec_weights)
        except CodecMismatchError:
            pass  # other weights than the archive's: prepare_archive names the mismatch
    return registry.load(cfg.codec, cfg.codec_weights)


def _run_encode(cfg: EncodeConfig, on_progress, job_id: str, dm: "metrics.DriverMetrics | None") -> EncodeSummary:
    t0 = time.time()
    # workers run in other folders: local paths travel absolute
    cfg = replace(cfg, src=storage.absolute(cfg.src), dest=storage.absolute(cfg.dest),
                  input_list=storage.absolute(cfg.input_list) if cfg.input_list else None,
                  codec_weights=storage.absolute(cfg.codec_weights) if cfg.codec_weights else None)
    storage.check_bucket(cfg.dest)
    storage.check_bucket(cfg.input_list or cfg.src)
    inputs = _peek(_list_inputs(cfg.src, cfg.input_list))  # a missing SRC fails here, before anything is written
    codec = _load_codec(cfg)
    n_q = codec.n_q_for_kbps(cfg.bitrate_kbps)
    geom = CodecGeometry.of(codec)
    seg = codec.segment_frames  # windows hold whole segments of segment codecs
    window_frames = max(seg, -(-int(round(cfg.window_seconds * codec.frame_rate)) // seg) * seg)
    first = next(inputs, None)
    if first is None:
        raise ConfigError(f"{cfg.src}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    inputs = _chain_first(first, inputs)
    record = prepare_archive(cfg, codec, n_q)
    crec = record.codec
    actor_weights = cfg.codec_weights or storage.join(cfg.dest, record.weights.path)
    lease = archive.Lease(cfg.dest, job_id)
    try:
        archive.collect_garbage(cfg.dest)  # what killed jobs left (never what a live job holds)
        return _encode_waves(cfg, job_id, dm, on_progress, t0, inputs, record, crec, n_q, geom, window_frames,
                             actor_weights, lease)
    finally:
        try:
            archive.collect_garbage(cfg.dest, own_job=job_id)  # this job's uncommitted shards, if it failed
        finally:
            lease.release()


def choose_executor(cfg: EncodeConfig, cuda: bool | None = None) -> str:
    """``cfg.executor``, or for ``auto``: ``ray`` when there is a cluster to use (``--address``, RAY_ADDRESS, a
    Ray already started in this process), an actor pool or GPUs are asked for, or a GPU is at hand (its decode
    fleet keeps the card busy); else ``local`` (in-process: no Ray start-up, every core for the codec)."""
    if cfg.executor != "auto":
        return cfg.executor
    ray = sys.modules.get("ray")
    if cfg.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return "ray"
    if any(v is not None for v in (cfg.actors, cfg.min_actors, cfg.max_actors)) or (cfg.gpus_per_actor or 0) > 0:
        return "ray"
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    return "ray" if cuda and cfg.gpus_per_actor != 0 else "local"


class _Runtime:
    """Where the stages run and what hangs on it (actor plan, progress counters, quality tasks), started on first
    need: a job whose inputs are all unchanged starts nothing. ``local``: in this process (``inprocess``);
    ``ray``: a Ray Data pipeline per chunk of inputs, codec actors, a progress actor."""

    def __init__(self, cfg: EncodeConfig, job_id: str, dm, q, executor: str = "ray"):
        self.cfg, self.job_id, self.dm, self.q = cfg, job_id, dm, q
        self.executor = executor
        self.ray = self.plan = self.progress = self.q_task = None
        self.codec_stage = None  # local: the one CodecActor, loaded once for the job
        self.threads = self.decoders = None

    def start(self):
        if self.executor == "local":
            return self._start_local()
        if self.ray is None:
            init_ray(self.cfg.address)
            import ray
            if self.dm is not None:  # Prometheus file_sd entries in the Ray session dir (see dashboards/README.md)
                from .monitor import advertise
                self.dm.advertised = advertise(self.dm.url, self.job_id)
            c = self.cfg
            self.plan = placement.plan_actors(ray.cluster_resources(), c.actors, c.gpus_per_actor, c.min_actors,
                                              c.max_actors, c.windows_per_batch(), c.precision)
            # beside the driver (its node outlives the job's other nodes); soft: any node if that one is full
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self.progress = ray.remote(num_cpus=0, scheduling_strategy=here)(Progress).remote()
            self.q_task = ray.remote(num_cpus=0.5)(quality_mod.evaluate) if self.q else None
            self.ray = ray
        return self.ray

    def _start_local(self):
        if self.plan is None:
            import torch
            c = self.cfg
            threads, self.decoders = inprocess.default_threads()
            self.threads = c.threads_per_actor or threads
            cuda = torch.cuda.is_available() and c.gpus_per_actor != 0
            self.plan = placement.plan_actors({"CPU": 1, "GPU": 1 if cuda else 0}, 1, None, None, None,
                                              c.windows_per_batch(), c.precision)
            self.progress = Progress()
        return None

    def stream(self, rows: list[dict], geom: CodecGeometry, window_frames: int, job_tags, crec: CodecRecord,
               weights: str, n_q: int) -> Iterator[dict[str, np.ndarray]]:
        """Encoded batches (``CodecActor`` output) of the inputs ``rows``, in the order they complete."""
        self.start()
        plan, c = self.plan, self.cfg
        if self.executor == "local":
            if self.codec_stage is None:
                self.codec_stage = CodecActor(crec.name, weights, crec.checkpoint_hash, n_q, plan.device,
                                              self.threads, progress=self.progress, precision=plan.precision)
            window = window_frames * geom.hop_length + sum(geom.encode_context)
            return inprocess.stream(
                rows, lambda it: decode_file(it, geom, window_frames), self.codec_stage,
                batch_samples=plan.batch_windows * window, decoders=self.decoders)
        ray = self.ray
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.flat_map(decode_file, fn_kwargs={"geom": geom, "window_frames": window_frames, "job_tags": job_tags},
                         num_cpus=0.5)
        ds = ds.map_batches(
            CodecActor, batch_size=plan.batch_windows, batch_format="numpy",
            fn_constructor_kwargs={"codec": crec.name, "weights": weights,
                                   "checkpoint_hash": crec.checkpoint_hash, "n_q": n_q, "device": plan.device,
                                   "threads": c.threads_per_actor or 1, "progress": self.progress,
                                   "job_tags": job_tags, "precision": plan.precision},
            compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
            **plan.remote_args())
        return ds.iter_batches(batch_size=None, batch_format="numpy")

    def quality(self, dest: str, record, entry, q, weights):
        """A quality evaluation of one archived file: a Ray task, or (local) a call made by ``gather``."""
        self.start()
        if self.executor == "local":
            return lambda: quality_mod.evaluate(dest, record, entry, q, weights=weights)
        return self.q_task.remote(dest, record, entry, q, weights=weights)

    def gather(self, futures: list) -> list:
        if self.executor == "local":
            return [f() for f in futures]
        return self.ray.get(futures)

    def placement(self) -> dict | None:
        """The summary's ``placement``: the plan, the executor, the work per node."""
        if self.plan is None:
            return None
        extra = {"executor": self.executor}
        if self.executor == "local":
            extra.update(threads=self.threads, decoders=self.decoders)
        return dict(self.plan.to_json(), nodes=self.ask("by_node", {}), **extra)

    def ask(self, method: str, default):
        """A progress figure from the progress actor; ``default`` if it is gone (progress is only shown, never
        what the job commits: a lost node must not fail the job)."""
        if self.executor == "local":
            return getattr(self.progress, method)() if self.progress is not None else default
        if self.ray is None:
            return default
        try:
            return self.ray.get(getattr(self.progress, method).remote(), timeout=30)
        except Exception:  # noqa: BLE001
            return default


def _plan_wave(cfg: EncodeConfig, current: "archive.Archive", wave: list
               ) -> tuple[list[dict], list[ManifestEntry], dict[str, ManifestEntry]]:
    """Split a wave of listed inputs into items to decode and entries already archived unchanged. The wave's
    committed entries are looked up in the catalog (a bounded read, never the whole catalog); an input whose
    listed size and version (ETag / mtime) equal its archived entry's is unchanged without reading a byte, and
    one without a listed version is hashed by its decode task and skipped there when the hash matches."""
    prev = current.by_sources([obj.uri for obj in wave])
    items, unchanged = [], []
    for obj in wave:
        p = prev.get(obj.uri)
        ok = p is not None and p.status == ARCHIVED
        if ok and not cfg.rehash and obj.version and p.source_version == obj.version and p.size == obj.size >= 0:
            unchanged.append(p)
            continue
        items.append({"source": obj.uri, "file_id": file_id_for(obj.uri), "size": obj.size,
                      "prev_hash": p.content_hash if ok else "", "version": obj.version})
    return items, unchanged, prev


STREAM_CHUNK = 4096  # inputs per Ray dataset: codec actors live across the chunk's generations
LOOKUP_BATCH = 2000  # inputs matched against the catalog per lookup


class _Assembler:
    """The driver's end of the stream: code rows into shards, completed files into generations, generations
    into commits. Rows arrive from the codec actors in any order; a file is complete when its info row and all
    its windows are in. A file's windows may sit in the shard of an earlier generation than the one that commits
    it (they arrived before it completed): committed shards never change, so its entry points there too."""

    def __init__(self, cfg: EncodeConfig, crec: CodecRecord, job_id: str, lease, last_gen: int):
        self.cfg, self.crec, self.job_id, self.lease = cfg, crec, job_id, lease
        self.shard_bytes = int(cfg.shard_mb * (1 << 20))
        self.last_gen = last_gen
        self.gen: int | None = None  # the generation being filled (claimed when it first needs a number)
        self.part = 0
        self.writer = None
        self.rel = ""
        self.writer_codes = 0
        self.closed: dict[str, tuple[dict, int, str]] = {}  # shard rel -> (file id -> row groups, bytes, sha256)
        self.shard_codes: dict[str, int] = {}  # shard rel -> code bytes in it (shares archive bytes out)
        self.shards_of: dict[int, set[str]] = {}  # file id -> shards holding its windows
        self.seqs: dict[int, set[int]] = {}
        self.codes_bytes: dict[int, dict[str, int]] = {}  # file id -> shard -> code bytes
        self.infos: dict[int, dict] = {}
        self.items: dict[int, dict] = {}  # in flight: file id -> item (with its committed entry, "prev")
        self.ready: list[int] = []  # complete, not yet committed

    def expect(self, item: dict) -> None:
        self.items[item["file_id"]] = item

    def _claim(self) -> int:
        if self.gen is None:
            self.gen = self.last_gen = archive.claim_generation(self.cfg.dest, self.job_id, self.last_gen)
        return self.gen

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.closed[self.rel] = (self.writer.where, self.writer.bytes, self.writer.sha256)
            self.writer, self.writer_codes = None, 0
            self.part += 1

    def add_window(self, fid: int, row: dict) -> None:
        if self.writer is None:
            self.rel = archive.shard_relpath(self._claim(), self.part)
            self.writer = archive.ShardWriter(storage.join(self.cfg.dest, self.rel), self.crec)
        self.writer.add(row)
        n = len(row["codes"]) + len(row.get("gains") or b"")
        self.writer_codes += n
        self.shard_codes[self.rel] = self.shard_codes.get(self.rel, 0) + n
        self.seqs.setdefault(fid, set()).add(row["seq"])
        self.shards_of.setdefault(fid, set()).add(self.rel)
        per = self.codes_bytes.setdefault(fid, {})
        per[self.rel] = per.get(self.rel, 0) + n
        if self.writer_codes >= self.shard_bytes:
            self._close_shard()
        self._check(fid)

    def add_info(self, fid: int, info: dict) -> None:
        self.infos[fid] = info
        self._check(fid)

    def _check(self, fid: int) -> None:
        info = self.infos.get(fid)
        if info is None or fid not in self.items:
            return
        if info["status"] == ARCHIVED and len(self.seqs.get(fid, ())) < info["n_windows"]:
            return
        self.ready.append(fid)
        self.items[fid]["_ready"] = True

    def pending(self) -> int:
        return len(self.ready)

    def commit(self, lost: bool = False) -> tuple[int | None, list[ManifestEntry], list[ManifestEntry], list[dict]]:
        """Commit the complete files (``lost``: and every file still in flight, as failed: the stream ended without
        them). Returns (generation, entries, refreshed entries, their items)."""
        fids = list(self.ready)
        if lost:
            fids += [f for f, it in self.items.items() if not it.get("_ready")]
        self.ready = []
        if not fids:
            return None, [], [], []
        self._close_shard()
        gen = self._claim()
        stamp = archive.now()
        entries, refreshed, items = [], [], []
        for fid in fids:
            it = self.items.pop(fid)
            items.append(it)
            e = self._entry(fid, it, gen, stamp)
            if e is None:
                continue
            (refreshed if e.generation == -1 else entries).append(e)
        refreshed = [replace(e, generation=gen) for e in refreshed]
        prev = {it["source"]: it["prev"] for it in items if it.get("prev") is not None}
        kept = archive.catalog.Totals(prev)
        for e in entries + refreshed:
            kept.add(e)
        archive.commit_generation(self.cfg.dest, self.lease, gen, entries + refreshed, totals=kept.sum)
        for fid in fids:
            for d in (self.seqs, self.shards_of, self.codes_bytes, self.infos):
                d.pop(fid, None)
        self.gen, self.part = None, 0  # the next generation gets the next number
        return gen, entries, refreshed, items

    def _entry(self, fid: int, it: dict, gen: int, stamp: str) -> ManifestEntry | None:
        uri = it["source"]
        info = self.infos.get(fid)
        size = it["size"] if it["size"] >= 0 else int((info or {}).get("size", -1))
        base = {"source": uri, "relpath": storage.relpath(self.cfg.src, uri), "file_id": fid, "size": max(size, 0),
                "generation": gen, "encoded_at": stamp, "source_version": it.get("version") or ""}
        if info is None:
            return ManifestEntry(content_hash="", status=FAILED, reason=f"{uri}: no result came back from the "
                                 f"workers (task lost); re-run the job to retry it", reason_code="lost", **base)
        if info["status"] == "skipped":
            p = it.get("prev")
            if p is not None and it.get("version") and it["version"] != p.source_version:
                return replace(p, source_version=it["version"], generation=-1, encoded_at=stamp)
            return None
        if info["status"] == ARCHIVED and self.seqs.get(fid, set()) != set(range(info["n_windows"])):
            info = dict(info, status=FAILED, reason_code="incomplete",
                        reason=f"{uri}: only {len(self.seqs.get(fid, ()))} of {info['n_windows']} code windows "
                               f"were written; re-run the job")
        if info["status"] != ARCHIVED:
            return ManifestEntry(content_hash=info.get("content_hash", ""), status=FAILED, reason=info["reason"],
                                 reason_code=info.get("reason_code") or "other", sample_rate=info.get("sample_rate", 0),
                                 channels=info.get("channels", 0), **base)
        locs, arc_bytes = [], 0
        for rel in sorted(self.shards_of.get(fid, ())):
            where, nbytes, sha = self.closed[rel]
            locs += [Location(rel, g, nbytes, sha) for g in where.get(fid, [])]
            arc_bytes += int(round(nbytes * self.codes_bytes[fid].get(rel, 0) / (self.shard_codes.get(rel) or 1)))
        return ManifestEntry(
            content_hash=info["content_hash"], status=ARCHIVED, duration_s=info["duration_s"],
            sample_rate=info["sample_rate"], channels=info["channels"], frames=info["frames"],
            codec_samples=info["codec_samples"], codec_frames=info["codec_frames"], n_windows=info["n_windows"],
            archive_bytes=arc_bytes, locations=tuple(sorted(set(locs), key=lambda loc: (loc.shard, loc.row_group))),
            **base)


def _encode_waves(cfg, job_id, dm, on_progress, t0, inputs, record, crec, n_q, geom, window_frames, actor_weights,
                  lease) -> EncodeSummary:
    """One streaming pipeline per chunk of inputs (decode tasks -> codec actors -> the driver, which writes the
    shards and commits a generation every ``commit_every`` completed files: a generation boundary costs a shard
    close and one catalog append, not a new actor pool)."""
    current = archive.Archive(cfg.dest, record)
    asm = _Assembler(cfg, crec, job_id, lease, archive.commit.highest_claimed(cfg.dest))
    executor = choose_executor(cfg)
    job_tags = {"job_id": job_id, "codec": crec.name, "bitrate": f"{cfg.bitrate_kbps:g}"} \
        if cfg.emit_metrics and metrics.enabled() and executor == "ray" else None  # (Ray's metrics: Ray only)
    q = cfg.quality if cfg.quality is not None and cfg.quality.fraction > 0 else None
    rt = _Runtime(cfg, job_id, dm, q, executor)
    sampler = StreamingSampler(q.fraction, q.seed, q.min_files) if q else None
    q_futures: list = []
    totals = _Totals()
    counts = {"files": 0, "unchanged": 0, "unchanged_s": 0.0}
    generations: set[int] = set()
    em = metrics.Emitter(job_tags)

    def report() -> None:
        if not (on_progress or dm is not None):
            return
        f, s = tuple(rt.ask("get", (0, 0.0)))
        f, s = f + counts["unchanged"], s + counts["unchanged_s"]
        if on_progress:
            on_progress(f, counts["files"], s)
        if dm is not None:
            dm.progress(f, counts["files"], s, rt.ask("actors", {}))

    def planned():  # inputs to decode; unchanged ones are accounted as they are seen
        for wave in _batches(inputs, LOOKUP_BATCH):
            counts["files"] += len(wave)
            items, unchanged, prev = _plan_wave(cfg, current, wave)
            for e in unchanged:
                totals.add(e, skipped=True)
                counts["unchanged"] += 1
                counts["unchanged_s"] += e.duration_s
            if unchanged and dm is not None:
                dm.committed([], skipped=len(unchanged))
            for it in items:
                it["prev"] = prev.get(it["source"])
                yield it
            if not items:
                report()

    def committed(result) -> None:
        nonlocal record
        gen, entries, refreshed, items = result
        if gen is None:
            return
        written = {e.source for e in entries}
        for e in entries:
            totals.add(e, skipped=False)
        n_skipped = 0
        for it in items:  # skipped by their hash: they keep their committed entry
            if it["source"] not in written and it.get("prev") is not None:
                totals.add(it["prev"], skipped=True)
                n_skipped += 1
        if dm is not None:
            dm.committed(entries, skipped=n_skipped)
        em.inc("audioarc_files_out", sum(1 for e in entries if e.status == ARCHIVED), stage="write")
        generations.add(gen)
        record = replace(record, generations=tuple(sorted(generations)))
        if sampler:  # sample this generation's files now, while the stream goes on
            q_futures.extend(rt.quality(cfg.dest, record, e, q, cfg.codec_weights)
                             for e in entries if sampler.offer(e))

    for chunk in _batches(planned(), STREAM_CHUNK):
        for it in chunk:
            asm.expect(it)
        rows = [{k: it[k] for k in ("source", "file_id", "size", "prev_hash")} for it in chunk]
        last = time.monotonic()
        for batch in rt.stream(rows, geom, window_frames, job_tags, crec, actor_weights, n_q):
            kinds = batch["kind"]
            written = 0
            for i in range(len(kinds)):
                fid = int(batch["file_id"][i])
                if kinds[i] == "win":
                    codes = batch["payload"][i]
                    gains = batch["gains"][i] or None
                    asm.add_window(fid, {"file_id": fid, "seq": int(batch["seq"][i]),
                                         "frame_start": int(batch["frame_start"][i]),
                                         "n_frames": int(batch["n_frames"][i]), "channels": int(batch["channels"][i]),
                                         "n_q": crec.n_q, "codes": codes, "gains": gains})
                    written += len(codes) + len(gains or b"")
                else:
                    asm.add_info(fid, json.loads(batch["info"][i]))
            em.inc("audioarc_bytes_written", written)
            if asm.pending() >= cfg.commit_every:
                committed(asm.commit())
            if time.monotonic() - last > 0.5:
                report()
                last = time.monotonic()
        committed(asm.commit(lost=True))  # the chunk is through: its last files, and any the stream lost
        report()
    quality_result = None
    if sampler:
        left = list(sampler.leftovers())
        q_futures += [rt.quality(cfg.dest, record, e, q, cfg.codec_weights) for e in left]
        if q_futures:
            rows = rt.gather(q_futures)
            quality_result = quality_mod.finish(cfg.dest, job_id, rows, q, {
                "archive": cfg.dest, "codec": crec.name, "checkpoint": crec.checkpoint_hash,
                "bitrate_kbps": crec.kbps_per_channel,
                "effective_kbps": round(totals.archive_bytes * 8 / totals.audio_s / 1000, 3) if totals.audio_s else None,
                "files in job": counts["files"], "files_failed": totals.failed},
                files_archived=totals.archived - totals.skipped)  # the files this run encoded: the sample's population
    summary = summarize(cfg, crec, totals, time.time() - t0)
    summary.placement = rt.placement()
    if quality_result is not None:
        if dm is not None:
            dm.quality(quality_result.summary)
        summary.quality = {"summary": quality_result.summary, "violations": quality_result.violations,
                           "table": quality_result.table, "report": quality_result.report}
    summary.job_id = job_id
    summary.report = storage.join(cfg.dest, "reports", f"encode-{job_id}.json")
    storage.write_bytes(summary.report, (json.dumps(summary.to_json(), indent=2) + "\n").encode())
    return summary


@dataclass
class _Totals:
    """Running job totals (the driver keeps these, not one record per input)."""

    MAX_FAILURES_LISTED = 1000

    files: int = 0
    archived: int = 0
    skipped: int = 0
    failed: int = 0
    audio_s: float = 0.0
    encoded_s: float = 0.0  # audio encoded by this run (not skipped)
    source_bytes: int = 0
    pcm_bytes: int = 0
    archive_bytes: int = 0
    generation: int = 0
    failures: list = field(default_factory=list)

    def add(self, e: ManifestEntry, skipped: bool) -> None:
        self.files += 1
        self.generation = max(self.generation, e.generation)
        if e.status != ARCHIVED:
            self.failed += 1
            if len(self.failures) < self.MAX_FAILURES_LISTED:
                self.failures.append({"source": e.source, "reason": e.reason})
            return
        self.archived += 1
        self.skipped += skipped
        self.audio_s += e.duration_s
        self.encoded_s += 0.0 if skipped else e.duration_s
        self.source_bytes += e.size
        self.pcm_bytes += e.frames * e.channels * 2
        self.archive_bytes += e.archive_bytes


def summarize(cfg: EncodeConfig, crec: CodecRecord, t: _Totals, wall: float) -> EncodeSummary:
    """Job summary over every input of the job; x_realtime counts only audio encoded by this run.
    ``failures`` lists at most the first 1000 (all are in the manifest: ``audioarc ls``)."""
    arc = t.archive_bytes
    return EncodeSummary(
        archive=cfg.dest, generation=t.generation, files_total=t.files, files_archived=t.archived,
        files_skipped=t.skipped, files_failed=t.failed, audio_seconds=round(t.audio_s, 3),
        source_bytes=t.source_bytes, pcm_bytes=t.pcm_bytes, archive_bytes=arc, codec=crec.name,
        bitrate_kbps=crec.kbps_per_channel,
        effective_kbps=round(arc * 8 / t.audio_s / 1000, 4) if t.audio_s else 0.0,
        compression_ratio=round(t.source_bytes / arc, 2) if arc else 0.0,
        pcm_compression_ratio=round(t.pcm_bytes / arc, 2) if arc else 0.0,
        wall_seconds=round(wall, 2), x_realtime=round(t.encoded_s / wall, 2) if wall else 0.0,
        failures=t.failures)