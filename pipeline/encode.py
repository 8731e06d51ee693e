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

from . import archive, audio, placement, storage
from . import quality as quality_mod
from .codec import registry
from .codec.windows import CodecGeometry, Windower
from .errors import AudioarcError, CodecMismatchError, ConfigError, InputError, StorageError
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
    actors: int | None = None  # codec actors; default: 1 per GPU, else max(1, CPUs // 2)
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    threads_per_actor: int = 1  # torch threads in each CPU codec actor
    batch_windows: int | None = None  # windows per codec forward pass; default 4 on CPU, 64 on GPU
    min_actors: int | None = None  # autoscaling pool bounds (ActorPoolStrategy); default: --actors or 1
    max_actors: int | None = None  # ... default: --actors, else 1 per GPU slot or CPUs // 2
    precision: str = "fp32"  # GPU autocast: fp32 | bf16 | fp16 (check fidelity first: jobs/bench_codec.py)
    commit_every: int = 500  # files per committed generation (resume granularity)
    address: str | None = None
    quality: "QualityConfig | None" = None  # quality sampling beside the encode; None = off

    def validate(self) -> "EncodeConfig":
        if self.bitrate_kbps <= 0:
            raise ConfigError(f"--bitrate must be positive, got {self.bitrate_kbps}")
        if not 1.0 <= self.window_seconds <= 600:
            raise ConfigError(f"--window-seconds must be in [1, 600], got {self.window_seconds}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError("--actors must be >= 1")
        if self.commit_every < 1:
            raise ConfigError("--commit-every must be >= 1")
        if self.batch_windows is not None and self.batch_windows < 1:
            raise ConfigError("--batch-windows must be >= 1")
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
    placement: dict | None = None  # codec actor plan + per node {actors, windows, seconds} that really ran

    def to_json(self) -> dict:
        return asdict(self)


def file_id_for(uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(uri.encode(), digest_size=8).digest(), "big", signed=True)


# -- rows flowing through the pipeline ------------------------------------------------------------
# every row has the same columns; kind is "win" (a window: payload = float32 samples, later packed codes)
# or "info" (one per input, at its end: info = JSON of what is known about the file).
def _row(kind: str, file_id: int, seq: int = 0, frame_start: int = 0, n_frames: int = 0, channels: int = 0,
         payload: bytes = b"", info: str = "") -> dict:
    return {"kind": kind, "file_id": file_id, "seq": seq, "frame_start": frame_start, "n_frames": n_frames,
            "channels": channels, "payload": payload, "info": info}


def decode_file(item: dict, geom: CodecGeometry, window_frames: int, block_frames: int = 1 << 16
                ) -> Iterator[dict]:
    """One input -> its windows at the codec rate (bounded memory), then one info row.

    Never raises for a bad input: the failure goes into the info row.
    """
    uri, fid = item["source"], item["file_id"]
    info: dict = {"source": uri, "status": FAILED, "reason": "", "content_hash": "", "size": item["size"]}
    try:
        with storage.open_input(uri) as (f, digest):
            info["content_hash"] = digest
            if item["prev_hash"] and digest == item["prev_hash"]:
                info["status"] = "skipped"
                yield _row("info", fid, info=json.dumps(info))
                return
            if item["size"] == 0:
                raise InputError(f"{uri}: empty file (0 bytes); remove it or replace it with the real recording")
            ai = audio.probe(f, uri)
            info.update(sample_rate=ai.sample_rate, channels=ai.channels)
            res = audio.Resampler(ai.sample_rate, geom.sample_rate, ai.channels)
            win = Windower(geom, window_frames, ai.channels)
            frames = 0

            def rows(ws):
                for w in ws:
                    yield _row("win", fid, w.seq, w.start, w.stop - w.start, ai.channels, w.samples.tobytes())

            for block in audio.read_blocks(f, uri, block_frames):
                frames += block.shape[1]
                yield from rows(win.push(res.process(block)))
            if frames == 0:
                raise InputError(f"{uri}: zero-length audio (the file has a header but no samples)")
            yield from rows(win.push(res.flush()))
            yield from rows(win.finish())
            info.update(status=ARCHIVED, frames=frames, duration_s=frames / ai.sample_rate,
                        codec_samples=win.total, codec_frames=win.next_frame, n_windows=win.seq)
    except (InputError, StorageError) as e:
        info["reason"] = str(e)
    except Exception as e:  # noqa: BLE001 - anything else is recorded against the file, not fatal
        info["reason"] = f"{uri}: unexpected {type(e).__name__} while decoding: {e}"
    yield _row("info", fid, info=json.dumps(info))


class CodecActor:
    """Loads the codec once; encodes batches of windows. Info rows pass through."""

    def __init__(self, codec: str, weights: str | None, checkpoint_hash: str, n_q: int, device: str,
                 threads: int, progress=None, precision: str = "fp32"):
        import torch

        from .placement import resolve_device
        device = resolve_device(device)
        if device == "cpu":
            torch.set_num_threads(threads)
        self.torch = torch
        self.precision = precision
        try:
            import ray
            rc = ray.get_runtime_context()
            self.node_id, self.actor_id = rc.get_node_id(), rc.get_actor_id()
        except Exception:  # noqa: BLE001 - outside Ray (unit use)
            self.node_id = self.actor_id = None
        self.codec = registry.load(codec, weights, device=device)
        if self.codec.checkpoint_hash() != checkpoint_hash:
            raise CodecMismatchError(f"codec actor loaded checkpoint {self.codec.checkpoint_hash()}, "
                                     f"driver expected {checkpoint_hash}")
        self.n_q, self.device = n_q, device
        self.bits = archive.bits_for(self.codec.codebook_size)
        self.ctx = sum(self.codec.encode_context)
        self.hop = self.codec.hop_length
        self.progress = progress

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        payload = list(batch["payload"])
        info = list(batch["info"])
        kinds = batch["kind"]
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(kinds):
            if k == "win":
                groups.setdefault(int(batch["n_frames"][i]), []).append(i)
        seconds = 0.0
        for n_frames, idx in groups.items():
            chans = [int(batch["channels"][i]) for i in idx]
            length = n_frames * self.hop + self.ctx
            x = np.concatenate([np.frombuffer(payload[i], np.float32).reshape(c, length)
                                for i, c in zip(idx, chans)])
            with torch.inference_mode(), placement.autocast(self.device, self.precision):
                wav = placement.to_device(x, self.device)[:, None, :]
                codes = self.codec.encode(wav, self.n_q).cpu().numpy()
            off = 0
            for i, c in zip(idx, chans):
                payload[i] = archive.pack_codes(codes[off:off + c], self.bits)
                off += c
            seconds += len(idx) * n_frames * self.hop / self.codec.sample_rate
        if self.progress is not None:
            files = sum(1 for k in kinds if k == "info")
            self.progress.add.remote(files=files, seconds=seconds, node=self.node_id, actor=self.actor_id,
                                     windows=sum(len(v) for v in groups.values()))
        out = dict(batch)
        out["payload"] = np.array(payload, dtype=object)
        out["info"] = np.array(info, dtype=object)
        return out


# -- progress -------------------------------------------------------------------------------------
class Progress:
    """Counters the codec actors report to (a Ray actor); the driver polls it for the progress bar."""

    def __init__(self):
        self.files = 0
        self.seconds = 0.0
        self.nodes: dict[str, dict] = {}  # node id -> {"actors": set, "windows": n, "seconds": s}

    def add(self, files: int = 0, seconds: float = 0.0, node: str | None = None, actor: str | None = None,
            windows: int = 0) -> None:
        self.files += files
        self.seconds += seconds
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


# -- shards ---------------------------------------------------------------------------------------
def make_sink(dest: str, gen: int, codec: CodecRecord):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class ShardSink(Datasink):
        """Writes each write task's code rows into one staged shard; collects the info rows."""

        def __init__(self):
            self.results: list[dict] = []

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
                                "codes": row["payload"]})
                    seqs.setdefault(fid, []).append(row["seq"])
                    nbytes[fid] = nbytes.get(fid, 0) + len(row["payload"])
            out = {"shard": None, "where": {}, "seqs": seqs, "codes_bytes": nbytes, "shard_bytes": 0,
                   "infos": infos}
            if writer is not None:
                writer.close()
                out.update(shard=rel, where=writer.where, shard_bytes=storage.fs_and_path(url)[0].size(
                    storage.fs_and_path(url)[1]))
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
    if addr == "local":
        kwargs["_node_ip_address"] = "127.0.0.1"
    from .cluster import driver_kwargs
    kwargs.update(driver_kwargs(addr))  # ship the package to the cluster's workers (runtime env)
    ray.init(address=addr, **kwargs)
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# -- the job --------------------------------------------------------------------------------------
def _list_inputs(src: str) -> Iterator[storage.ObjectInfo]:
    yield from storage.walk_files(src, AUDIO_EXTENSIONS)


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
    rec = CodecRecord(codec.name, codec.version, codec.checkpoint_hash(), codec.sample_rate, codec.hop_length,
                      codec.codebook_size, n_q, round(codec.kbps(n_q), 4))
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


def run_encode(cfg: EncodeConfig, on_progress: Callable[[int, int, float], None] | None = None) -> EncodeSummary:
    """Run the whole job; ``on_progress(files_done, files_total_so_far, audio_seconds)`` while it runs."""
    cfg.validate()
    t0 = time.time()
    codec = registry.load(cfg.codec, cfg.codec_weights)
    existing, crec, n_q = prepare_archive(cfg, codec)
    geom = CodecGeometry.of(codec)
    window_frames = max(1, int(round(cfg.window_seconds * codec.frame_rate)))
    manifest = archive.read_manifest(cfg.dest, existing) if existing else {}
    init_ray(cfg.address)
    import ray

    plan = placement.plan_actors(ray.cluster_resources(), cfg.actors, cfg.gpus_per_actor, cfg.min_actors,
                                 cfg.max_actors, cfg.batch_windows, cfg.precision)
    progress = ray.remote(num_cpus=0)(Progress).remote()

    generations = list(existing.generations) if existing else []
    created = existing.created_at if existing else archive.now()
    seen: dict[str, ManifestEntry] = {}
    skipped: set[str] = set()
    q = cfg.quality if cfg.quality is not None and cfg.quality.fraction > 0 else None
    sampler = StreamingSampler(q.fraction, q.seed) if q else None
    q_task = ray.remote(num_cpus=0.5)(quality_mod.evaluate) if q else None
    q_futures: list = []
    record = existing
    files_total = 0
    for wave in _batches(_list_inputs(cfg.src), cfg.commit_every):
        files_total += len(wave)
        gen = (max(generations) if generations else 0) + 1
        items = []
        for obj in wave:
            prev = manifest.get(obj.uri)
            prev_hash = prev.content_hash if prev is not None and prev.status == ARCHIVED else ""
            items.append({"source": obj.uri, "file_id": file_id_for(obj.uri), "size": obj.size,
                          "prev_hash": prev_hash})
        sink = make_sink(cfg.dest, gen, crec)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(decode_file, fn_kwargs={"geom": geom, "window_frames": window_frames},
                         num_cpus=0.5)
        ds = ds.map_batches(
            CodecActor, batch_size=plan.batch_windows, batch_format="numpy",
            fn_constructor_kwargs={"codec": cfg.codec, "weights": cfg.codec_weights,
                                   "checkpoint_hash": crec.checkpoint_hash, "n_q": n_q, "device": plan.device,
                                   "threads": cfg.threads_per_actor, "progress": progress,
                                   "precision": plan.precision},
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
            if on_progress:
                f, s = ray.get(progress.get.remote())
                on_progress(f, files_total, s)
        if err:
            raise err[0]
        entries = _commit_generation(cfg, gen, crec, items, sink.results)
        seen.update({e.source: e for e in entries})
        for it in items:  # skipped files keep their committed entry
            if it["source"] not in seen:
                seen[it["source"]] = manifest[it["source"]]
                skipped.add(it["source"])
        if any(e.generation == gen for e in entries):
            generations.append(gen)
            record = ArchiveRecord(archive.FORMAT_NAME, archive.FORMAT_VERSION, crec, tuple(generations), created,
                                   archive.now())
            archive.write_record(cfg.dest, record)
            if sampler:  # sample this generation's files now, while the next one encodes
                q_futures += [q_task.remote(cfg.dest, record, e, q) for e in entries if sampler.offer(e)]
        if on_progress:
            f, s = ray.get(progress.get.remote())
            on_progress(f, files_total, s)
    if files_total == 0:
        raise ConfigError(f"{cfg.src}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    if not generations:  # first job on this DEST: commit an empty record so the archive exists
        archive.write_record(cfg.dest, ArchiveRecord(archive.FORMAT_NAME, archive.FORMAT_VERSION, crec, (),
                                                     created, archive.now()))
    quality_result = None
    if sampler:
        q_futures += [q_task.remote(cfg.dest, record, e, q) for e in sampler.leftovers()]
        if q_futures:
            rows = ray.get(q_futures)
            job_id = f"encode-{archive.now().replace(':', '')}"
            quality_result = quality_mod.finish(cfg.dest, job_id, rows, q, {
                "archive": cfg.dest, "codec": crec.name, "bitrate_kbps": crec.kbps_per_channel,
                "files in job": files_total})
    summary = summarize(cfg, crec, list(seen.values()), skipped, time.time() - t0)
    summary.placement = dict(plan.to_json(), nodes=ray.get(progress.by_node.remote()))
    if quality_result is not None:
        summary.quality = {"summary": quality_result.summary, "violations": quality_result.violations,
                           "table": quality_result.table, "report": quality_result.report}
    summary.report = storage.join(cfg.dest, "reports", f"encode-{archive.now().replace(':', '')}.json")
    storage.write_bytes(summary.report, (json.dumps(summary.to_json(), indent=2) + "\n").encode())
    return summary


def _commit_generation(cfg: EncodeConfig, gen: int, crec: CodecRecord, items: list[dict], results: list[dict]
                       ) -> list[ManifestEntry]:
    """Move staged shards into place and write this generation's manifest rows (not yet the record)."""
    infos: dict[str, dict] = {}
    where: dict[int, list[Location]] = {}
    seqs: dict[int, set[int]] = {}
    codes_bytes: dict[int, int] = {}
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
        storage.move(staged, storage.join(cfg.dest, r["shard"]))
    storage.remove(archive.staging_dir(cfg.dest, gen), recursive=True)
    stamp = archive.now()
    entries = []
    for it in items:
        uri, fid = it["source"], it["file_id"]
        info = infos.get(uri)
        base = {"source": uri, "relpath": storage.relpath(cfg.src, uri), "file_id": fid, "size": it["size"],
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
        archive.write_manifest(storage.join(cfg.dest, archive.manifest_relpath(gen)), entries)
    return entries


def summarize(cfg: EncodeConfig, crec: CodecRecord, entries: list[ManifestEntry], skipped: set[str],
              wall: float) -> EncodeSummary:
    """Job summary over every input of the job; x_realtime counts only audio encoded by this run."""
    ok = [e for e in entries if e.status == ARCHIVED]
    failed = [e for e in entries if e.status != ARCHIVED]
    audio_s = sum(e.duration_s for e in ok)
    encoded_s = sum(e.duration_s for e in ok if e.source not in skipped)
    src_bytes = sum(e.size for e in ok)
    arc_bytes = sum(e.archive_bytes for e in ok)
    pcm = sum(e.frames * e.channels * 2 for e in ok)
    return EncodeSummary(
        archive=cfg.dest, generation=max([e.generation for e in entries], default=0), files_total=len(entries),
        files_archived=len(ok), files_skipped=len(skipped), files_failed=len(failed), audio_seconds=round(audio_s, 3),
        source_bytes=src_bytes, pcm_bytes=pcm, archive_bytes=arc_bytes, codec=crec.name,
        bitrate_kbps=crec.kbps_per_channel,
        effective_kbps=round(arc_bytes * 8 / audio_s / 1000, 4) if audio_s else 0.0,
        compression_ratio=round(src_bytes / arc_bytes, 2) if arc_bytes else 0.0,
        pcm_compression_ratio=round(pcm / arc_bytes, 2) if arc_bytes else 0.0,
        wall_seconds=round(wall, 2), x_realtime=round(encoded_s / wall, 2) if wall else 0.0,
        failures=[{"source": e.source, "reason": e.reason} for e in failed])
