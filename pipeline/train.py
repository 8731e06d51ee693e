"""Train the ``neural_rvq`` codec (MDCT-domain conv autoencoder + EMA residual VQ).

    audioarc train [--data DIR|URL] [--steps N] [--max-minutes M] [--run-dir DIR] [--resume]
                   [--no-ray] [--threads 1] [--out pipeline/codec/weights/neural_rvq.pt]

Runs through Ray Train (``TorchTrainer``, GPU per worker when the cluster has GPUs) unless ``--no-ray``;
both paths run the same loop. ``--workers N`` trains data-parallel: each worker draws its own ``--batch``
segments, gradients are averaged and codebook EMA statistics summed over workers (``torch.distributed``:
NCCL on GPUs, gloo on CPUs), rank 0 decides when to stop and writes the log and checkpoints (``--run-dir``
must be storage every worker sees), and the run ends by checking that every replica holds the same
weights and codebooks. Training audio: every audio file under ``--data`` (a folder or a URL prefix such
as ``s3://bucket/audio/``; default: the Debian corpus), minus the held-out split (``corpus.is_heldout``),
resampled to 24 kHz mono and cached as one ``.npz``. Checkpoints (model, optimizer, quantizer EMA state,
step, wall time, the run's settings) go to ``RUN_DIR/ckpt.pt`` every ``--ckpt-every`` steps; ``--resume``
continues from there with the checkpoint's settings (loss weights, rung decoder, data mix, ...), changing only
the options given again on the command line (the shape of what is trained cannot change on resume).
The best model so far (multi-scale mel loss at 6 kbps on a fixed set of training segments) is written to
``--out`` as ``{"model": state_dict}``. A fine-tune (``--init-from WEIGHTS``) scores the fixed segments at every
rung of the ladder in turn (mean mel loss) and starts with WEIGHTS themselves as the best model, so ``--out`` is
never worse than them on those segments.

``--rung-decoder K --init-from WEIGHTS`` trains only a dedicated decoder for exactly K stages (see
``pipeline/codec/neural.py``), started as a copy of the shared decoder; the encoder and codebooks are
frozen, so the codes (and every other rung) stay exactly those of WEIGHTS. Its best model is chosen by
the training objective at K stages on the fixed segments.

``--keep-codes K --init-from WEIGHTS`` fine-tunes the shared decoder and the codebooks after the first K, with
the encoder, the first K codebooks and the rung decoders frozen: K-stage codes (and the rung decoder reading
them) stay exactly those of WEIGHTS, so a release's trained low-rate decoder stays valid while the higher
rungs improve.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

SEG_FRAMES = 112  # frames per training segment (~1.5 s)


# -- settings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """A run's settings: built from the command line by ``default_config`` (its defaults are the command line's:
    ``build_parser`` reads them from here), merged with a checkpoint's by ``resumed_config``, validated once by
    ``validate``. Checkpoints store it as a plain dict (``to_dict``; ``from_dict`` reads one back, old ones too)."""

    width: int = 256
    latent_dim: int = 64
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    n_q: int = 32
    codebook_size: int = 1024
    seg_frames: int = SEG_FRAMES
    batch: int = 12
    lr: float = 1e-3
    steps: int = 100000
    max_minutes: float = 60.0
    warmup_steps: int = 150  # autoencoder steps before the RVQ is on
    init_batches: int = 16
    kmeans_iters: int = 6
    ema_decay: float = 0.99  # (no option)
    w_time: float = 0.0
    w_mdct: float = 1.0
    log_every: int = 25
    ckpt_every: int = 200
    val_segments: int = 16
    seed: int = 0
    threads: int = 1
    run_dir: str = ".data/runs/neural_rvq"  # (resolved to an absolute path by default_config, as out/cache/init_from)
    out: str = "pipeline/codec/weights/neural_rvq.pt"
    resume: bool = False
    reset_best: bool = False
    restart_schedule: bool = False
    init_from: str | None = None
    other_fraction: float = 0.5
    p_full: float = 0.3
    w_env: float = 0.0
    w_mel7: float = 0.0
    rung_weights: tuple[float, ...] | None = None
    rung_decoder: int | None = None
    rung_extra_blocks: int = 0
    rung_ahead_blocks: int = 0
    pair_search: int | None = None
    keep_codes: int | None = None
    cache: str = ".data/train_24k.npz"
    use_ray: bool = True  # (the option is --no-ray)
    cpu: bool = False
    workers: int = 1
    resume_changes: dict | None = None  # --resume: the options given again that changed, logged by the loop

    def validate(self) -> TrainConfig:
        for name in ("width", "latent_dim", "n_q", "codebook_size", "seg_frames", "batch", "init_batches", "log_every",
                     "ckpt_every", "val_segments", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        for name in ("steps", "max_minutes", "warmup_steps", "kmeans_iters", "w_time", "w_mdct", "w_env",
                     "w_mel7", "rung_extra_blocks", "rung_ahead_blocks"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must not be negative")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr {self.lr}: must be a positive learning rate")
        if not self.dilations or min(self.dilations) < 1:
            raise ConfigError(f"--dilations {' '.join(map(str, self.dilations))}: give one or more dilations, "
                              "each at least 1")
        for name in ("other_fraction", "p_full"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be between 0 and 1")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay {self.ema_decay}: must be between 0 and 1 (exclusive)")
        w = self.rung_weights
        if w is not None and (not w or min(w) < 0 or not sum(w) > 0):
            raise ConfigError(f"--rung-weights {' '.join(f'{v:g}' for v in w)}: must not be "
                              "negative, and at least one must be positive")
        if self.pair_search is not None and self.pair_search < 0:
            raise ConfigError(f"--pair-search {self.pair_search}: must be at least 0 (0 = greedy)")
        if self.workers < 1 or (self.workers > 1 and not self.use_ray):
            raise ConfigError("--workers N needs N >= 1, and more than one worker runs through Ray Train "
                              "(drop --no-ray)")
        return self

    def to_dict(self) -> dict:
        """The plain dict a checkpoint stores (the keys and values the dict config of earlier versions had:
        ``dilations`` a list, ``resume_changes`` only after a resume)."""
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        if d["resume_changes"] is None:
            del d["resume_changes"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The settings of a saved dict (a checkpoint's ``"config"``): keys it lacks take their defaults, keys
        this version does not know are ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "dilations" in kw:
            kw["dilations"] = tuple(kw["dilations"])
        if kw.get("rung_weights") is not None:
            kw["rung_weights"] = tuple(kw["rung_weights"])
        return cls(**kw)


# -- data ------------------------------------------------------------------------------------------
def training_files(data: str | Path | None) -> list[str]:
    """Audio files of ``data`` (a folder, or a URL prefix such as ``s3://bucket/audio/``; default: the Debian
    corpus) minus the held-out split (``corpus.is_heldout``, by name hash)."""
    from . import corpus, storage
    if data is None or storage.is_local(str(data)):
        root = Path(storage.local_path(str(data))) if data is not None else corpus.fetch()
        files = [str(p) for p in corpus.audio_files(root)]
    else:
        files = [o.uri for o in storage.walk_files(str(data), corpus.AUDIO_EXTENSIONS)]
    return [f for f in files if not corpus.is_heldout(f)]


def build_cache(data: str | Path | None, cache: Path, rate: int = 24000, max_seconds_per_file: float = 120.0,
                max_speech_files: int = 1200, seed: int = 0, log=print) -> Path:
    """Decode the training split of ``data`` (folder or URL; see ``training_files``) to 24 kHz mono float16
    and save ``cache`` (.npz). Remote files are downloaded one at a time for decoding."""
    from . import audio, corpus, storage
    if cache.exists():
        return cache
    files = training_files(data)
    if not files:
        raise ValueError(f"no training audio under {data}: expected {', '.join(corpus.AUDIO_EXTENSIONS)} files "
                         "outside the held-out split")
    music = [p for p in files if corpus.kind_of(p) == "music"]
    other = [p for p in files if corpus.kind_of(p) != "music"]
    rng = random.Random(seed)
    rng.shuffle(other)
    other = other[:max_speech_files]
    arrays, kinds, names = [], [], []
    t0 = time.time()
    for p in music + other:
        try:
            with storage.open_input(p) as (local, _):
                x, _ = audio.load(local, rate, mono=True)
        except Exception as e:  # a broken file is skipped, not fatal
            log(f"skip {p}: {e}")
            continue
        x = x[0]
        lim = int(max_seconds_per_file * rate)
        if len(x) > lim:
            s = rng.randrange(0, len(x) - lim)
            x = x[s:s + lim]
        if len(x) < rate // 2:
            continue
        arrays.append(x.astype(np.float16))
        kinds.append(corpus.kind_of(p))
        names.append(str(p))
    if not arrays:
        raise ValueError(f"none of the {len(files)} training files under {data} could be decoded (see the "
                         "'skip' lines above)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(a) for a in arrays])
    np.savez(cache, audio=np.concatenate(arrays), lengths=lengths, kinds=np.array(kinds), names=np.array(names))
    log(f"cached {len(arrays)} files, {lengths.sum() / rate / 3600:.2f} h "
        f"(music {sum(l for l, k in zip(lengths, kinds) if k == 'music') / rate / 3600:.2f} h) "
        f"in {time.time() - t0:.0f}s -> {cache}")
    return cache


class SegmentSampler:
    """Random ``seg`` -sample crops, music / other (speech, ambient) mixed by ``other_fraction``, random gain,
    near-silent crops rejected."""

    def __init__(self, cache: Path, seg: int, seed: int = 0, other_fraction: float = 0.5):
        d = np.load(cache)
        self.audio = d["audio"]
        self.lengths = d["lengths"]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        kinds = d["kinds"]
        self.groups = [np.nonzero(kinds == "music")[0], np.nonzero(kinds != "music")[0]]
        self.groups = [g[self.lengths[g] > seg] for g in self.groups if len(g)]
        self.groups = [g for g in self.groups if len(g)]
        if not self.groups:
            raise ValueError(f"no training file in {cache} is longer than {seg} samples")
        self.seg = seg
        # probability of drawing from each group (music, other); one group: always it
        self.p_group = [1.0 - other_fraction, other_fraction] if len(self.groups) == 2 else [1.0]
        self.rng = np.random.default_rng(seed)

    def one(self, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = self.rng if rng is None else rng
        for _ in range(20):
            g = self.groups[rng.choice(len(self.groups), p=self.p_group)]
            w = self.lengths[g].astype(np.float64)
            i = g[rng.choice(len(g), p=w / w.sum())]
            s = self.offsets[i] + rng.integers(0, self.lengths[i] - self.seg)
            x = self.audio[s:s + self.seg].astype(np.float32)
            if np.sqrt(np.mean(x ** 2)) > 3e-3:
                break
        gain = 10 ** (rng.uniform(-12, 3) / 20)
        peak = np.abs(x).max() + 1e-9
        return x * min(gain, 0.99 / peak)

    def batch(self, n: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.one(rng) for _ in range(n)]))

    def validation_batch(self, n: int, seed: int) -> torch.Tensor:
        """``n`` crops fixed by ``seed`` alone (its own generator), so a resumed run scores the same segments."""
        return self.batch(n, np.random.default_rng([seed, 0x7A1]))


def shipping_state(model: dict) -> dict:
    """A state dict as weights files store it: rung decoders as float16 (half the bytes; loaded back into
    float32), every other tensor as trained, all on the CPU."""
    return {k: v.cpu().half() if k.startswith("rung_decoders.") and v.is_floating_point() else v.cpu()
            for k, v in model.items()}


# -- data parallel ---------------------------------------------------------------------------------
class DataParallel:
    """Keeps the replicas of a multi-worker run (Ray Train, ``torch.distributed``) identical: gradients are
    averaged, quantizer statistics summed, and rank 0's decisions and codebook state broadcast. With one
    worker every method is a no-op, so the single-process loop runs unchanged."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.on = world > 1
        if self.on:
            import torch.distributed as dist
            self.dist = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.dist.all_reduce(t)
        return t

    def average_grads(self, params) -> None:
        """Average every parameter's gradient over the workers. A parameter one worker's batch did not reach
        (e.g. a rung decoder when no example of it drew that rung) counts as a zero gradient there, so every
        worker joins the same collectives and steps the same parameters."""
        if self.on:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def broadcast_(self, *tensors: torch.Tensor) -> None:
        """Overwrite ``tensors`` on every worker with rank 0's."""
        if self.on:
            for t in tensors:
                self.dist.broadcast(t, 0)

    def decide(self, flag: bool, device) -> bool:
        """Rank 0's ``flag`` on every worker (e.g. a wall-clock stop, which differs per worker)."""
        if not self.on:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.dist.broadcast(t, 0)
        return bool(t.item())

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out


# -- the loop --------------------------------------------------------------------------------------
class _Run:
    """One training run's live state (device and workers, log, model, quantizer, optimizer, data, counters), shared
    by the steps of ``train_loop``."""

    def __init__(self, config: TrainConfig):
        """Set up the process (threads, seed, device, workers) and open the run's log (rank 0 only)."""
        torch.set_num_threads(int(config.threads))
        torch.manual_seed(config.seed)
        self.config = config
        self.ray_ctx = None
        self.dp = DataParallel()
        if config.use_ray:
            import ray.train
            import ray.train.torch
            self.ray_ctx = ray.train
            self.device = ray.train.torch.get_device()
            ctx = ray.train.get_context()
            self.dp = DataParallel(ctx.get_world_rank(), ctx.get_world_size())
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
        self.run_dir = Path(config.run_dir)  # with several workers: shared by them (rank 0 writes, all resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.run_dir / "train.log", "a") if self.dp.main else None
        self.ckpt_path = self.run_dir / "ckpt.pt"
        self.out_path = Path(config.out)

    def log(self, msg) -> None:
        """Print ``msg`` (a string, or a dict as JSON) and append it to the run's log; other ranks stay silent."""
        if self.logf is None:  # other ranks: the run's log is rank 0's
            return
        line = msg if isinstance(msg, str) else json.dumps(msg)
        print(line, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def build_model(self) -> None:
        """Build the codec, sampler and quantizer trainer, load ``--init-from`` and freeze what is not trained."""
        from .codec.neural import NeuralRvqCodec
        from .codec.neural_train import EmaRvqTrainer
        from .codec.registry import read_weights
        config, dp = self.config, self.dp
        codec = self.codec = NeuralRvqCodec(width=config.width, latent_dim=config.latent_dim,
                                            dilations=tuple(config.dilations), n_q=config.n_q,
                                            codebook_size=config.codebook_size).to(self.device)
        seg = (config.seg_frames + 1) * codec.hop_length
        # same initial weights on every worker (seeded above); each draws its own data
        self.data_seed = config.seed + 1000 * dp.rank
        self.sampler = SegmentSampler(Path(config.cache), seg, seed=self.data_seed,
                                      other_fraction=config.other_fraction)
        self.vq = EmaRvqTrainer(codec, decay=config.ema_decay, seed=self.data_seed,
                                reduce=dp.sum_ if dp.on else None)
        self.rung = config.rung_decoder
        self.keep = config.keep_codes or 0
        self.resuming = bool(config.resume) and self.ckpt_path.exists()
        # released weights to start from, read once (before a rung decoder is added, so a missing one starts as the
        # shared decoder; a plain fine-tune that resumes takes everything from its checkpoint instead)
        self.init_state = None
        if config.init_from and (self.rung or self.keep or not self.resuming):
            self.init_state = read_weights(config.init_from)
            codec.load_weights(self.init_state, str(config.init_from))
            if codec.clear_band_gains():  # fitted to the codes this run changes: refit on its weights
                self.log(f"{config.init_from}: band gains dropped (fitted to these codes); refit them on the result "
                         f"with `python -m jobs.fit_band_gains --weights OUT`")
        if self.rung:
            self._freeze_for_rung()
        if self.keep:
            self._freeze_for_keep()
        self.params = [p for p in codec.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, betas=(0.8, 0.99), weight_decay=1e-5)

    def _freeze_for_rung(self) -> None:
        """``--rung-decoder K``: add the decoder for K stages and make it the only thing trained."""
        config, codec, rung = self.config, self.codec, self.rung
        if not (config.init_from or config.resume):
            raise ValueError("--rung-decoder trains a decoder for trained codes: pass --init-from WEIGHTS")
        if rung not in codec.ladder_n_q:
            raise ValueError(f"--rung-decoder {rung}: not a rung of the ladder {codec.ladder_n_q}")
        codec.add_rung_decoder(rung, config.rung_extra_blocks, config.rung_ahead_blocks)
        if config.pair_search is not None:
            if rung != 2:
                raise ValueError("--pair-search applies to the 2-stage rung: use it with --rung-decoder 2")
            codec.rvq.set_pair_search(config.pair_search)
        codec.requires_grad_(False)
        codec.decoder_for(rung).requires_grad_(True)

    def _freeze_for_keep(self) -> None:
        """``--keep-codes K``: freeze the encoder, the first K codebooks and the rung decoders."""
        config, codec, keep = self.config, self.codec, self.keep
        if self.rung:
            raise ValueError("--keep-codes fine-tunes the shared decoder; --rung-decoder trains a rung decoder "
                             "with every code kept already: use one of them")
        if not (config.init_from or config.resume):
            raise ValueError("--keep-codes keeps the codes of trained weights: pass --init-from WEIGHTS")
        if not 1 <= keep < codec.n_q:
            raise ValueError(f"--keep-codes {keep}: must be in [1, {codec.n_q - 1}]")
        stale = sorted(int(k) for k in codec.rung_decoders if int(k) > keep)
        if stale:
            raise ValueError(f"--keep-codes {keep}: {config.init_from} has rung decoders for {stale} stages, "
                             f"whose codes would change; keep at least {max(stale)} stages' codes")
        # the encoder, the first `keep` codebooks and every rung decoder stay as they are: the codes of the
        # first `keep` stages (and what the rung decoders make of them) are exactly those of the weights
        codec.encoder.requires_grad_(False)
        codec.rung_decoders.requires_grad_(False)
        self.vq.frozen_stages = keep

    def start_state(self) -> float:
        """Resume from the checkpoint, or start the quantizer / feature scale for a new run; returns elapsed seconds."""
        config, codec, vq, rung = self.config, self.codec, self.vq, self.rung
        self.step, elapsed, self.best = 0, 0.0, float("inf")
        n_trainable = sum(p.numel() for p in self.params) / 1e6
        if config.resume and self.ckpt_path.exists():
            ck = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
            if rung and config.pair_search is not None:  # given on resume: wins over the checkpoint's
                ck["model"]["rvq.pair_search_k"] = torch.tensor(config.pair_search)
            codec.load_weights(ck, str(self.ckpt_path))
            self.opt.load_state_dict(ck["opt"])
            vq.load_state_dict(ck["vq"])
            self.step, elapsed = ck["step"], ck["elapsed"]
            self.best = self.best if config.reset_best else ck.get("best", self.best)
            self.sampler.rng = np.random.default_rng(self.data_seed + self.step)
            changes = config.resume_changes
            self.log(f"resumed from {self.ckpt_path} at step {self.step} ({elapsed / 60:.1f} min) with its settings"
                     + (f"; changed: {', '.join(f'{k}={v!r}' for k, v in changes.items())}" if changes else ""))
        elif rung:
            vq.seed_from_codebooks(config.batch * config.seg_frames)  # frozen: never updated
            self.log(f"rung decoder for {rung} stages, from {config.init_from} "
                     f"({n_trainable:.2f}M trainable params; encoder and codebooks frozen)")
        elif config.init_from:
            # fine-tune from released weights (no optimizer or EMA state in them): the codebooks are trained,
            # so the quantizer starts initialised, its EMA statistics seeded as if each code were used evenly
            vq.seed_from_codebooks(config.batch * config.seg_frames)  # latent vectors per step
            self.log(f"initialised from {config.init_from} (trained to step {self.init_state.get('step', '?')})"
                     + (f"; encoder, first {self.keep} codebooks and rung decoders frozen "
                        f"({n_trainable:.2f}M trainable params)" if self.keep else ""))
        else:
            # per-bin normalisation of the companded MDCT from data
            with torch.no_grad():
                y = codec.features(self.sampler.batch(64).to(self.device)[:, None, :])
                std = y.permute(1, 0, 2).reshape(codec.hop_length, -1).std(1).clamp_min(1e-4)
                codec.feat_scale.copy_(1.0 / std)
                self.dp.broadcast_(codec.feat_scale)
        return elapsed

    def prepare_loop(self, elapsed: float) -> None:
        """Log the model, fix the validation segments and their rungs, and set the schedule and counters."""
        config, codec, rung = self.config, self.codec, self.rung
        # --restart-schedule: a fine-tune phase with its own warm-restart cosine over --steps / --max-minutes
        self.step0, self.phase_start = (self.step, time.time()) if config.restart_schedule else (0, None)
        self.log(f"neural_rvq: {codec.n_params() / 1e6:.2f}M params, encode_context {codec.encode_context}, "
                 f"decode_context {codec.decode_context}, device {self.device}, threads {torch.get_num_threads()}, "
                 f"workers {self.dp.world} (batch {config.batch} each)")
        self.val = self.sampler.validation_batch(config.val_segments, config.seed).to(self.device)  # same on resume
        self.fine_tune = bool(config.init_from) and not rung and not self.resuming
        if self.fine_tune:  # every rung scored: a fine-tune must not buy one rung with another
            ladder = list(codec.ladder_n_q)
            self.val_nq = torch.tensor([ladder[i % len(ladder)] for i in range(len(self.val))])
        else:
            self.val_nq = torch.full((len(self.val),), min(8, codec.n_q))
        self.val_key = "val_loss_rung" if rung else ("val_mel_rungs" if self.fine_tune else "val_mel_6kbps")
        if config.w_mel7 and not rung:
            self.val_key += "+mel7"
        self.rng = random.Random(self.data_seed + self.step)
        self.t_start = time.time() - elapsed
        self.max_s = config.max_minutes * 60
        self.loss_weights = {"w_time": config.w_time, "w_mdct": config.w_mdct, "w_env": config.w_env,
                             "w_mel7": config.w_mel7}
        self.logs_acc: dict[str, list[float]] = {}

    def save_ckpt(self) -> None:
        """Write ``RUN_DIR/ckpt.pt`` (model, optimizer, quantizer state, counters, settings) atomically."""
        torch.save({"model": self.codec.state_dict(), "opt": self.opt.state_dict(), "vq": self.vq.state_dict(),
                    "step": self.step, "elapsed": time.time() - self.t_start, "best": self.best,
                    "config": self.config.to_dict()}, str(self.ckpt_path) + ".tmp")
        os.replace(str(self.ckpt_path) + ".tmp", self.ckpt_path)

    def save_weights(self, path: Path) -> None:
        """Write the model as a shipping weights file at ``path`` atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = self.config.to_dict()  # (dilations as a list, as ever)
        cfg = {k: saved[k] for k in ("width", "latent_dim", "dilations", "n_q", "codebook_size")}
        cfg["rung_decoders"] = sorted(int(k) for k in self.codec.rung_decoders)
        torch.save({"model": shipping_state(self.codec.state_dict()), "config": cfg,
                    "step": self.step}, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)

    def phase_elapsed(self) -> float:
        """Seconds since this phase's schedule started (the run's start, or this ``--restart-schedule``)."""
        return time.time() - (self.phase_start if self.phase_start is not None else self.t_start)

    def keep_going(self) -> bool:
        """Whether to take another step: steps left and time left (rank 0's clock decides for all)."""
        return (self.step - self.step0 < self.config.steps
                and self.dp.decide(self.phase_elapsed() < self.max_s, self.device))

    def validate(self) -> float:
        """The best-model score on the fixed validation segments."""
        from .codec.neural_train import forward_rung_decoder, forward_train
        self.codec.eval()
        with torch.no_grad():
            if self.rung:  # the training objective at that rung
                _, vlogs = forward_rung_decoder(self.codec, self.val, self.rung, **self.loss_weights)
                return vlogs["loss"]
            w7 = self.config.w_mel7  # a run that weighs the 7-scale mel is also chosen by it
            _, vlogs = forward_train(self.codec, self.vq if self.vq.initialized else None, self.val, self.val_nq,
                                     w_mel7=w7)
            return vlogs["mel"] + w7 * vlogs.get("mel7", 0.0)

    def score_base(self) -> None:
        """A fine-tune's released weights are the first candidate: score them and write them to ``--out``."""
        # the best model written is never worse than them on the validation segments (a fine-tune that only
        # hurts leaves the base at --out)
        self.best = self.validate()
        self.save_weights(self.out_path)
        self.log({"step": self.step, self.val_key: round(self.best, 4), "best": round(self.best, 4), "saved": True,
                  "base": True})

    def kmeans_init(self) -> None:
        """Start the quantizer: k-means codebooks from the model's latents (rank 0's, for every worker)."""
        from .codec.neural_train import collect_latents
        codec, vq, config = self.codec, self.vq, self.config
        codec.eval()
        lat = collect_latents(codec, [self.sampler.batch(config.batch).to(self.device)
                                      for _ in range(config.init_batches)])
        t0 = time.time()
        vq.kmeans_init(lat.cpu(), iters=config.kmeans_iters)
        vq.codec.rvq.codebooks.data = vq.codec.rvq.codebooks.to(self.device)
        self.dp.broadcast_(codec.rvq.codebooks, vq.ema_sum, vq.ema_count)  # rank 0's k-means for all
        self.log(f"step {self.step}: k-means init of {codec.n_q} codebooks on {len(lat)} latents "
                 f"in {time.time() - t0:.0f}s")

    def optimise(self) -> tuple[dict, torch.Tensor]:
        """One forward/backward/optimizer step on a fresh batch; returns its logs and the gradient norm."""
        from .codec.neural_train import (
            forward_rung_decoder,
            forward_train,
            sample_n_q,
        )
        codec, vq, config = self.codec, self.vq, self.config
        codec.train()
        wav = self.sampler.batch(config.batch).to(self.device)
        if self.rung:
            loss, logs = forward_rung_decoder(codec, wav, self.rung, **self.loss_weights)
        else:
            nq = sample_n_q(len(wav), codec.ladder_n_q, self.rng, p_full=config.p_full,
                            rung_weights=config.rung_weights)
            loss, logs = forward_train(codec, vq if vq.initialized else None, wav, nq, **self.loss_weights)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dp.average_grads(self.params)
        gn = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if self.dp.on and vq.initialized and not self.rung:
            # EMA sums were all-reduced, so codebooks agree except where a worker restarted dead codes
            # from its own batch: rank 0's state wins
            self.dp.broadcast_(codec.rvq.codebooks, vq.ema_sum, vq.ema_count)
        return logs, gn

    def log_round(self, lr: float, gn: torch.Tensor) -> None:
        """Log the mean of the losses since the last log line, with the schedule and quantizer usage."""
        rec = {k: round(float(np.mean(v)), 4) for k, v in self.logs_acc.items()}
        rec.update(step=self.step, lr=round(lr, 6), gnorm=round(float(gn), 3),
                   min=round((time.time() - self.t_start) / 60, 2))
        if self.vq.initialized and not self.rung:  # (frozen codebooks: nothing to report)
            util = self.vq.utilisation()
            rec["util"] = [round(u, 3) for u in util]
            rec["restarts"] = self.vq.restarts
        self.log(rec)
        self.logs_acc = {}

    def checkpoint_round(self) -> float:
        """Validate, write ``--out`` if the score improved, write the checkpoint; returns the score."""
        vmel = self.validate()
        improved = self.vq.initialized and vmel < self.best
        if improved:
            self.best = vmel
            self.save_weights(self.out_path)
        self.save_ckpt()
        self.log({"step": self.step, self.val_key: round(vmel, 4), "best": round(self.best, 4), "saved": improved})
        return vmel

    def train_step(self) -> None:
        """One training step: learning rate, quantizer start when due, the update, then log/checkpoint/report."""
        config = self.config
        progress = max((self.step - self.step0) / config.steps, self.phase_elapsed() / self.max_s)
        lr = config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in self.opt.param_groups:
            g["lr"] = lr
        if not self.vq.initialized and self.step >= config.warmup_steps:
            self.kmeans_init()
        logs, gn = self.optimise()
        self.step += 1
        for k, v in logs.items():
            self.logs_acc.setdefault(k, []).append(v)
        if self.step % config.log_every == 0:
            self.log_round(lr, gn)
        vmel = None
        if (self.step % config.ckpt_every == 0 or self.step - self.step0 >= config.steps) and self.dp.main:
            vmel = self.checkpoint_round()
        if self.ray_ctx is not None and self.step % config.ckpt_every == 0:
            import ray.train
            ray.train.report({"step": self.step, "loss": logs["loss"], **({"val": vmel} if self.dp.main else {})})

    def finish(self) -> None:
        """Check the replicas stayed identical, write the final checkpoint and weights, log the summary."""
        # the replicas must have stayed identical (weights and codebooks)
        hashes = self.dp.gather(self.codec.checkpoint_hash())
        if len(set(hashes)) != 1:
            raise RuntimeError(f"data-parallel replicas diverged: checkpoint hashes per rank {hashes}")
        if self.dp.on:
            self.log(f"{self.dp.world} workers, replicas identical (checkpoint hash {hashes[0]})")
        # final: always write a checkpoint; the best weights stay at --out
        self.codec.eval()
        if self.dp.main:
            self.save_ckpt()
            if self.vq.initialized and not self.out_path.exists():
                self.save_weights(self.out_path)
            self.save_weights(self.run_dir / "last.pt")
        self.log(f"done: {self.step} steps in {(time.time() - self.t_start) / 60:.1f} min; "
                 f"best val mel {self.best:.4f}")
        if self.logf is not None:
            self.logf.close()


def train_loop(config: TrainConfig | dict) -> None:
    """Runs in the Ray Train worker (given ``TrainConfig.to_dict()``) or directly (``--no-ray``)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    run = _Run(config)
    run.build_model()
    run.prepare_loop(run.start_state())
    if run.fine_tune and run.dp.main:
        run.score_base()
    while run.keep_going():
        run.train_step()
    run.finish()


def default_config(args) -> TrainConfig:
    """The run's settings from the parsed command line (not yet validated: ``main`` does that, after a resume)."""
    return TrainConfig(
        width=args.width, latent_dim=args.latent_dim, dilations=tuple(args.dilations), n_q=args.n_q,
        codebook_size=args.codebook_size, seg_frames=args.seg_frames, batch=args.batch,
        lr=args.lr, steps=args.steps, max_minutes=args.max_minutes, warmup_steps=args.warmup_steps,
        init_batches=args.init_batches, kmeans_iters=args.kmeans_iters,
        w_time=args.w_time, w_mdct=args.w_mdct, log_every=args.log_every, ckpt_every=args.ckpt_every,
        val_segments=args.val_segments, seed=args.seed, threads=args.threads,
        run_dir=str(args.run_dir.resolve()), out=str(args.out.resolve()), resume=args.resume,
        reset_best=args.reset_best, restart_schedule=args.restart_schedule,
        init_from=str(args.init_from.resolve()) if args.init_from else None,
        other_fraction=args.other_fraction, p_full=args.p_full, w_env=args.w_env, w_mel7=args.w_mel7,
        rung_weights=tuple(args.rung_weights) if args.rung_weights else None,
        rung_decoder=args.rung_decoder, rung_extra_blocks=args.rung_extra_blocks,
        rung_ahead_blocks=args.rung_ahead_blocks, pair_search=args.pair_search, keep_codes=args.keep_codes,
        cache=str(args.cache.resolve()), use_ray=not args.no_ray, cpu=args.cpu, workers=args.workers,
    )


# what is trained (and so what the checkpoint's tensors are): fixed for the life of a run
SHAPE_KEYS = ("width", "latent_dim", "dilations", "n_q", "codebook_size", "rung_decoder", "rung_extra_blocks",
              "rung_ahead_blocks", "keep_codes")
# options that belong to this invocation, not to the run (never taken from the checkpoint)
INVOCATION_KEYS = ("resume", "reset_best", "restart_schedule", "run_dir")


def given_options(argv) -> set[str]:
    """The ``dest`` of every option given explicitly in ``argv`` (``None``: ``sys.argv[1:]``)."""
    ap = build_parser()
    for a in ap._actions:
        a.default = argparse.SUPPRESS
    return set(vars(ap.parse_args(argv)))


def resumed_config(config: TrainConfig, given: set[str]) -> TrainConfig:
    """``--resume``: the settings saved in ``RUN_DIR/ckpt.pt``, with those options the command line gives
    (``given``: their ``TrainConfig`` field names) taken from ``config``. Without a checkpoint, or one from before
    settings were saved, ``config`` as is. Raises ValueError when a given option changes what is trained."""
    ckpt = Path(config.run_dir) / "ckpt.pt"
    if not ckpt.exists():
        return config
    import torch
    saved = torch.load(ckpt, map_location="cpu", weights_only=False).get("config")
    if not saved:
        return config
    names = {f.name for f in fields(TrainConfig)}
    given = {"use_ray" if g == "no_ray" else g for g in given}
    mine = {k: getattr(config, k) for k in (*INVOCATION_KEYS, *sorted(g for g in given if g in names))}
    changed = [k for k in SHAPE_KEYS if k in given and not _same(saved.get(k), mine[k])]
    if changed:
        raise ValueError(f"{ckpt}: --resume cannot change {', '.join('--' + k.replace('_', '-') for k in changed)} "
                         f"(the checkpoint has {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); start a new "
                         f"--run-dir, or --init-from a weights file to fine-tune")
    # the checkpoint's settings (a key it lacks: this command line's), then this invocation's and the given ones
    merged = TrainConfig.from_dict({**config.to_dict(), **saved})
    return replace(merged, **mine, resume_changes={  # logged by the loop
        k: v for k, v in mine.items() if k not in INVOCATION_KEYS and not _same(saved.get(k), v)})


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON-ish: tuples load as lists)
    return norm(a) == norm(b)


def combine_rung_decoders(base: Path, rung_files: list[Path], out: Path, log=print) -> Path:
    """Write ``out``: the weights ``base`` plus the rung decoders trained on it (``--rung-decoder`` runs'
    weights files), rung decoders as float16; a rung decoder the base already has is replaced (a run
    ``--init-from`` a release retrains that release's own). Refuses a rung file whose other tensors differ
    from ``base`` (trained from other weights: its decoder would not match these codes) or that carries no
    rung decoder."""
    def rung_of(key: str) -> int | None:  # rung_decoders.<K>.* -> K
        return int(key.split(".")[1]) if key.startswith("rung_decoders.") else None

    from .codec.registry import read_weights
    b = read_weights(base)
    model = dict(b["model"])
    rungs = {rung_of(k) for k in model} - {None}
    for f in rung_files:
        r = read_weights(f)["model"]
        extra = {k: v for k, v in r.items() if rung_of(k) is not None}
        if "rvq.pair_search_k" in r:  # the rung was trained on jointly searched codes: encode them so
            if int(model.get("rvq.pair_search_k", r["rvq.pair_search_k"])) != int(r["rvq.pair_search_k"]):
                raise ValueError(f"{f}: trained with another --pair-search than the other rung files")
            model["rvq.pair_search_k"] = r["rvq.pair_search_k"]
        if not extra:
            raise ValueError(f"{f}: no rung decoder in it (train one with --rung-decoder K --init-from {base})")
        mine = {rung_of(k) for k in extra}  # the rungs this file brings replace the base's own
        model = {k: v for k, v in model.items() if rung_of(k) not in mine}
        for k, v in b["model"].items():
            if rung_of(k) not in mine and (k not in r or not torch.equal(r[k], v)):
                raise ValueError(f"{f}: tensor {k} differs from {base}: it was not trained from those weights "
                                 f"(--init-from {base})")
        model.update(shipping_state(extra))
        rungs |= mine
    cfg = dict(b.get("config", {}))
    cfg["rung_decoders"] = sorted(rungs)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "config": cfg, "step": b.get("step")}, str(out) + ".tmp")
    os.replace(str(out) + ".tmp", out)
    log(f"{out}: {base} + rung decoders {sorted(rungs)} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def build_parser() -> argparse.ArgumentParser:
    D = TrainConfig  # the run's defaults: the options of its fields default to them
    ap = argparse.ArgumentParser(prog="audioarc train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder or URL prefix (s3://...) of audio (default: the "
                    "Debian corpus)")
    ap.add_argument("--cache", type=Path, default=Path(D.cache))
    ap.add_argument("--run-dir", type=Path, default=Path(D.run_dir))
    ap.add_argument("--out", type=Path, default=Path(D.out))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", type=Path, default=D.init_from, help="start from these released weights "
                    "(e.g. the shipped neural_rvq.pt) with a fresh optimizer: a fine-tune")
    ap.add_argument("--reset-best", action="store_true", help="on resume, forget the best validation score "
                    "(after changing loss weights)")
    ap.add_argument("--restart-schedule", action="store_true", help="on resume, start a new warm-restart "
                    "cosine lr phase of --steps / --max-minutes from the checkpoint (a fine-tune)")
    ap.add_argument("--no-ray", action="store_true", help="run the loop in-process instead of Ray Train")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--threads", type=int, default=D.threads, help="torch threads per worker")
    ap.add_argument("--workers", type=int, default=D.workers, help="data-parallel Ray Train workers (one GPU each "
                    "when the cluster has GPUs); each trains on --batch segments, so the global batch is workers x "
                    "batch")
    ap.add_argument("--worker-cpus", type=float, default=None, help="CPUs Ray reserves per worker "
                    "(default: --threads)")
    ap.add_argument("--steps", type=int, default=D.steps)
    ap.add_argument("--max-minutes", type=float, default=D.max_minutes)
    ap.add_argument("--batch", type=int, default=D.batch)
    ap.add_argument("--seg-frames", type=int, default=D.seg_frames)
    ap.add_argument("--lr", type=float, default=D.lr)
    ap.add_argument("--width", type=int, default=D.width)
    ap.add_argument("--latent-dim", type=int, default=D.latent_dim)
    ap.add_argument("--dilations", type=int, nargs="+", default=list(D.dilations))
    ap.add_argument("--n-q", type=int, default=D.n_q)
    ap.add_argument("--codebook-size", type=int, default=D.codebook_size)
    ap.add_argument("--warmup-steps", type=int, default=D.warmup_steps, help="autoencoder steps before the RVQ is on")
    ap.add_argument("--init-batches", type=int, default=D.init_batches)
    ap.add_argument("--kmeans-iters", type=int, default=D.kmeans_iters)
    ap.add_argument("--w-time", type=float, default=D.w_time, help="weight of the time-domain L1 loss")
    ap.add_argument("--w-mdct", type=float, default=D.w_mdct, help="weight of the companded-MDCT L1 loss "
                    "(the multi-scale log-mel loss has weight 1)")
    ap.add_argument("--w-env", type=float, default=D.w_env, help="weight of the band-envelope correlation "
                    "(intelligibility) loss")
    ap.add_argument("--w-mel7", type=float, default=D.w_mel7, help="weight of the 7-scale magnitude log-mel loss "
                    "(metrics.mel7_loss: 32-2048 point STFTs, 5-320 bands); the best model is then chosen by the "
                    "3-scale mel plus this weight times the 7-scale one")
    ap.add_argument("--other-fraction", type=float, default=D.other_fraction, help="share of training segments "
                    "drawn from non-music (speech, ambient) files")
    ap.add_argument("--p-full", type=float, default=D.p_full, help="quantizer dropout: share of examples "
                    "trained with the full stack")
    ap.add_argument("--rung-weights", type=float, nargs="+", default=D.rung_weights, help="quantizer dropout: "
                    "relative weight of each ladder rung (1.5 3 6 12 24 kbps), default uniform")
    ap.add_argument("--rung-decoder", type=int, default=D.rung_decoder, metavar="K", help="train only a dedicated "
                    "decoder for exactly K stages (encoder and codebooks frozen; needs --init-from)")
    ap.add_argument("--rung-extra-blocks", type=int, default=D.rung_extra_blocks, metavar="N", help="with "
                    "--rung-decoder: deepen that decoder by N identity-initialised residual blocks (dilations "
                    "doubling on: more look-back)")
    ap.add_argument("--rung-ahead-blocks", type=int, default=D.rung_ahead_blocks, metavar="N", help="with "
                    "--rung-decoder: give that decoder N identity-initialised symmetric blocks, 2**N - 1 frames of "
                    "look-ahead (every file then stores that many more code frames)")
    ap.add_argument("--pair-search", type=int, default=D.pair_search, metavar="K", help="with --rung-decoder 2: encode "
                    "the two stages jointly over the K nearest first-stage entries (ResidualVQ.set_pair_search; "
                    "stored in the weights, 0 = greedy) and train the decoder on those codes")
    ap.add_argument("--keep-codes", type=int, default=D.keep_codes, metavar="K", help="with --init-from: fine-tune the "
                    "shared decoder and the codebooks after the first K with the encoder, the first K codebooks "
                    "and the rung decoders frozen, so the codes of the first K stages (and the rung decoders "
                    "reading them, e.g. a 1.5 kbps one with K=2) stay exactly those of WEIGHTS")
    ap.add_argument("--log-every", type=int, default=D.log_every)
    ap.add_argument("--ckpt-every", type=int, default=D.ckpt_every)
    ap.add_argument("--val-segments", type=int, default=D.val_segments)
    ap.add_argument("--max-speech-files", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=D.seed)
    ap.add_argument("--combine", type=Path, nargs="+", default=None, metavar=("BASE", "RUNG_WEIGHTS"),
                    help="no training: write --out = BASE weights + the rung decoders of RUNG_WEIGHTS files "
                    "(from --rung-decoder runs on BASE)")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.combine:
        if len(args.combine) < 2:
            ap.error("--combine needs BASE and at least one rung-decoder weights file")
        combine_rung_decoders(args.combine[0], args.combine[1:], args.out)
        return
    config = default_config(args)
    if args.resume:
        config = resumed_config(config, given_options(argv))
    try:
        config.validate()
    except ConfigError as e:  # a usage error, as argparse's own
        ap.error(str(e))
    build_cache(args.data, Path(config.cache), max_speech_files=args.max_speech_files)
    if not config.use_ray:  # (on --resume: as the run was started, unless --no-ray is given)
        train_loop(config)
        return
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    threads, workers = config.threads, config.workers
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, threads), include_dashboard=False, log_to_driver=True)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0)) and not config.cpu
    trainer = TorchTrainer(
        train_loop, train_loop_config=config.to_dict(),  # the plain dict Ray Train expects; the loop reads it back
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": args.worker_cpus or threads,
                                                           **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name="neural_rvq", storage_path=str((args.run_dir / "ray").resolve())),
    )
    result = trainer.fit()
    if result.error:
        raise result.error


if __name__ == "__main__":
    main()
