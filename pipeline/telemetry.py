"""Every metric audioarc exports: name, type, help, labels, and who emits it. Nothing else defines metrics.

Two emitters, two endpoints:

* ``source="ray"``: recorded where the work happens (decode tasks, codec actors, shard writers, storage
  retries) with ``ray.util.metrics``; each Ray node's metrics agent exports them on the node's
  *metrics export port* (``ray.nodes()[i]["MetricsExportPort"]``). Ray prefixes the name with ``ray_``, and
  its exporter appends ``_total`` to counters and ``_bucket/_sum/_count`` to histograms. Ray adds its own
  labels (``NodeAddress``, ``WorkerId``, ``SessionName``, ...). Counters are per worker process and are
  reported to the agent every ``RAY_metrics_report_interval_ms`` (default 10 s): treat them as rates, the
  driver's job counters as the accounting truth.
* ``source="driver"``: job-level progress kept by the driver and served with ``prometheus_client`` on
  ``encode --metrics-port`` (127.0.0.1 by default). No prefix; counters get ``_total``.

:func:`exported_names` lists the series names Prometheus really sees; the dashboards and alert rules are
tested against it. Emission is per file / per batch (never per sample) and can be switched off with
``AUDIOARC_METRICS=0`` (or ``encode --no-metrics``) for overhead measurements.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

PREFIX = "audioarc_"
RAY_PREFIX = "ray_"

# labels every pipeline metric carries (node: the Ray node's IP, or the driver's host)
JOB_LABELS = ("job_id", "codec", "bitrate")
STAGES = ("decode", "encode", "write", "commit")
FAILURE_REASONS = ("not_audio", "empty", "truncated", "zero_length", "channels", "storage", "lost", "incomplete",
                   "damaged", "unexpected", "other")

# seconds: one file decoded, one codec batch encoded
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Spec:
    name: str  # without exporter prefix/suffixes
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    source: str  # ray | driver
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The base series name in Prometheus (before _total/_bucket/... suffixes)."""
        return (RAY_PREFIX if self.source == "ray" else "") + self.name

    def series(self) -> set[str]:
        base = self.exported
        if self.kind == "counter":
            return {base + "_total"}
        if self.kind == "histogram":
            return {base + "_bucket", base + "_sum", base + "_count"}
        return {base}


_W = JOB_LABELS + ("node",)  # labels of worker-side metrics
SPECS: dict[str, Spec] = {s.name: s for s in [
    # -- worker side (Ray metrics API) --
    Spec("audioarc_files_in", "counter", "Files (inputs) that entered a stage", _W + ("stage",), "ray"),
    Spec("audioarc_files_out", "counter", "Files that left a stage successfully", _W + ("stage",), "ray"),
    Spec("audioarc_audio_seconds_in", "counter", "Seconds of audio that entered a stage", _W + ("stage",), "ray"),
    Spec("audioarc_audio_seconds_out", "counter", "Seconds of audio that left a stage (decode: source "
         "duration of decoded files; encode: audio encoded to codes)", _W + ("stage",), "ray"),
    Spec("audioarc_bytes_read", "counter", "Source bytes read by decode tasks", _W, "ray"),
    Spec("audioarc_bytes_written", "counter", "Shard bytes written (staged Parquet code shards)", _W, "ray"),
    Spec("audioarc_failures", "counter", "Inputs that failed, by stage and reason class "
         f"({', '.join(FAILURE_REASONS)})", _W + ("stage", "reason"), "ray"),
    Spec("audioarc_storage_retries", "counter", "Transient storage errors retried (any process)",
         ("job_id", "op"), "ray"),
    Spec("audioarc_decode_file_seconds", "histogram", "Wall time to read+decode+resample+window one file",
         _W, "ray", LATENCY_BUCKETS),
    Spec("audioarc_encode_batch_seconds", "histogram", "Wall time of one codec batch (all forward passes)",
         _W, "ray", LATENCY_BUCKETS),
    Spec("audioarc_encode_batch_windows", "histogram", "Windows per codec batch", _W, "ray", BATCH_BUCKETS),
    Spec("audioarc_gpu_memory_allocated_bytes", "gauge", "torch.cuda.memory_allocated in a codec actor "
         "(GPU actors only)", _W + ("device",), "ray"),
    Spec("audioarc_gpu_memory_reserved_bytes", "gauge", "torch.cuda.memory_reserved in a codec actor "
         "(GPU actors only)", _W + ("device",), "ray"),
    Spec("audioarc_gpu_utilization_percent", "gauge", "torch.cuda.utilization seen by a codec actor "
         "(GPU actors with pynvml only)", _W + ("device",), "ray"),
    # -- driver side (prometheus_client on --metrics-port) --
    Spec("audioarc_job_info", "gauge", "1 while the job's driver serves metrics; labels describe the job",
         JOB_LABELS + ("src", "dest"), "driver"),
    Spec("audioarc_job_running", "gauge", "1 while the encode job runs, 0 once it ended", JOB_LABELS, "driver"),
    Spec("audioarc_job_start_time_seconds", "gauge", "Unix time the job started", JOB_LABELS, "driver"),
    Spec("audioarc_job_last_progress_time_seconds", "gauge", "Unix time a file last completed", JOB_LABELS,
         "driver"),
    Spec("audioarc_job_files_listed", "gauge", "Inputs listed so far", JOB_LABELS, "driver"),
    Spec("audioarc_job_files_progress", "gauge", "Files through the codec stage so far (live)", JOB_LABELS,
         "driver"),
    Spec("audioarc_job_audio_seconds_progress", "gauge", "Audio seconds encoded so far (live)", JOB_LABELS,
         "driver"),
    Spec("audioarc_job_files", "counter", "Committed files by final status (archived|failed|skipped)",
         JOB_LABELS + ("status",), "driver"),
    Spec("audioarc_job_failures", "counter", "Committed failures by reason class", JOB_LABELS + ("reason",),
         "driver"),
    Spec("audioarc_job_audio_seconds", "counter", "Committed audio seconds archived by this run",
         JOB_LABELS, "driver"),
    Spec("audioarc_job_source_bytes", "counter", "Source bytes of files archived by this run", JOB_LABELS,
         "driver"),
    Spec("audioarc_job_archive_bytes", "counter", "Archive bytes of files archived by this run", JOB_LABELS,
         "driver"),
    Spec("audioarc_job_backlog_files", "gauge", "Inputs listed but not yet through the codec stage",
         JOB_LABELS, "driver"),
    Spec("audioarc_job_active_actors", "gauge", "Codec actors that reported in the last 30 s", JOB_LABELS,
         "driver"),
    Spec("audioarc_quality", "gauge", "Sampled fidelity of the job's quality sample: metric (mel, si_sdr, "
         "mel_24k, si_sdr_24k, stoi, visqol, lufs_diff_abs, bandwidth_ratio, compression_ratio) x stat "
         "(median, worst)", JOB_LABELS + ("metric", "stat"), "driver"),
    Spec("audioarc_quality_files_sampled", "gauge", "Files in the job's quality sample (measured + bad pairs)",
         JOB_LABELS, "driver"),
    Spec("audioarc_quality_gate_violations", "gauge", "Sampled files below a --min-quality floor", JOB_LABELS,
         "driver"),
    Spec("audioarc_job_compression_ratio", "gauge", "Source bytes / archive bytes over committed files",
         JOB_LABELS, "driver"),
    Spec("audioarc_job_eta_seconds", "gauge", "Estimated seconds to finish the files listed so far",
         JOB_LABELS, "driver"),
]}


# Ray's own per-node metrics the dashboards use (exported by every node's metrics agent; GPU ones only on
# nodes with GPUs)
RAY_NODE_METRICS = {"ray_node_cpu_utilization", "ray_node_cpu_count", "ray_node_mem_used", "ray_node_mem_total",
                    "ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available"}


def exported_names() -> set[str]:
    """Every series name Prometheus can see from audioarc (dashboards may only use these + Ray's own)."""
    out: set[str] = set()
    for s in SPECS.values():
        out |= s.series()
    return out


def enabled() -> bool:
    return os.environ.get("AUDIOARC_METRICS", "1").lower() not in ("0", "false", "no", "off")


def classify_failure(reason: str, storage_error: bool = False) -> str:
    """A failure message -> one of FAILURE_REASONS: only for entries of format 1.x archives, which carry no
    ``reason_code`` (every failure audioarc records now carries its code from where it was raised)."""
    r = reason.lower()
    if storage_error:
        return "storage"
    if "empty file" in r:
        return "empty"
    if "zero-length" in r:
        return "zero_length"
    if "truncated" in r or "corrupt" in r:
        return "truncated"
    if "not a readable audio" in r or "audio header has" in r:
        return "not_audio"
    if "no such file or object" in r or "still failing after" in r:
        return "storage"
    return "other"


# -- worker side ----------------------------------------------------------------------------------
_ray_metrics: dict[str, object] = {}
_lock = threading.Lock()
_context: dict[str, str] = {}  # default job tags of this process (set by the work that runs here)


def _node() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return os.uname().nodename


def _metric(name: str):
    m = _ray_metrics.get(name)
    if m is None:
        with _lock:
            m = _ray_metrics.get(name)
            if m is None:
                from ray.util import metrics as rm
                s = SPECS[name]
                assert s.source == "ray", name
                if s.kind == "counter":
                    m = rm.Counter(s.name, s.help, tag_keys=s.labels)
                elif s.kind == "gauge":
                    m = rm.Gauge(s.name, s.help, tag_keys=s.labels)
                else:
                    m = rm.Histogram(s.name, s.help, boundaries=list(s.buckets), tag_keys=s.labels)
                _ray_metrics[name] = m
    return m


class Emitter:
    """Worker-side recorder bound to one job's tags; every method is a no-op when disabled.

    Built from the picklable ``job_tags`` dict the driver passes to tasks/actors (None: disabled).
    """

    def __init__(self, job_tags: dict | None):
        self.on = bool(job_tags) and enabled()
        if self.on:
            try:
                import ray
                self.on = ray.is_initialized()
            except Exception:  # noqa: BLE001
                self.on = False
        self.tags = dict(job_tags or {}, node=_node()) if self.on else {}
        if self.on:
            _context.update(job_id=self.tags["job_id"])

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        if self.on and value > 0:
            _metric(name).inc(value, tags={**self.tags, **labels})

    def observe(self, name: str, value: float, **labels) -> None:
        if self.on:
            _metric(name).observe(value, tags={**self.tags, **labels})

    def set(self, name: str, value: float, **labels) -> None:
        if self.on:
            _metric(name).set(value, tags={**self.tags, **labels})

    def gpu(self, torch) -> None:
        """GPU memory/utilisation of this process's current CUDA device; silent on CPU."""
        if not self.on:
            return
        try:
            if not torch.cuda.is_available() or not torch.cuda.is_initialized():
                return
            dev = torch.cuda.current_device()
            d = str(dev)
            self.set("audioarc_gpu_memory_allocated_bytes", torch.cuda.memory_allocated(dev), device=d)
            self.set("audioarc_gpu_memory_reserved_bytes", torch.cuda.memory_reserved(dev), device=d)
            try:
                self.set("audioarc_gpu_utilization_percent", torch.cuda.utilization(dev), device=d)
            except Exception:  # noqa: BLE001 - needs pynvml
                pass
        except Exception:  # noqa: BLE001
            pass


def note_retry(op: str) -> None:
    """Count one retried storage error (called by storage.retry in whatever process it runs)."""
    if not enabled():
        return
    try:
        import ray
        if ray.is_initialized():
            _metric("audioarc_storage_retries").inc(1, tags={"job_id": _context.get("job_id", ""), "op": op})
    except Exception:  # noqa: BLE001 - metrics never break the job
        pass


# -- driver side ----------------------------------------------------------------------------------
class DriverMetrics:
    """Job-level metrics in a private prometheus_client registry, served on host:port while the job runs."""

    def __init__(self, job_id: str, codec: str, bitrate: float, src: str = "", dest: str = ""):
        from prometheus_client import CollectorRegistry, Counter, Gauge
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"job_id": job_id, "codec": codec, "bitrate": f"{bitrate:g}"}
        self._m = {}
        for s in SPECS.values():
            if s.source != "driver":
                continue
            cls = Counter if s.kind == "counter" else Gauge
            name = s.name[: -len("_total")] if s.name.endswith("_total") else s.name
            self._m[s.name] = cls(name, s.help, s.labels, registry=self.registry)
        self._m["audioarc_job_info"].labels(**self.labels, src=src, dest=dest).set(1)
        now = time.time()
        self.set("audioarc_job_start_time_seconds", now)
        self.set("audioarc_job_last_progress_time_seconds", now)
        self.set("audioarc_job_running", 1)
        for st in ("archived", "failed", "skipped"):  # exist (at 0) from the start: rate() sees the first inc
            self._m["audioarc_job_files"].labels(**self.labels, status=st)
        for r in FAILURE_REASONS:
            self._m["audioarc_job_failures"].labels(**self.labels, reason=r)
        for n in ("audioarc_job_audio_seconds", "audioarc_job_source_bytes", "audioarc_job_archive_bytes"):
            self._m[n].labels(**self.labels)
        self.server = None
        self.url = ""
        self.advertised: list = []  # file_sd files naming this endpoint (removed by close)
        self._scrapes = 0
        self._t0 = now
        self._last_files = 0
        self._src_bytes = self._arc_bytes = 0

    def set(self, name: str, value: float, **extra) -> None:
        self._m[name].labels(**self.labels, **extra).set(value)

    def inc(self, name: str, value: float = 1.0, **extra) -> None:
        if value > 0:
            self._m[name].labels(**self.labels, **extra).inc(value)

    #: metrics where larger is worse: their "worst" is the max, otherwise the min
    LOWER_IS_BETTER = ("mel", "mel_24k", "lufs_diff_abs")

    def quality(self, summary: dict) -> None:
        """Publish a finished quality sample (``quality.summarize`` output)."""
        self.set("audioarc_quality_files_sampled", summary.get("files_sampled", 0))
        self.set("audioarc_quality_gate_violations", summary.get("gate_violations", 0))
        for metric, st in summary.items():
            if isinstance(st, dict) and "median" in st:
                worst = st["max"] if metric in self.LOWER_IS_BETTER else st["min"]
                self.set("audioarc_quality", st["median"], metric=metric, stat="median")
                self.set("audioarc_quality", worst, metric=metric, stat="worst")

    def progress(self, files_done: int, files_listed: int, seconds: float, actors: dict[str, float]) -> None:
        now = time.time()
        self.set("audioarc_job_files_listed", files_listed)
        self.set("audioarc_job_files_progress", files_done)
        self.set("audioarc_job_audio_seconds_progress", seconds)
        self.set("audioarc_job_backlog_files", max(0, files_listed - files_done))
        self.set("audioarc_job_active_actors", sum(1 for t in actors.values() if now - t < 30))
        if files_done > self._last_files:
            self._last_files = files_done
            self.set("audioarc_job_last_progress_time_seconds", now)
        rate = files_done / max(1e-9, now - self._t0)
        self.set("audioarc_job_eta_seconds", (files_listed - files_done) / rate if rate > 0 else -1)

    def committed(self, entries, skipped: int = 0) -> None:
        """Account one committed generation's manifest entries (ManifestEntry objects)."""
        for e in entries:
            if e.status == "archived":
                self.inc("audioarc_job_files", status="archived")
                self.inc("audioarc_job_audio_seconds", e.duration_s)
                self.inc("audioarc_job_source_bytes", e.size)
                self.inc("audioarc_job_archive_bytes", e.archive_bytes)
                self._src_bytes += e.size
                self._arc_bytes += e.archive_bytes
            else:
                self.inc("audioarc_job_files", status="failed")
                self.inc("audioarc_job_failures", reason=getattr(e, "reason_code", "") or classify_failure(e.reason))
        self.inc("audioarc_job_files", skipped, status="skipped")
        if self._arc_bytes:
            self.set("audioarc_job_compression_ratio", self._src_bytes / self._arc_bytes)

    def finished(self) -> None:
        self.set("audioarc_job_running", 0)
        self.set("audioarc_job_backlog_files", 0)
        self.set("audioarc_job_eta_seconds", 0)
        self._finished_at_scrape = self._scrapes

    # -- serving --
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start the HTTP endpoint (``/metrics``); returns the bound port."""
        from http.server import ThreadingHTTPServer

        from prometheus_client.exposition import MetricsHandler
        outer = self

        class Handler(MetricsHandler.factory(self.registry)):
            def do_GET(self):  # noqa: N802
                super().do_GET()
                if self.path.startswith("/metrics"):
                    outer._scrapes += 1

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/metrics"
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="audioarc-metrics", daemon=True).start()
        return self.server.server_address[1]

    def linger(self, seconds: float) -> bool:
        """After ``finished``: keep serving until one scrape has seen the final values (the one in flight when
        the job ended may be stale, so wait for two), at most ``seconds``. True when they were scraped."""
        if self.server is None or seconds <= 0:
            return False
        target = getattr(self, "_finished_at_scrape", self._scrapes) + 2
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self._scrapes >= target:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for p in self.advertised:
            try:
                p.unlink()
            except OSError:
                pass
