"""Where the stages run: in-process (``inprocess``) or a Ray Data pipeline with codec actors; ``choose_executor``."""
from __future__ import annotations

import os
import sys
from typing import Iterator

import numpy as np

from .. import placement
from .. import quality as quality_mod
from ..codec.identity import CodecInfo
from ..runtime import init_ray
from ..manifest import CodecRecord
from . import inprocess
from .config import EncodeConfig
from .stages import CodecActor, Progress, decode_file


BLOCK_BYTES = 4 << 20  # Ray Data blocks of decoded windows: one or two 30 s windows each, not 128 MiB
STORE_FLOOR_BYTES = 512 << 20


def _bound_memory(ray, window_bytes: int, batch_windows: int, max_actors: int) -> None:
    """Keep decoded windows from piling up ahead of the codec: small blocks, and an object store budget for the
    pipeline of four batches per codec actor (at least ``STORE_FLOOR_BYTES``), so decode tasks wait (Ray Data's
    backpressure) instead of holding a long file's windows. Measured on a 3-hour input: the decode worker's peak
    USS 1,518 -> 483 MiB at the same wall time (Ray Data's defaults: 128 MiB blocks, a budget of a share of the
    whole object store); with 4 MiB blocks rather than 16 the decode worker's own memory (its object store pages
    apart) is the same for a 3-minute and a 3-hour input (265 MiB both; 247 -> 335 MiB with 16 MiB blocks)."""
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = BLOCK_BYTES
    opts = ctx.execution_options
    budget = max(STORE_FLOOR_BYTES, 4 * batch_windows * window_bytes * max_actors)
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=budget)


def _numpy_blocks(ray, ds) -> Iterator[dict[str, np.ndarray]]:
    """``ds``'s output blocks as numpy batches, one per block (what ``ds.iter_batches(batch_size=None,
    batch_format="numpy")`` yields), fetched by reference. Ray Data's batch iterator ships the dataset's whole
    statistics, one record per block so far, to its ``_StatsActor`` every 5 s, which then grows with the length
    of the job (ray-project/ray#43924, #66016); this does not. Measured on 300 vs 3,000 blocks through the same
    flat_map -> actor map_batches: the _StatsActor's peak USS 107 -> 134 MiB with ``iter_batches``, 105 -> 114
    MiB this way, at the same wall time."""
    from ray.data.block import BlockAccessor
    for bundle in ds.iter_internal_ref_bundles():
        for ref in bundle.block_refs:
            yield BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy")


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
        cuda = placement.cuda_available()
    return "ray" if cuda and cfg.gpus_per_actor != 0 else "local"


class _Runtime:
    """Where the stages run and what hangs on it (actor plan, progress counters, quality tasks), started on first
    need: a job whose inputs are all unchanged starts nothing. ``local``: in this process (``inprocess``);
    ``ray``: a Ray Data pipeline per chunk of inputs, codec actors, a progress actor."""

    def __init__(self, cfg: EncodeConfig, job_id: str, dm, q, executor: str = "ray", loaded=None):
        self.cfg, self.job_id, self.dm, self.q = cfg, job_id, dm, q
        self.loaded = loaded  # the job's codec, loaded in the driver: the in-process executor encodes with it
        self.executor = executor
        self.ray = self.plan = self.progress = self.q_task = None
        self.codec_stage = None  # local: the one CodecActor, loaded once for the job
        self.threads = self.decoders = self.encoders = None
        self.local_stats: dict = {}  # local: the codec threads' idle seconds

    def start(self):
        if self.executor == "local":
            return self._start_local()
        if self.ray is None:
            init_ray(self.cfg.address)
            import ray
            if self.dm is not None:  # Prometheus file_sd entries in the Ray session dir (see dashboards/README.md)
                from ..monitor import advertise
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
            c = self.cfg
            self.encoders, self.threads, self.decoders = inprocess.default_threads()
            if c.threads_per_actor:  # torch threads per codec thread asked for: as many codec threads as fit
                self.threads = c.threads_per_actor
                self.encoders = max(1, inprocess.machine_cores() // self.threads)
            cuda = c.gpus_per_actor != 0 and placement.cuda_available()
            self.plan = placement.plan_actors({"CPU": 1, "GPU": 1 if cuda else 0}, 1, None, None, None,
                                              c.windows_per_batch(), c.precision)
            self.progress = Progress()
        return None

    def stream(self, rows: list[dict], geom: CodecInfo, window_frames: int, job_tags, crec: CodecRecord,
               weights: str, n_q: int) -> Iterator[dict[str, np.ndarray]]:
        """Encoded batches (``CodecActor`` output) of the inputs ``rows``, in the order they complete."""
        self.start()
        plan, c = self.plan, self.cfg
        if self.executor == "local":
            if self.codec_stage is None:
                self.codec_stage = CodecActor(crec.name, weights, crec.checkpoint_hash, n_q, plan.device,
                                              self.threads, progress=self.progress, precision=plan.precision,
                                              loaded=self.loaded)
            window = window_frames * geom.hop_length + sum(geom.encode_context)
            return inprocess.stream(
                rows, lambda it: decode_file(it, geom, window_frames), self.codec_stage,
                batch_samples=plan.batch_windows * window, decoders=self.decoders, encoders=self.encoders,
                stats=self.local_stats)
        ray = self.ray
        window_bytes = 4 * (window_frames * geom.hop_length + sum(geom.encode_context)) * max(1, geom.channels)
        _bound_memory(ray, window_bytes, plan.batch_windows, plan.max_actors)
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
        return _numpy_blocks(ray, ds)

    def quality(self, dest: str, record, entry, q, weights):
        """A quality evaluation of one archived file: a Ray task, or (local) a call made by ``gather``."""
        self.start()
        if self.executor == "local":
            return lambda: quality_mod.evaluate(dest, record, entry, q, weights=weights)
        return self.q_task.remote(dest, record, entry, q, weights=weights)

    def gather(self, futures: list) -> list:
        if self.executor == "local":
            if futures and self.threads is not None:  # the codec threads are through: every core for one evaluation
                import torch
                torch.set_num_threads(inprocess.machine_cores())
            return [f() for f in futures]
        return self.ray.get(futures)

    def placement(self) -> dict | None:
        """The summary's ``placement``: the plan, the executor, the work per node."""
        if self.plan is None:
            return None
        extra = {"executor": self.executor}
        if self.executor == "local":
            extra.update(codec_threads=self.encoders, threads=self.threads, decoders=self.decoders)
        return dict(self.plan.to_json(), nodes=self.ask("by_node", {}), **extra)

    def ask(self, method: str, default):
        """A progress figure from the progress actor; ``default`` if it is gone (progress is only shown, never
        what the job commits: a lost node must not fail the job)."""
        if self.executor == "local":
            if self.progress is None:
                return default
            got = getattr(self.progress, method)()
            return dict(got, **self.local_stats) if method == "stages" else got
        if self.ray is None:
            return default
        try:
            return self.ray.get(getattr(self.progress, method).remote(), timeout=30)
        except Exception:  # noqa: BLE001
            return default
