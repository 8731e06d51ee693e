"""The encode job: list, plan against the catalog, stream through an executor, commit, summarize."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable


from .. import archive, storage, telemetry
from ..audio import AUDIO_EXTENSIONS
from .. import quality as quality_mod
from ..codec import registry
from ..errors import ArchiveFormatError, CodecMismatchError, ConfigError, StorageError
from ..manifest import ARCHIVED, ArchiveRecord, CodecRecord, ManifestEntry
from ..quality import StreamingSampler
from .assemble import LOOKUP_BATCH, STREAM_CHUNK, _Assembler
from .config import EncodeConfig, EncodeSummary
from .executors import _Runtime, choose_executor
from .inputs import _batches, _chain_first, _list_inputs, _peek, file_id_for
from .stages import WINDOW, FileInfo, timed_iter


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
        dm = telemetry.DriverMetrics(job_id, cfg.codec, cfg.bitrate_kbps, cfg.src, cfg.dest)
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


def _run_encode(cfg: EncodeConfig, on_progress, job_id: str, dm: "telemetry.DriverMetrics | None") -> EncodeSummary:
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
    geom = codec.info()  # what the decode stage needs of the codec (no model)
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
                             actor_weights, lease, loaded=codec)
    finally:
        try:
            archive.collect_garbage(cfg.dest, own_job=job_id)  # this job's uncommitted shards, if it failed
        finally:
            lease.release()


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


def _encode_waves(cfg, job_id, dm, on_progress, t0, inputs, record, crec, n_q, geom, window_frames, actor_weights,
                  lease, loaded=None) -> EncodeSummary:
    """One streaming pipeline per chunk of inputs (decode tasks -> codec actors -> the driver, which writes the
    shards and commits a generation every ``commit_every`` completed files: a generation boundary costs a shard
    close and one catalog append, not a new actor pool)."""
    current = archive.Archive(cfg.dest, record)
    asm = _Assembler(cfg, crec, job_id, lease, archive.commit.highest_claimed(cfg.dest))
    executor = choose_executor(cfg)
    job_tags = {"job_id": job_id, "codec": crec.name, "bitrate": f"{cfg.bitrate_kbps:g}"} \
        if cfg.emit_metrics and telemetry.enabled() and executor == "ray" else None  # (Ray's metrics: Ray only)
    q = cfg.quality if cfg.quality is not None and cfg.quality.fraction > 0 else None
    rt = _Runtime(cfg, job_id, dm, q, executor, loaded=loaded if executor == "local" else None)
    sampler = StreamingSampler(q.fraction, q.seed, q.min_files) if q else None
    q_futures: list = []
    totals = _Totals()
    counts = {"files": 0, "unchanged": 0, "unchanged_s": 0.0}
    generations: set[int] = set()
    em = telemetry.Emitter(job_tags)
    clock = time.perf_counter
    spent = dict.fromkeys(DRIVER_STAGES, 0.0)  # the driver's own time by stage
    decoded = dict.fromkeys(DECODE_STAGES, 0.0)  # summed over decode tasks (from each file's info row)

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
        for wave in timed_iter(_batches(inputs, LOOKUP_BATCH), spent, "listing_and_planning"):
            counts["files"] += len(wave)
            t = clock()
            items, unchanged, prev = _plan_wave(cfg, current, wave)
            spent["listing_and_planning"] += clock() - t
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
        stream = rt.stream(rows, geom, window_frames, job_tags, crec, actor_weights, n_q)
        for batch in timed_iter(stream, spent, "waiting_for_codes"):
            t = clock()
            kinds = batch["kind"]
            written = 0
            for i in range(len(kinds)):
                fid = int(batch["file_id"][i])
                if kinds[i] == WINDOW:
                    codes = batch["payload"][i]
                    gains = batch["gains"][i] or None
                    asm.add_window(fid, {"file_id": fid, "seq": int(batch["seq"][i]),
                                         "frame_start": int(batch["frame_start"][i]),
                                         "n_frames": int(batch["n_frames"][i]), "channels": int(batch["channels"][i]),
                                         "n_q": crec.n_q, "codes": codes, "gains": gains})
                    written += len(codes) + len(gains or b"")
                else:
                    info = FileInfo.from_json(batch["info"][i])
                    for k, v in info.stage_s.items():
                        decoded[k] = decoded.get(k, 0.0) + v
                    asm.add_info(fid, info)
            em.inc("audioarc_bytes_written", written)
            spent["shard_write"] += clock() - t
            if asm.pending() >= cfg.commit_every:
                t = clock()
                committed(asm.commit())
                spent["commit"] += clock() - t
            if time.monotonic() - last > 0.5:
                report()
                last = time.monotonic()
        t = clock()
        committed(asm.commit(lost=True))  # the chunk is through: its last files, and any the stream lost
        spent["commit"] += clock() - t
        report()
    quality_result = None
    if sampler:
        left = list(sampler.leftovers())
        q_futures += [rt.quality(cfg.dest, record, e, q, cfg.codec_weights) for e in left]
        if q_futures:
            t = clock()
            rows = rt.gather(q_futures)
            spent["quality"] += clock() - t
            quality_result = quality_mod.finish(cfg.dest, job_id, rows, q, {
                "archive": cfg.dest, "codec": crec.name, "checkpoint": crec.checkpoint_hash,
                "bitrate_kbps": crec.kbps_per_channel,
                "effective_kbps": round(totals.archive_bytes * 8 / totals.audio_s / 1000, 3) if totals.audio_s else None,
                "files in job": counts["files"], "files_failed": totals.failed},
                files_archived=totals.archived - totals.skipped)  # the files this run encoded: the sample's population
    summary = summarize(cfg, crec, totals, time.time() - t0)
    summary.placement = rt.placement()
    summary.stage_seconds = stage_seconds(executor, decoded, rt.ask("stages", {}), spent, time.time() - t0)
    if quality_result is not None:
        if dm is not None:
            dm.quality(quality_result.summary)
        summary.quality = {"summary": quality_result.summary, "violations": quality_result.violations,
                           "table": quality_result.table, "report": quality_result.report}
    summary.job_id = job_id
    summary.report = storage.join(cfg.dest, "reports", f"encode-{job_id}.json")
    storage.write_bytes(summary.report, (json.dumps(summary.to_json(), indent=2) + "\n").encode())
    return summary


DECODE_STAGES = ("fetch", "decode", "resample", "windowing")  # in decode tasks / threads, summed over files
CODEC_STAGES = ("codec_forward", "packing")  # in codec actors, summed
DRIVER_STAGES = ("listing_and_planning", "waiting_for_codes", "shard_write", "commit", "quality")


def stage_seconds(executor: str, decoded: dict, codec: dict, driver: dict, wall: float) -> dict[str, float]:
    """Where a job's time went: decode-side stages summed over files, codec stages summed over actors, the driver's
    own stages, and ``idle``: in-process, the time the codec threads waited for decoded windows (summed over
    them); under Ray, the driver's wait for codes. Stages run at once in different threads or
    processes, so they do not add up to ``wall``."""
    out = {k: decoded.get(k, 0.0) for k in DECODE_STAGES}
    out.update({k: codec.get(k, 0.0) for k in CODEC_STAGES})
    out.update({k: driver.get(k, 0.0) for k in DRIVER_STAGES})
    wait = out.pop("waiting_for_codes")
    out["idle"] = codec.get("idle", 0.0) if executor == "local" else wait
    out["wall"] = wall
    return {k: round(v, 3) for k, v in out.items()}


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
