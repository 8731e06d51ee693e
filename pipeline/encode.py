"""The encode job: list a collection, decode/resample in CPU tasks, encode in codec actors, write shards,
commit a manifest generation; resumable and fault tolerant (every input ends archived or failed)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator

import numpy as np

from . import archive, audio, metrics, placement, storage
from . import quality as quality_mod
from .codec import registry
from .codec.windows import CodecGeometry, Windower
from .errors import ArchiveFormatError, CodecMismatchError, ConfigError, InputError, StorageError
from .manifest import ARCHIVED, FAILED, ArchiveRecord, CodecRecord, Location, ManifestEntry
from .quality import QualityConfig, StreamingSampler

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".w64", ".rf64",
                    ".caf", ".opus")


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
    threads_per_actor: int = 1  # torch threads in each CPU codec actor
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
    em, t0, storage_err = metrics.Emitter(job_tags), time.perf_counter(), False
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
                raise InputError(f"{uri}: empty file (0 bytes); remove it or replace it with the real recording")
            ai = audio.probe(f, uri)
            info.update(sample_rate=ai.sample_rate, channels=ai.channels)
            cc = geom.channels  # channels per code stream: 1 = each channel its own stream
            if cc > 1 and ai.channels > cc:
                raise InputError(
                    f"{uri}: {ai.channels} channels, but codec {geom.name!r} codes one joint-stereo stream per "
                    f"file (mono or stereo inputs only); archive it with a mono codec (--codec encodec_24khz "
                    f"or neural_rvq), which codes every channel separately")
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
                raise InputError(f"{uri}: zero-length audio (the file has a header but no samples)")
            yield from rows(win.push(widen(res.flush())))
            yield from rows(win.finish())
            info.update(status=ARCHIVED, frames=frames, duration_s=frames / ai.sample_rate,
                        codec_samples=win.total, codec_frames=win.next_frame, n_windows=win.seq)
    except (InputError, StorageError) as e:
        info["reason"], storage_err = str(e), isinstance(e, StorageError)
    except Exception as e:  # noqa: BLE001 - anything else is recorded against the file, not fatal
        info["reason"] = f"{uri}: unexpected {type(e).__name__} while decoding: {e}"
    if info["status"] == ARCHIVED:
        em.inc("audioarc_files_out", stage="decode")
        em.inc("audioarc_audio_seconds_out", info["duration_s"], stage="decode")
        em.observe("audioarc_decode_file_seconds", time.perf_counter() - t0)
    else:
        em.inc("audioarc_failures", stage="decode", reason=metrics.classify_failure(info["reason"], storage_err))
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
        import ray
        if ray.is_initialized():  # outside Ray (unit use) asking for the context would start a local Ray
            rc = ray.get_runtime_context()
            self.node_id, self.actor_id = rc.get_node_id(), rc.get_actor_id()
        self.codec = registry.load(codec, weights, device=device)
        if self.codec.checkpoint_hash() != checkpoint_hash:
            raise CodecMismatchError(f"codec actor loaded checkpoint {self.codec.checkpoint_hash()}, "
                                     f"driver expected {checkpoint_hash}")
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
        if self.progress is not None:
            self.progress.add.remote(files=files, seconds=seconds, node=self.node_id, actor=self.actor_id,
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


# -- shards ---------------------------------------------------------------------------------------
def make_sink(dest: str, gen: int, codec: CodecRecord, shard_bytes: int, job_tags: dict | None = None):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class ShardSink(Datasink):
        """Writes each write task's code rows into one staged shard; collects the info rows."""

        def __init__(self):
            self.results: list[dict] = []

        @property
        def min_bytes_per_write(self) -> int:
            return shard_bytes  # bundle small blocks: one shard per ~shard_bytes, not one per input

        def write(self, blocks, ctx) -> dict:
            rel = archive.shard_relpath(gen, ctx.task_idx)
            url = storage.join(archive.staging_dir(dest, gen), rel.rsplit("/", 1)[1])
            writer = None
            infos, seqs, nbytes = [], {}, {}
            for block in blocks:
                for row in BlockAccessor.for_block(block).to_arrow().to_pylist():
                    if row["kind"] == "info":
                        infos.append(json.loads(row["info"]))
                        continue
                    if writer is None:
                        writer = archive.ShardWriter(url, codec)
                    fid = row["file_id"]
                    writer.add({"file_id": fid, "seq": row["seq"], "frame_start": row["frame_start"],
                                "n_frames": row["n_frames"], "channels": row["channels"], "n_q": codec.n_q,
                                "codes": row["payload"], "gains": row["gains"] or None})
                    seqs.setdefault(fid, []).append(row["seq"])
                    nbytes[fid] = nbytes.get(fid, 0) + len(row["payload"]) + len(row["gains"] or b"")
            out = {"shard": None, "where": {}, "seqs": seqs, "codes_bytes": nbytes, "shard_bytes": 0,
                   "infos": infos}
            if writer is not None:
                writer.close()
                out.update(shard=rel, where=writer.where, shard_bytes=storage.size(url))
            em = metrics.Emitter(job_tags)
            em.inc("audioarc_files_out", sum(1 for i in infos if i["status"] == ARCHIVED), stage="write")
            em.inc("audioarc_bytes_written", out["shard_bytes"])
            return out

        def on_write_complete(self, write_result) -> None:
            self.results = list(write_result.write_returns)

    return ShardSink()


# -- ray ------------------------------------------------------------------------------------------
def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local single node on loopback."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"include_dashboard": False, "log_to_driver": bool(os.environ.get("AUDIOARC_RAY_LOGS")),
              "logging_level": "WARNING"}
    # workers (possibly on other machines) must reach the same object store with the same credentials;
    # the values travel in the runtime env and are never printed
    env = {k: os.environ[k] for k in storage.STORAGE_ENV_VARS if os.environ.get(k)}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if addr == "local":
        kwargs["_node_ip_address"] = "127.0.0.1"
        if os.environ.get("AUDIOARC_RAY_METRICS_PORT"):  # fixed metrics export port (see dashboards/README.md)
            kwargs["_metrics_export_port"] = int(os.environ["AUDIOARC_RAY_METRICS_PORT"])
    from .cluster import driver_kwargs
    extra = driver_kwargs(addr)  # ship the package to the cluster's workers (runtime env)
    if "runtime_env" in extra and "runtime_env" in kwargs:  # keep both: shipped code and storage env vars
        rt = dict(extra.pop("runtime_env"))
        rt["env_vars"] = {**rt.get("env_vars", {}), **kwargs["runtime_env"]["env_vars"]}
        kwargs["runtime_env"] = rt
    kwargs.update(extra)
    ray.init(address=addr, **kwargs)
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


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


def prepare_archive(cfg: EncodeConfig, codec) -> tuple[ArchiveRecord | None, CodecRecord, int]:
    """Check DEST against the codec and bitrate, remove an interrupted job's leftovers."""
    n_q = codec.n_q_for_kbps(cfg.bitrate_kbps)
    rec = codec.record(n_q)
    storage.check_bucket(cfg.dest)
    storage.check_bucket(cfg.input_list or cfg.src)
    existing = archive.read_record(cfg.dest)
    if existing is not None:
        old = existing.codec
        if (old.name, old.checkpoint_hash) != (rec.name, rec.checkpoint_hash):
            raise CodecMismatchError(
                f"{cfg.dest}: archive was made by codec {old.name!r} (checkpoint {old.checkpoint_hash}); "
                f"this job uses {rec.name!r} ({rec.checkpoint_hash}). Use --codec {old.name} with its weights "
                f"to add to it, or choose a new DEST")
        if old.n_q != rec.n_q:
            raise ConfigError(f"{cfg.dest}: archive is at {old.kbps_per_channel:g} kbps; this job asks for "
                              f"{cfg.bitrate_kbps:g} kbps. Use --bitrate {old.kbps_per_channel:g} or a new DEST")
    for url in archive.garbage(cfg.dest, existing):
        storage.remove(url, recursive=True)
    return existing, rec, n_q


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


def _with_archive_weights(cfg: EncodeConfig) -> EncodeConfig:
    """Adding to an archive made with an earlier shipped checkpoint of the same codec: use that checkpoint."""
    if cfg.codec_weights:
        return cfg
    try:
        existing = archive.read_record(cfg.dest)
    except (StorageError, ArchiveFormatError):
        return cfg  # prepare_archive reports it
    if existing is None or existing.codec.name != cfg.codec:
        return cfg
    path = registry.shipped_weights_for(existing.codec)
    if path is None or path == registry.spec(cfg.codec).default_weights:
        return cfg
    return replace(cfg, codec_weights=str(path))


def _run_encode(cfg: EncodeConfig, on_progress, job_id: str, dm: "metrics.DriverMetrics | None") -> EncodeSummary:
    t0 = time.time()
    cfg = _with_archive_weights(cfg)
    codec = registry.load(cfg.codec, cfg.codec_weights)
    existing, crec, n_q = prepare_archive(cfg, codec)
    geom = CodecGeometry.of(codec)
    seg = codec.segment_frames  # windows hold whole segments of segment codecs
    window_frames = max(seg, -(-int(round(cfg.window_seconds * codec.frame_rate)) // seg) * seg)
    manifest = archive.read_manifest(cfg.dest, existing) if existing else {}
    init_ray(cfg.address)
    import ray
    if dm is not None:  # Prometheus file_sd entries in the Ray session dir (see dashboards/README.md)
        from .monitor import advertise
        dm.advertised = advertise(dm.url, job_id)

    plan = placement.plan_actors(ray.cluster_resources(), cfg.actors, cfg.gpus_per_actor, cfg.min_actors,
                                 cfg.max_actors, cfg.windows_per_batch(), cfg.precision)
    progress = ray.remote(num_cpus=0)(Progress).remote()
    job_tags = {"job_id": job_id, "codec": crec.name, "bitrate": f"{cfg.bitrate_kbps:g}"} \
        if cfg.emit_metrics and metrics.enabled() else None

    def report(f: int, s: float) -> None:
        if on_progress:
            on_progress(f, files_total, s)
        if dm is not None:
            dm.progress(f, files_total, s, ray.get(progress.actors.remote()))

    generations = list(existing.generations) if existing else []
    created = existing.created_at if existing else archive.now()
    totals = _Totals()
    q = cfg.quality if cfg.quality is not None and cfg.quality.fraction > 0 else None
    sampler = StreamingSampler(q.fraction, q.seed) if q else None
    q_task = ray.remote(num_cpus=0.5)(quality_mod.evaluate) if q else None
    q_futures: list = []
    record = existing
    files_total = 0
    for wave in _batches(_list_inputs(cfg.src, cfg.input_list), cfg.commit_every):
        files_total += len(wave)
        gen = (max(generations) if generations else 0) + 1
        items = []
        for obj in wave:
            prev = manifest.get(obj.uri)
            prev_hash = prev.content_hash if prev is not None and prev.status == ARCHIVED else ""
            items.append({"source": obj.uri, "file_id": file_id_for(obj.uri), "size": obj.size,
                          "prev_hash": prev_hash})
        sink = make_sink(cfg.dest, gen, crec, int(cfg.shard_mb * (1 << 20)), job_tags)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(decode_file,
                         fn_kwargs={"geom": geom, "window_frames": window_frames, "job_tags": job_tags},
                         num_cpus=0.5)
        ds = ds.map_batches(
            CodecActor, batch_size=plan.batch_windows, batch_format="numpy",
            fn_constructor_kwargs={"codec": cfg.codec, "weights": cfg.codec_weights,
                                   "checkpoint_hash": crec.checkpoint_hash, "n_q": n_q, "device": plan.device,
                                   "threads": cfg.threads_per_actor, "progress": progress,
                                   "job_tags": job_tags, "precision": plan.precision},
            compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
            **plan.remote_args())
        done = threading.Event()
        err: list[BaseException] = []

        def run():
            try:
                ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver thread
                err.append(e)
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        while not done.wait(0.5):
            if on_progress or dm is not None:
                report(*ray.get(progress.get.remote()))
        if err:
            raise err[0]
        entries = _commit_generation(cfg, gen, crec, items, sink.results)
        written = {e.source for e in entries}
        for e in entries:
            totals.add(e, skipped=False)
        n_skipped = 0
        for it in items:  # skipped files keep their committed entry
            if it["source"] not in written:
                totals.add(manifest[it["source"]], skipped=True)
                n_skipped += 1
        if dm is not None:
            dm.committed(entries, skipped=n_skipped)
        if any(e.generation == gen for e in entries):
            generations.append(gen)
            record = ArchiveRecord(archive.FORMAT_NAME, archive.FORMAT_VERSION, crec, tuple(generations), created,
                                   archive.now())
            archive.write_record(cfg.dest, record)
            if sampler:  # sample this generation's files now, while the next one encodes
                q_futures += [q_task.remote(cfg.dest, record, e, q, weights=cfg.codec_weights)
                              for e in entries if sampler.offer(e)]
        if on_progress or dm is not None:
            report(*ray.get(progress.get.remote()))
    if files_total == 0:
        raise ConfigError(f"{cfg.src}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    if not generations:  # first job on this DEST: commit an empty record so the archive exists
        archive.write_record(cfg.dest, ArchiveRecord(archive.FORMAT_NAME, archive.FORMAT_VERSION, crec, (),
                                                     created, archive.now()))
    quality_result = None
    if sampler:
        q_futures += [q_task.remote(cfg.dest, record, e, q, weights=cfg.codec_weights) for e in sampler.leftovers()]
        if q_futures:
            rows = ray.get(q_futures)
            quality_result = quality_mod.finish(cfg.dest, job_id, rows, q, {
                "archive": cfg.dest, "codec": crec.name, "bitrate_kbps": crec.kbps_per_channel,
                "files in job": files_total})
    summary = summarize(cfg, crec, totals, time.time() - t0)
    summary.placement = dict(plan.to_json(), nodes=ray.get(progress.by_node.remote()))
    if quality_result is not None:
        if dm is not None:
            dm.quality(quality_result.summary)
        summary.quality = {"summary": quality_result.summary, "violations": quality_result.violations,
                           "table": quality_result.table, "report": quality_result.report}
    summary.job_id = job_id
    summary.report = storage.join(cfg.dest, "reports", f"encode-{archive.now().replace(':', '')}.json")
    storage.write_bytes(summary.report, (json.dumps(summary.to_json(), indent=2) + "\n").encode())
    return summary


MOVE_THREADS = 16  # concurrent staging -> final shard moves (on S3 each is a CopyObject + DeleteObject)


def _move_all(moves: list[tuple[str, str]]) -> None:
    """Move staged shards to their final names, concurrently: on an object store a move is two requests
    of tens of milliseconds (more for a server-side copy of a 64 MiB shard), so a serial loop would put
    hours of round trips between generations at library scale (deploy/SCALING.md). Every move is
    idempotent, so the first failure is raised and a re-run of the job finishes the rest."""
    if not moves:
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(MOVE_THREADS, len(moves)), thread_name_prefix="shard-move") as ex:
        for f in [ex.submit(storage.move, src, dst) for src, dst in moves]:
            f.result()


def _commit_generation(cfg: EncodeConfig, gen: int, crec: CodecRecord, items: list[dict], results: list[dict]
                       ) -> list[ManifestEntry]:
    """Move staged shards into place and write this generation's manifest rows (not yet the record)."""
    infos: dict[str, dict] = {}
    where: dict[int, list[Location]] = {}
    seqs: dict[int, set[int]] = {}
    codes_bytes: dict[int, int] = {}
    moves: list[tuple[str, str]] = []
    for r in results:
        for info in r["infos"]:
            infos[info["source"]] = info
        if r["shard"] is None:
            continue
        total_codes = sum(r["codes_bytes"].values()) or 1
        for fid, groups in r["where"].items():
            where.setdefault(fid, []).extend(Location(r["shard"], g) for g in groups)
        for fid, s in r["seqs"].items():
            seqs.setdefault(fid, set()).update(s)
        for fid, b in r["codes_bytes"].items():
            # the shard's bytes on disk, shared out in proportion to the codes each file put there
            codes_bytes[fid] = codes_bytes.get(fid, 0) + int(round(r["shard_bytes"] * b / total_codes))
        staged = storage.join(archive.staging_dir(cfg.dest, gen), r["shard"].rsplit("/", 1)[1])
        moves.append((staged, storage.join(cfg.dest, r["shard"])))
    _move_all(moves)
    storage.remove(archive.staging_dir(cfg.dest, gen), recursive=True)
    stamp = archive.now()
    entries = []
    for it in items:
        uri, fid = it["source"], it["file_id"]
        info = infos.get(uri)
        size = it["size"] if it["size"] >= 0 else int((info or {}).get("size", -1))
        base = {"source": uri, "relpath": storage.relpath(cfg.src, uri), "file_id": fid, "size": max(size, 0),
                "generation": gen, "encoded_at": stamp}
        if info is None:
            entries.append(ManifestEntry(content_hash="", status=FAILED,
                                         reason=f"{uri}: no result came back from the workers (task lost); "
                                                f"re-run the job to retry it", **base))
            continue
        if info["status"] == "skipped":
            continue
        if info["status"] == ARCHIVED:
            n_windows = info["n_windows"]
            if seqs.get(fid, set()) != set(range(n_windows)):
                info = dict(info, status=FAILED, reason=f"{uri}: only {len(seqs.get(fid, ()))} of {n_windows} "
                                                        f"code windows were written; re-run the job")
        if info["status"] != ARCHIVED:
            entries.append(ManifestEntry(content_hash=info.get("content_hash", ""), status=FAILED,
                                         reason=info["reason"], sample_rate=info.get("sample_rate", 0),
                                         channels=info.get("channels", 0), **base))
            continue
        entries.append(ManifestEntry(
            content_hash=info["content_hash"], status=ARCHIVED, duration_s=info["duration_s"],
            sample_rate=info["sample_rate"], channels=info["channels"], frames=info["frames"],
            codec_samples=info["codec_samples"], codec_frames=info["codec_frames"], n_windows=info["n_windows"],
            archive_bytes=codes_bytes.get(fid, 0),
            locations=tuple(sorted(set(where.get(fid, [])), key=lambda loc: (loc.shard, loc.row_group))),
            **base))
    if entries:
        # conditional create: two jobs racing for the same generation cannot both commit it
        archive.write_manifest(storage.join(cfg.dest, archive.manifest_relpath(gen)), entries, exclusive=True)
    return entries


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