"""An encode job's configuration (``EncodeConfig``, validated once) and what it reports (``EncodeSummary``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..codec import registry
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..quality.config import QualityConfig

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
    precision: str = "fp32"  # GPU autocast: fp32 | bf16 | fp16 (check fidelity first: jobs/bench/bench_codec.py)
    commit_every: int = 500  # files per committed generation (resume granularity)
    shard_mb: float = 64.0  # target shard size: rows are bundled into write tasks of about this much
    address: str | None = None
    quality: QualityConfig | None = None  # quality sampling beside the encode; None = off
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

    def validate(self) -> EncodeConfig:
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
        from ..placement import PRECISIONS
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
    stage_seconds: dict | None = None  # where the time went (job.STAGES; stages overlap: they do not sum to wall)

    def to_json(self) -> dict:
        return asdict(self)
