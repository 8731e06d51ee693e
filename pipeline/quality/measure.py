"""Quality measurement: seeded stratified sampling, fidelity metrics, the results table, ``audioarc quality``."""
from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import archive, audio, storage
from ..codec.windows import Joiner
from ..errors import ConfigError
from ..manifest import ARCHIVED, ArchiveRecord, ManifestEntry
from .config import GATE_METRICS, Gate, QualityConfig

DURATION_BUCKETS = ((10, "<10s"), (60, "10s-1m"), (600, "1m-10m"), (3600, "10m-1h"), (math.inf, ">1h"))


# -- sampling -------------------------------------------------------------------------------------
def unit(seed: int, source: str) -> float:
    """Deterministic uniform number in [0, 1) for (seed, source)."""
    h = hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def stratum(e: ManifestEntry) -> str:
    """Strata: duration bucket, source folder, sample rate, channel count."""
    bucket = next(name for limit, name in DURATION_BUCKETS if e.duration_s < limit)
    folder = e.relpath.rsplit("/", 1)[0] if "/" in e.relpath else "."
    return f"{bucket}|{folder}|{e.sample_rate}Hz|{e.channels}ch"


class StreamingSampler:
    """Sampling while files are committed: each archived file is taken with probability ``fraction``
    (by its seeded hash, so the choice does not depend on order or timing); at the end every stratum
    still without a sample gets its lowest-hash file, and if fewer than ``min_files`` were taken the
    lowest-hash others make up the difference (a small job is measured whole). Reproducible for the same
    inputs and seed; memory: one entry per stratum plus ``min_files``."""

    def __init__(self, fraction: float, seed: int, min_files: int = 0):
        self.fraction, self.seed, self.min_files = fraction, seed, min_files
        self.covered: set[str] = set()
        self.best: dict[str, tuple[float, ManifestEntry]] = {}
        self.taken = 0
        self.low: list[tuple[float, str, ManifestEntry]] = []  # max-heap (by -u) of the min_files lowest untaken

    def offer(self, e: ManifestEntry) -> bool:
        if e.status != ARCHIVED or self.fraction <= 0:
            return False
        s, u = stratum(e), unit(self.seed, e.source)
        if u < self.fraction:
            self.covered.add(s)
            self.taken += 1
            return True
        if s not in self.best or u < self.best[s][0]:
            self.best[s] = (u, e)
        if self.min_files > 0:
            item = (-u, e.source, e)
            if len(self.low) < self.min_files:
                heapq.heappush(self.low, item)
            elif item[:2] > self.low[0][:2]:
                heapq.heapreplace(self.low, item)
        return False

    def leftovers(self) -> list[ManifestEntry]:
        out = [e for s, (_, e) in sorted(self.best.items()) if s not in self.covered]
        need = self.min_files - self.taken - len(out)
        if need > 0:
            have = {e.source for e in out}
            extra = [e for _, src, e in sorted(self.low, key=lambda t: (-t[0], t[1])) if src not in have]
            out += extra[:need]
        return out


def sample_manifest(entries: list[ManifestEntry], n: int, seed: int) -> list[ManifestEntry]:
    """Exactly ``min(n, archived)`` files, allocated to strata in proportion (largest remainder, every
    stratum at least one while n allows), lowest seeded hash first within a stratum."""
    ok = [e for e in entries if e.status == ARCHIVED]
    groups: dict[str, list[ManifestEntry]] = {}
    for e in ok:
        groups.setdefault(stratum(e), []).append(e)
    for g in groups.values():
        g.sort(key=lambda e: unit(seed, e.source))
    n = min(n, len(ok))
    names = sorted(groups, key=lambda s: (-len(groups[s]), s))
    alloc = {s: 0 for s in names}
    for s in names[:n]:  # one each, largest strata first
        alloc[s] = 1
    left = n - sum(alloc.values())
    if left > 0:
        quotas = {s: left * len(groups[s]) / len(ok) for s in names}
        for s in names:
            alloc[s] += min(int(quotas[s]), len(groups[s]) - alloc[s])
        left = n - sum(alloc.values())
        for s in sorted(names, key=lambda s: (-(quotas[s] - int(quotas[s])), s)):
            if left <= 0:
                break
            if alloc[s] < len(groups[s]):
                alloc[s] += 1
                left -= 1
        for s in names:  # anything still left goes wherever files remain
            take = min(left, len(groups[s]) - alloc[s])
            alloc[s] += take
            left -= take
    return sorted((e for s in names for e in groups[s][: alloc[s]]), key=lambda e: e.relpath)


# -- metrics --------------------------------------------------------------------------------------
def rolloff_hz(x: np.ndarray, rate: int, fraction: float = 0.995) -> float:
    """Frequency below which ``fraction`` of the energy of ``x: [C, T]`` lies (bandwidth proxy)."""
    from scipy.signal import welch
    if x.shape[1] < 256:
        return 0.0
    f, p = welch(x.mean(axis=0), fs=rate, nperseg=min(2048, x.shape[1]))
    c = np.cumsum(p)
    if c[-1] <= 0:
        return 0.0
    return float(f[np.searchsorted(c, fraction * c[-1])])


def loudness(x: np.ndarray, rate: int) -> float | None:
    """Integrated loudness (LUFS, ITU-R BS.1770 via pyloudnorm) of ``[C, T]``; None if too short/silent."""
    import pyloudnorm
    if x.shape[1] < int(0.4 * rate) + 1:
        return None
    v = pyloudnorm.Meter(rate).integrated_loudness(x.T.astype(np.float64))
    return None if not math.isfinite(v) else float(v)


def speech_like(x: np.ndarray, rate: int) -> bool:
    """Heuristic for STOI: most energy in the voice band and a syllabic (2-8 Hz) envelope modulation."""
    from scipy.signal import welch
    m = x.mean(axis=0)
    if m.size < rate or not np.any(m):
        return False
    f, p = welch(m, fs=rate, nperseg=1024)
    band = p[(f >= 100) & (f <= 4000)].sum() / max(p.sum(), 1e-20)
    hop = rate // 100
    env = np.sqrt(np.convolve(m ** 2, np.ones(hop) / hop, mode="valid")[::hop] + 1e-12)
    env = env - env.mean()
    spec = np.abs(np.fft.rfft(env)) ** 2
    freqs = np.fft.rfftfreq(env.size, d=0.01)
    syll = spec[(freqs >= 2) & (freqs <= 8)].sum() / max(spec[freqs > 0.5].sum(), 1e-20)
    return bool(band > 0.7 and syll > 0.25)


def compare(ref: np.ndarray, deg: np.ndarray, rate: int) -> dict:
    """Metrics of ``deg`` against ``ref`` (both ``[C, T]`` at ``rate``), at that rate and channel count."""
    from ..codec import metrics as M
    mel = float(np.mean([M.mel_distance(ref[c], deg[c], rate) for c in range(ref.shape[0])]))
    sdr = float(np.mean([M.si_sdr(ref[c], deg[c]) for c in range(ref.shape[0])]))
    l_ref, l_deg = loudness(ref, rate), loudness(deg, rate)
    clip_ref = float(np.mean(np.abs(ref) >= 0.999))
    clip_deg = float(np.mean(np.abs(deg) >= 0.999))
    bw_ref, bw_deg = rolloff_hz(ref, rate), rolloff_hz(deg, rate)
    return {
        "mel": mel, "si_sdr": sdr,
        "lufs_ref": l_ref, "lufs_diff": None if l_ref is None or l_deg is None else l_deg - l_ref,
        "lufs_diff_abs": None if l_ref is None or l_deg is None else abs(l_deg - l_ref),
        "clipping_added": max(0.0, clip_deg - clip_ref),
        "bandwidth_ref_hz": bw_ref, "bandwidth_hz": bw_deg,
        "bandwidth_ratio": bw_deg / bw_ref if bw_ref > 0 else None,
    }


def log_spectrogram(x: np.ndarray, rate: int, n_fft: int = 512, max_frames: int = 400) -> np.ndarray:
    """Small dB spectrogram ``[freq, time] float16`` of a mono mix, for the report's worst files."""
    from scipy.signal import stft
    m = x.mean(axis=0)
    if m.size < n_fft:
        m = np.pad(m, (0, n_fft - m.size))
    _, _, z = stft(m, fs=rate, nperseg=n_fft)
    s = 20 * np.log10(np.abs(z) + 1e-6)
    step = max(1, s.shape[1] // max_frames)
    return s[:, ::step].astype(np.float16)


def evaluate(dest: str, rec: ArchiveRecord, entry: ManifestEntry, cfg: QualityConfig, codec=None,
             weights: str | None = None) -> dict:
    """Decode ``entry`` from the archive (with ``codec``, else the archive's codec loaded with ``weights``)
    and compare an excerpt with its original. Never raises: a bad pair (original gone or unreadable now)
    gives a row with ``error`` set."""
    row = {"source": entry.source, "relpath": entry.relpath, "stratum": stratum(entry),
           "duration_s": entry.duration_s, "sample_rate": entry.sample_rate, "channels": entry.channels,
           "source_bytes": entry.size, "archive_bytes": entry.archive_bytes,
           "compression_ratio": entry.size / entry.archive_bytes if entry.archive_bytes else None,
           "pcm_compression_ratio": entry.frames * entry.channels * 2 / entry.archive_bytes
           if entry.archive_bytes else None, "error": ""}
    try:
        row.update(_measure(dest, rec, entry, cfg, codec, weights))
    except Exception as e:  # noqa: BLE001 - recorded against the file
        row["error"] = f"{entry.source}: {type(e).__name__}: {e}"
    return row


def _measure(dest: str, rec: ArchiveRecord, entry: ManifestEntry, cfg: QualityConfig, codec,
             weights: str | None = None) -> dict:
    import soundfile as sf

    from ..codec import metrics as M
    if codec is None:
        codec = archive.load_codec(dest, rec, weights)
    sr, cr = entry.sample_rate, codec.sample_rate
    n = entry.frames if cfg.excerpt_seconds <= 0 else min(entry.frames, int(cfg.excerpt_seconds * sr))
    s0 = (entry.frames - n) // 2
    with storage.open_input(entry.source) as (f, digest):
        if digest != entry.content_hash:
            raise ValueError("the original changed since it was archived (content hash differs)")
        with sf.SoundFile(f) as snd:
            snd.seek(s0)
            ref = snd.read(n, dtype="float32", always_2d=True).T
    # decode the file (bounded memory), keeping only the excerpt at the codec rate and at the source rate
    c0, c1 = int(round(s0 * cr / sr)), int(round((s0 + n) * cr / sr))
    joiner = Joiner(codec, entry.codec_samples, channels=entry.channels)
    res = audio.Resampler(cr, sr, entry.channels)
    at_codec, at_src = [], []
    pos_c = pos_s = 0

    def keep(block, pos, lo, hi, out):
        a, b = max(lo - pos, 0), min(hi - pos, block.shape[1])
        if b > a:
            out.append(block[:, a:b])
        return pos + block.shape[1]

    def blocks():
        for _, codes, gains in archive.read_file_windows(dest, entry, rec.codec):
            yield from joiner.feed(codes, gains)
        yield from joiner.finish()

    for blk in blocks():
        pos_c = keep(blk, pos_c, c0, c1, at_codec)
        pos_s = keep(res.process(blk), pos_s, s0, s0 + n, at_src)
    keep(res.flush(), pos_s, s0, s0 + n, at_src)
    deg = audio.fit_length(np.concatenate(at_src, 1) if at_src else np.zeros((entry.channels, 0), np.float32), n)
    deg24 = np.concatenate(at_codec, 1) if at_codec else np.zeros((entry.channels, 0), np.float32)
    ref24 = audio.fit_length(audio.resample(ref, sr, cr), deg24.shape[1])
    out = compare(ref, deg, sr)
    mono_ref, mono_deg = ref24.mean(0), deg24.mean(0)
    out["excerpt_s"] = n / sr
    out["mel_24k"] = M.mel_distance(mono_ref, mono_deg, cr)
    out["si_sdr_24k"] = M.si_sdr(mono_ref, mono_deg)
    # share of the decoded energy above 2 kHz in stationary narrow peaks the original lacks (added tones, issue 20)
    out["tones"] = M.tonal_peak_share(mono_ref, mono_deg, cr)
    out["speech_like"] = speech_like(ref24, cr)
    out["stoi"] = M.stoi(mono_ref, mono_deg, cr) if out["speech_like"] and mono_ref.size > cr else None
    out["visqol"] = None
    if cfg.visqol and M.visqol_available() and mono_ref.size >= cr:
        k = min(mono_ref.size, int(cfg.visqol_seconds * cr))
        a = (mono_ref.size - k) // 2
        out["visqol"] = M.visqol(mono_ref[a:a + k], mono_deg[a:a + k], cr,
                                 mode="speech" if out["speech_like"] else "audio")
    # at the source rate, so bandwidth the codec loses shows (a 24 kHz codec keeps nothing above 12 kHz)
    spec_ref, spec_deg = log_spectrogram(ref, sr), log_spectrogram(deg, sr)
    out["spec_ref"], out["spec_deg"] = spec_ref.tobytes(), spec_deg.tobytes()
    out["spec_shape"] = [list(spec_ref.shape), list(spec_deg.shape)]
    out["spec_rate"] = sr
    if cfg.listen_files > 0 and cfg.listen_seconds > 0:  # the same middle stretch of both, for the report's players
        k = min(n, int(cfg.listen_seconds * sr))
        a = (n - k) // 2
        out["clip_ref"], out["clip_deg"] = listening_clip(ref[:, a:a + k], sr), listening_clip(deg[:, a:a + k], sr)
        out["clip_s"] = k / sr
    return out


def listening_clip(x: np.ndarray, rate: int) -> bytes:
    """``x: [C, T]`` as a small Ogg Vorbis file (browsers play it; both players of a pair get the same
    encoding, transparent next to a low-bitrate codec's own artefacts)."""
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, np.clip(x.T, -1.0, 1.0), rate, format="OGG", subtype="VORBIS")
    return buf.getvalue()


# -- results --------------------------------------------------------------------------------------
NUMERIC = ["compression_ratio", "pcm_compression_ratio", "mel", "si_sdr", "mel_24k", "si_sdr_24k", "stoi",
           "visqol", "lufs_diff", "lufs_diff_abs", "clipping_added", "bandwidth_ratio", "tones"]


@dataclass
class QualityResult:
    rows: list[dict]
    summary: dict
    violations: list[dict] = field(default_factory=list)
    table: str = ""
    report: str = ""


def summarize(rows: list[dict], gates: tuple[Gate, ...]) -> tuple[dict, list[dict]]:
    good = [r for r in rows if not r.get("error")]
    summary: dict = {"files_sampled": len(rows), "files_measured": len(good),
                     "files_bad_pairs": len(rows) - len(good)}
    for k in NUMERIC:
        vals = [r[k] for r in good if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        if vals:
            summary[k] = {"mean": float(np.mean(vals)), "median": float(np.median(vals)),
                          "min": float(np.min(vals)), "max": float(np.max(vals)), "n": len(vals)}
    violations = []
    for r in good:
        bad = [str(g) for g in gates if not g.passes(r)]
        if bad:
            violations.append({"source": r["source"], "failed": bad,
                               **{g.metric: r.get(GATE_METRICS[g.metric]) for g in gates}})
    summary["gates"] = [str(g) for g in gates]
    summary["gate_violations"] = len(violations)
    return summary, violations


def write_table(dest: str, job_id: str, rows: list[dict], summary: dict) -> str:
    """Rows per sampled file plus one ``summary`` row, as Parquet under ``DEST/quality/``."""
    cols = ["source", "relpath", "stratum", "duration_s", "sample_rate", "channels", "excerpt_s", "source_bytes",
            "archive_bytes", "speech_like", "bandwidth_ref_hz", "bandwidth_hz", "lufs_ref", "error"] + NUMERIC
    records = []
    for r in rows:
        d = {k: r.get(k) for k in cols}
        d.update(kind="file", job_id=job_id)
        records.append(d)
    srow = {k: None for k in cols}
    for k in NUMERIC:
        if k in summary:
            srow[k] = summary[k]["mean"]
    srow.update(kind="summary", job_id=job_id, source="", error="", sample_rate=None,
                relpath=json.dumps({k: v for k, v in summary.items() if k not in NUMERIC}))
    records.append(srow)
    schema = pa.schema([("kind", pa.string()), ("job_id", pa.string()), ("source", pa.string()),
                        ("relpath", pa.string()), ("stratum", pa.string()), ("duration_s", pa.float64()),
                        ("sample_rate", pa.int32()), ("channels", pa.int32()), ("excerpt_s", pa.float64()),
                        ("source_bytes", pa.int64()), ("archive_bytes", pa.int64()), ("speech_like", pa.bool_()),
                        ("bandwidth_ref_hz", pa.float64()), ("bandwidth_hz", pa.float64()),
                        ("lufs_ref", pa.float64()), ("error", pa.string())]
                       + [(k, pa.float64()) for k in NUMERIC])
    table = pa.Table.from_pylist(records, schema=schema).replace_schema_metadata(archive.layout.meta("quality"))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    url = storage.join(dest, "quality", f"{job_id}.parquet")
    storage.write_bytes(url, sink.getvalue().to_pybytes())
    return url


REPORT_ONLY = ("spec_ref", "spec_deg", "spec_shape", "spec_rate", "clip_ref", "clip_deg", "clip_s")


def finish(dest: str, job_id: str, rows: list[dict], cfg: QualityConfig, context: dict,
           files_archived: int | None = None) -> QualityResult:
    """Summarize, apply gates, write the table and the HTML report into the archive. ``files_archived``:
    the population the sample was drawn from (the summary and the page say "N of M measured")."""
    from datetime import datetime, timezone

    from ..report import render_report
    summary, violations = summarize(rows, cfg.gates)
    if files_archived is not None:
        summary["files_archived"] = files_archived
    table = write_table(dest, job_id, rows, summary)
    context = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "job": job_id, **context}
    html = render_report(rows, summary, violations, cfg, context)
    report = storage.join(dest, "quality", f"{job_id}.html")
    storage.write_bytes(report, html.encode())
    for r in rows:  # spectrogram and clip bytes are for the report only
        for k in REPORT_ONLY:
            r.pop(k, None)
    return QualityResult(rows, summary, violations, table, report)


# -- on-demand job --------------------------------------------------------------------------------
def run_quality(dest: str, cfg: QualityConfig, patterns: tuple[str, ...] = (), address: str | None = None,
                weights: str | None = None) -> QualityResult:
    """``audioarc quality``: evaluate ``cfg.sample_files`` stratified files (or those matching ``patterns``) as
    Ray tasks."""
    from ..runtime import init_ray
    from ..select import select
    cfg.validate()
    rec, entries = archive.open_archive(dest)
    if patterns:
        chosen = select(entries, patterns)
    else:
        chosen = sample_manifest(list(entries.values()), cfg.sample_files, cfg.seed)
    if not chosen:
        raise ConfigError(f"{dest}: no archived files to sample")
    archive.load_codec(dest, rec, weights)  # fail fast, before any worker starts
    init_ray(address)
    import ray
    task = ray.remote(num_cpus=1)(evaluate)
    rows = ray.get([task.remote(dest, rec, e, cfg, weights=weights) for e in chosen])
    job_id = f"quality-{archive.now().replace(':', '')}"
    archived = [e for e in entries.values() if e.status == ARCHIVED]
    secs = sum(e.duration_s for e in archived)
    arc_bytes = sum(e.archive_bytes or 0 for e in archived)
    return finish(dest, job_id, rows, cfg, {
        "archive": dest, "codec": rec.codec.name, "checkpoint": rec.codec.checkpoint_hash,
        "bitrate_kbps": rec.codec.kbps_per_channel,
        "effective_kbps": round(arc_bytes * 8 / secs / 1000, 3) if secs else None,
        "files": len(entries), "files_failed": len(entries) - len(archived)},
        files_archived=len(archived))
