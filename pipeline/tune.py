"""``audioarc tune``: fine-tune the neural codec on a library's own audio; keep the result only if it beats the base on the library's held-out files."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

RATE = 24000  # the neural codec's rate: held-out excerpts are resampled to it
REFUSED = "refused: tuned weights are not better, keeping the base"
STOI_TOLERANCE = 0.01  # better also means: mean STOI (speech-like held-out files) at most this much lower
FINE_TUNE_LR = 2e-4  # peak learning rate of the fine-tune (the from-scratch 1e-3 first undoes the release)
# the release's own objective (its model card): companded-MDCT and band-envelope (intelligibility) terms beside
# the mel loss, rungs weighted toward the low ones; a fine-tune on the mel loss alone trades STOI for mel
RELEASE_RECIPE = ("--w-mdct", "4", "--w-env", "2", "--p-full", "0.2", "--rung-weights", "3", "3", "2", "1.5", "1")


@dataclass(frozen=True)
class TuneConfig:
    """One ``audioarc tune`` run, validated once on construction (ConfigError naming the option)."""

    src: str
    minutes: float
    base: str = "neural_rvq"
    base_weights: str | None = None  # default: the shipped release of ``base``
    out: str | None = None  # default: ./tuned-<checkpoint hash>.pt
    heldout_fraction: float = 0.2
    max_files: int = 200
    seed: int = 0
    eval_seconds: float = 10.0
    visqol: bool = False
    workers: int = 1
    threads: int = 1
    ray: bool | None = None  # None: Ray Train only with more than one worker
    cpu: bool = False
    force: bool = False  # write the tuned weights even when they are not better (their report says so)
    work_dir: str | None = None  # parent of the run's scratch folder (default: the output's folder)
    keep_work: bool = False
    # passed to the trainer (pipeline/train.py) when given (None: the trainer's defaults)
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    seg_frames: int | None = None
    val_segments: int | None = None
    ckpt_every: int | None = None

    def __post_init__(self):
        if self.base != "neural_rvq":
            raise ConfigError(f"--base {self.base}: tune fine-tunes the trained codec neural_rvq only")
        if not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise ConfigError(f"--minutes {self.minutes}: must be a positive number of minutes of training")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"--heldout-fraction {self.heldout_fraction}: must be between 0 and 1 (exclusive)")
        if self.max_files < 2:
            raise ConfigError(f"--max-files {self.max_files}: needs at least 2 (one to tune on, one held out)")
        if not self.eval_seconds > 0:
            raise ConfigError(f"--eval-seconds {self.eval_seconds}: must be positive")
        if self.workers < 1 or self.threads < 1:
            raise ConfigError("--workers and --threads must be at least 1")
        if self.workers > 1 and self.ray is False:
            raise ConfigError("--workers N > 1 trains through Ray Train: drop --no-ray")
        for name in ("steps", "batch", "seg_frames", "val_segments", "ckpt_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {v}: must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr {self.lr}: must be positive")
        if self.base_weights is not None and not Path(self.base_weights).exists():
            raise ConfigError(f"--base-weights {self.base_weights}: no such file")

    @property
    def use_ray(self) -> bool:
        return self.workers > 1 if self.ray is None else self.ray

    def base_path(self) -> Path:
        from .codec import registry
        return Path(self.base_weights) if self.base_weights else registry.spec(self.base).default_weights


# -- the library: a sample, split into a tuning and a held-out part by name -------------------------------------
def path_unit(rel: str) -> float:
    """``rel`` (a path relative to the library root) as a number in [0, 1), from its hash: the split's key."""
    return int(hashlib.sha1(rel.encode()).hexdigest()[:12], 16) / 16 ** 12


def stratum(rel: str, size: int) -> tuple[str, int]:
    """(top folder, size class by factors of 4): the strata the sample keeps in proportion."""
    top = rel.split("/", 1)[0] if "/" in rel else ""
    return top, int(math.log(max(size, 1), 4))


def stratified_sample(items: list[tuple[str, object]], sizes: list[int], n: int, seed: int) -> list:
    """Up to ``n`` of ``items`` (``(rel, obj)``), each stratum (``stratum``) represented in proportion to its
    share of the files (largest remainders; every stratum once first when ``n`` allows), drawn with ``seed``;
    returned sorted by relative path."""
    if len(items) <= n:
        return sorted(items, key=lambda t: t[0])
    groups: dict[tuple, list] = {}
    for it, size in zip(items, sizes):
        groups.setdefault(stratum(it[0], size), []).append(it)
    keys = sorted(groups)
    for k in keys:
        random.Random(f"{seed}:{k}").shuffle(groups[k])
    quota = {k: n * len(groups[k]) / len(items) for k in keys}
    take = {k: int(quota[k]) for k in keys}
    if n >= len(keys):
        for k in keys:
            take[k] = max(take[k], 1)
    while sum(take.values()) > n:  # (the minimum of one per stratum overshot): trim the most over quota
        k = max(keys, key=lambda k: (take[k] - quota[k], take[k]))
        take[k] -= 1
    for k in sorted(keys, key=lambda k: (take[k] - quota[k], k)):  # largest remainders first
        if sum(take.values()) >= n:
            break
        if take[k] < len(groups[k]):
            take[k] += 1
    return sorted((it for k in keys for it in groups[k][:take[k]]), key=lambda t: t[0])


def split(sample: list[tuple[str, object]], fraction: float) -> tuple[list, list]:
    """(tuning, held-out) by ``path_unit`` of the relative path: a file's part depends on its name only. Each part
    gets at least one file (the lowest / highest hash) when the hash alone leaves one empty."""
    if len(sample) < 2:
        raise ConfigError(f"tune needs at least 2 audio files (one to tune on, one held out); found {len(sample)}")
    order = sorted(sample, key=lambda t: path_unit(t[0]))
    k = sum(path_unit(rel) < fraction for rel, _ in sample)
    k = min(max(k, 1), len(sample) - 1)
    held, tune = order[:k], order[k:]
    return sorted(tune, key=lambda t: t[0]), sorted(held, key=lambda t: t[0])


def list_library(src: str) -> list[tuple[str, object]]:
    """``(relative path, storage.ObjectInfo)`` of every audio file under ``src`` (folder or URL prefix)."""
    from . import audio, storage
    return [(storage.relpath(src, o.uri), o) for o in storage.walk_files(src, audio.AUDIO_EXTENSIONS)]


def stage_tuning(tune: list[tuple[str, object]], data_dir: Path, log=print) -> list[Path]:
    """The tuning files under ``data_dir`` at their relative paths (symlinks to local files, copies of remote
    ones): the folder the trainer reads. A name the trainer's own held-out split (``corpus.is_heldout``) would
    drop gets a ``~k`` suffix, so it trains on every tuning file (and on nothing else)."""
    from . import corpus, storage
    staged = []
    for rel, obj in tune:
        dest = data_dir / rel
        stem, ext = dest.stem, dest.suffix
        k = 0
        while corpus.is_heldout(dest) or dest.exists():
            k += 1
            dest = dest.with_name(f"{stem}~{k}{ext}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if storage.is_local(obj.uri):
            src = os.path.abspath(storage.local_path(obj.uri))
            try:
                os.symlink(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        else:
            with storage.open_input(obj.uri) as (local, _):
                shutil.copyfile(local, dest)
        staged.append(dest)
    log(f"tune: staged {len(staged)} tuning files under {data_dir}")
    return staged


# -- training: pipeline/train.py from the base release ---------------------------------------------------------
def trainer_argv(cfg: TuneConfig, data_dir: Path, work: Path, candidate: Path) -> list[str]:
    """The trainer's (``pipeline/train.py``) command line of the fine-tune: from the base, on ``data_dir``, a fresh cache and
    run folder under ``work``, best weights to ``candidate``."""
    argv = ["--data", str(data_dir), "--init-from", str(cfg.base_path()), "--max-minutes", f"{cfg.minutes:g}",
            "--out", str(candidate), "--run-dir", str(work / "run"), "--cache", str(work / "train_24k.npz"),
            "--threads", str(cfg.threads), "--workers", str(cfg.workers), "--seed", str(cfg.seed)]
    for name in ("steps", "batch", "lr", "seg_frames", "val_segments", "ckpt_every"):
        v = getattr(cfg, name)
        if v is not None:
            argv += [f"--{name.replace('_', '-')}", f"{v:g}" if isinstance(v, float) else str(v)]
    if cfg.lr is None:
        argv += ["--lr", f"{FINE_TUNE_LR:g}"]
    if cfg.base == "neural_rvq":
        argv += list(RELEASE_RECIPE)
    if cfg.ckpt_every is None and cfg.steps is None:  # a time budget: score (and keep the best) often
        argv += ["--ckpt-every", "50"]
    if not cfg.use_ray:
        argv.append("--no-ray")
    if cfg.cpu:
        argv.append("--cpu")
    return argv


# -- evaluation on the held-out part -----------------------------------------------------------------------------
def load_heldout(held: list[tuple[str, object]], seconds: float, log=print) -> list[dict]:
    """Each held-out file's loudest ``seconds`` (``audio.pick_segment``) at 24 kHz mono, peak at most
    0.99, and whether it is speech-like (STOI is scored on those); silent or unreadable files are skipped."""
    from . import audio, quality, storage
    refs = []
    for rel, obj in held:
        try:
            with storage.open_input(obj.uri) as (local, _):
                x, _ = audio.load(local, RATE, mono=True)
        except Exception as e:  # noqa: BLE001 - a broken file is skipped, not fatal
            log(f"tune: skip held-out {rel}: {e}")
            continue
        seg = audio.pick_segment(x[0], int(seconds * RATE)).astype(np.float32)
        if len(seg) < RATE // 4 or np.sqrt(np.mean(seg ** 2)) < 1e-3:
            log(f"tune: skip held-out {rel}: silent or shorter than 0.25 s")
            continue
        peak = float(np.abs(seg).max())
        if peak > 0.99:
            seg = seg * (0.99 / peak)
        refs.append({"name": rel, "audio": seg, "speech": quality.speech_like(seg[None], RATE)})
    return refs


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def evaluate(codec, refs: list[dict], visqol: bool = False, device: str = "cpu") -> dict[float, dict]:
    """kbps -> mean ``mel`` (log-mel distance, every file), ``stoi`` (speech-like files; None without any) and
    ``visqol`` (when asked for and installed) of ``codec`` at each rung of its ladder, encoding and decoding each
    reference. A non-finite output or score (weights that blew up) makes that rung's mel distance infinite."""
    from .codec import metrics as M
    from .codec.windows import decode_array, encode_array
    out = {}
    for kbps, n_q in sorted(codec.ladder().items()):
        mels, stois, visqols = [], [], []
        for r in refs:
            x = r["audio"]
            codes = encode_array(codec, x[None], n_q, device=device)
            y = decode_array(codec, codes, len(x), device=device)[0]
            if not np.all(np.isfinite(y)):  # weights that blew up: no score can redeem them
                mels.append(math.inf)
                continue
            m = M.mel_distance(x, y, RATE)
            mels.append(m if math.isfinite(m) else math.inf)
            if r["speech"]:
                stois.append(M.stoi(x, y, RATE))
            if visqol:
                visqols.append(M.visqol(x, y, RATE))
        out[kbps] = {"n_q": n_q, "mel": float(np.mean(mels)), "stoi": _mean(stois),
                     "visqol": _mean(visqols) if visqol else None}
    return out


def lowest_matching_rung(base: dict[float, dict], tuned: dict[float, dict], ref_kbps: float = 6.0) -> float | None:
    """The lowest rung at which ``tuned``'s mel distance is at most ``base``'s at ``ref_kbps``."""
    if ref_kbps not in base:
        return None
    target = base[ref_kbps]["mel"]
    hits = [k for k in sorted(tuned) if tuned[k]["mel"] <= target]
    return hits[0] if hits else None


# -- the run -----------------------------------------------------------------------------------------------------
def run_tune(cfg: TuneConfig, log=print) -> dict:
    """List, sample and split ``cfg.src``; fine-tune from the base on the tuning part for ``cfg.minutes``; score base
    and tuned on the held-out part at every rung; write the tuned weights only if their mean mel distance over the
    rungs is lower than the base's and their mean STOI on speech-like files no more than ``STOI_TOLERANCE`` lower
    (or ``cfg.force``), and the report beside them (``WEIGHTS`` with ``.json``) either
    way. Returns the report (``kept``: the weights were written)."""
    import torch


    from . import train
    from .codec import registry
    t0 = time.time()
    library = list_library(cfg.src)
    if not library:
        raise ConfigError(f"{cfg.src}: no audio files to tune on")
    sample = stratified_sample(library, [o.size for _, o in library], cfg.max_files, cfg.seed)
    tune, held = split(sample, cfg.heldout_fraction)
    log(f"tune: {len(library)} audio files, sampled {len(sample)}: {len(tune)} to tune on, {len(held)} held out")
    out_dir = Path(cfg.out).resolve().parent if cfg.out else Path.cwd()
    parent = Path(cfg.work_dir) if cfg.work_dir else out_dir
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".audioarc-tune-", dir=parent)).resolve()  # fresh: cache, run, data
    try:
        data_dir = work / "data"
        stage_tuning(tune, data_dir, log)
        candidate = work / "candidate.pt"
        argv = trainer_argv(cfg, data_dir, work, candidate)
        log(f"tune: audioarc train {' '.join(argv)}")
        t_train = time.time()
        train.main(argv)
        train_s = time.time() - t_train
        if not candidate.exists():
            raise ConfigError(f"the fine-tune wrote no weights (see {work / 'run' / 'train.log'})")
        torch.set_num_threads(cfg.threads)
        device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
        refs = load_heldout(held, cfg.eval_seconds, log)
        if not refs:
            raise ConfigError("none of the held-out files could be scored (all unreadable or silent); "
                              "raise --heldout-fraction or --max-files")
        base = registry.load(cfg.base, cfg.base_path(), device=device)
        tuned = registry.load(cfg.base, candidate, device=device)
        log(f"tune: scoring base and tuned on {len(refs)} held-out excerpts "
            f"({sum(r['speech'] for r in refs)} speech-like)")
        visqol = cfg.visqol
        if visqol:
            from .codec.metrics import visqol_available
            if not visqol_available():
                log("tune: --visqol: visqol-python is not installed, skipping ViSQOL")
                visqol = False
        sb = evaluate(base, refs, visqol, device)
        st = evaluate(tuned, refs, visqol, device)
        mean_b = float(np.mean([v["mel"] for v in sb.values()]))
        mean_t = float(np.mean([v["mel"] for v in st.values()]))
        stoi_b = _mean(v["stoi"] for v in sb.values())
        stoi_t = _mean(v["stoi"] for v in st.values())
        stoi_ok = stoi_b is None or (stoi_t is not None and stoi_t >= stoi_b - STOI_TOLERANCE)
        same = tuned.checkpoint_hash() == base.checkpoint_hash()  # the fine-tune never beat its starting point
        better = not same and math.isfinite(mean_t) and mean_t < mean_b and stoi_ok
        tuned_hash = tuned.checkpoint_hash()
        out = Path(cfg.out) if cfg.out else Path.cwd() / f"tuned-{tuned_hash[:12]}.pt"
        keep = better or cfg.force
        rungs = []
        for k in sorted(sb):
            row = {"kbps": k, "n_q": sb[k]["n_q"], "base_mel": sb[k]["mel"], "tuned_mel": st[k]["mel"],
                   "base_stoi": sb[k]["stoi"], "tuned_stoi": st[k]["stoi"]}
            if visqol:
                row.update(base_visqol=sb[k]["visqol"], tuned_visqol=st[k]["visqol"])
            rungs.append(row)
        try:
            steps = int(torch.load(candidate, map_location="cpu", weights_only=True).get("step") or 0)
        except Exception:  # noqa: BLE001 - the count is informative only
            steps = None
        report = {
            "kept": keep, "better": better, "same_as_base": same, "weights": str(out) if keep else None,
            "report": str(out.with_suffix(".json")),
            "message": (f"kept: {out}" if better else (f"forced: {out} (not better)" if keep else
                        REFUSED + (" (the fine-tune found nothing better than the base on its own validation "
                                   "segments)" if same else ""))),
            "src": cfg.src, "codec": cfg.base, "base_weights": str(cfg.base_path()),
            "base_hash": base.checkpoint_hash(), "tuned_hash": tuned_hash,
            "mean_mel": {"base": mean_b, "tuned": mean_t}, "mean_stoi": {"base": stoi_b, "tuned": stoi_t},
            "tuned_matches_base_6kbps_at_kbps": lowest_matching_rung(sb, st),
            "rungs": rungs,
            "files": {"library": len(library), "sampled": len(sample), "tuning": [r for r, _ in tune],
                      "heldout": [r for r, _ in held], "scored": [r["name"] for r in refs],
                      "speech_like": [r["name"] for r in refs if r["speech"]]},
            "train": {"minutes_budget": cfg.minutes, "steps": steps, "wall_seconds": round(train_s, 1),
                      "workers": cfg.workers, "ray": cfg.use_ray, "argv": argv},
            "eval_seconds": cfg.eval_seconds, "device": device, "wall_seconds": None,
            "work_dir": str(work) if cfg.keep_work else None,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        if keep:
            shutil.copyfile(candidate, str(out) + ".tmp")
            os.replace(str(out) + ".tmp", out)
        report["wall_seconds"] = round(time.time() - t0, 1)
        report = _finite(report)
        Path(report["report"]).write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _finite(obj):
    """``obj`` with non-finite floats as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_table(report: dict) -> str:
    """The report as the table ``audioarc tune`` prints (rung: base / tuned mel, base / tuned STOI)."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    vis = any("base_visqol" in r for r in report["rungs"])
    head = f"{'rung':>10}  {'base mel':>9}  {'tuned mel':>9}  {'base STOI':>9}  {'tuned STOI':>10}"
    head += f"  {'base ViSQOL':>11}  {'tuned ViSQOL':>12}" if vis else ""
    lines = [head]
    for r in report["rungs"]:
        line = (f"{r['kbps']:>5g} kbps  {f(r['base_mel']):>9}  {f(r['tuned_mel']):>9}  {f(r['base_stoi']):>9}  "
                f"{f(r['tuned_stoi']):>10}")
        if vis:
            line += f"  {f(r.get('base_visqol')):>11}  {f(r.get('tuned_visqol')):>12}"
        lines.append(line)
    m = report["mean_mel"]
    ms = report.get("mean_stoi") or {}
    lines.append(f"{'mean':>10}  {f(m['base']):>9}  {f(m['tuned']):>9}  {f(ms.get('base')):>9}  {f(ms.get('tuned')):>10}")
    at = report["tuned_matches_base_6kbps_at_kbps"]
    lines.append(f"tuned matches the base's 6 kbps mel distance from {at:g} kbps" if at is not None
                 else "tuned never matches the base's 6 kbps mel distance")
    fl = report["files"]
    lines.append(f"{len(fl['tuning'])} files tuned on, {len(fl['scored'])} held out scored "
                 f"({len(fl['speech_like'])} speech-like); {report['train']['steps']} steps in "
                 f"{report['train']['wall_seconds']:.0f} s")
    lines.append(report["message"] + f"; report: {report['report']}")
    return "\n".join(lines)
