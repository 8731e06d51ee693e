"""Where codec actors run and how they feed their device.

Pure functions (no Ray, no CUDA needed) so the GPU decisions are unit-tested on CPU-only machines:

* ``plan_actors``: GPU actors (``num_gpus``, fractional packs several per card) when the cluster has GPUs or
  ``--gpus-per-actor`` is given, CPU actors otherwise; pool bounds for Ray Data's autoscaling actor pool
  (``ActorPoolStrategy(min_size, max_size)``); windows per forward pass.
* ``resolve_device``: what a codec actor really uses once it is placed (fails clearly when a GPU actor
  lands on a node without a usable CUDA device instead of silently running on CPU).
* ``to_device``: pinned host memory + non-blocking copy on CUDA, zero-copy ``from_numpy`` on CPU.
* ``autocast``: optional bf16/fp16 autocast on CUDA only; on CPU it is always off (fp32), whatever is asked.
* ``strict_fp32``: fp32 on CUDA means fp32 (no TF32), so GPU and CPU encodes of one input agree.
* ``cuda_available``: whether torch sees a GPU, answered without importing torch on a machine with none.
"""
from __future__ import annotations

import contextlib
import glob
import math
from dataclasses import asdict, dataclass

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
# CPU actors: one window per forward pass. Measured (neural_rvq, 1 thread, 30 s windows): batch 4 encodes at
# 125x realtime, batch 1 at 172x (activations of 4 windows spill out of the cache); end to end, 32 x 3 min:
# 1 actor 89x -> 170x, 2 actors 114x -> 257x (deploy/SCALING.md)
CPU_BATCH_WINDOWS = 1
GPU_BATCH_WINDOWS = 64  # GPU actors: many windows per forward pass (30 s windows: ~32 min of audio per pass)
CPU_PER_CODEC_ACTOR = 0.5  # logical CPUs a CPU codec actor reserves (decode tasks take 0.5 too)
CPU_PER_GPU_ACTOR = 1.0  # a GPU actor still needs a core to feed the card (pack codes, pin, copy)


@dataclass(frozen=True)
class ActorPlan:
    device: str  # "cuda" or "cpu"
    gpus_per_actor: float
    cpus_per_actor: float
    min_actors: int
    max_actors: int
    batch_windows: int
    precision: str

    def remote_args(self) -> dict:
        """Resources of one codec actor for ``map_batches(..., **remote_args)``."""
        if self.device == "cuda":
            return {"num_gpus": self.gpus_per_actor, "num_cpus": self.cpus_per_actor}
        return {"num_cpus": self.cpus_per_actor}

    def to_json(self) -> dict:
        return asdict(self)


def plan_actors(resources: dict, actors: int | None = None, gpus_per_actor: float | None = None,
                min_actors: int | None = None, max_actors: int | None = None, batch_windows: int | None = None,
                precision: str = "fp32") -> ActorPlan:
    """Decide the codec actor pool from the cluster's resources (``ray.cluster_resources()``) and options.

    * device: CUDA when ``gpus_per_actor`` > 0, given or defaulted to 1 when the cluster has GPUs now; an
      explicit ``--gpus-per-actor`` also works on a cluster whose GPU group has scaled to zero (the autoscaler
      adds GPU nodes for the pending actors). ``--gpus-per-actor 0`` forces CPU actors on a GPU cluster.
    * pool: ``--actors N`` fixes it at N; otherwise 1 per GPU slot (``GPUs / gpus_per_actor``, e.g. 4 per card
      at 0.25) or one CPU actor per CPU (1 torch thread each;
      measured on 2 cores: 2 actors encode 1.65x faster than 1 on a 96-min corpus); ``--min-actors/--max-actors`` override either bound (autoscaling).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    gpus = float(resources.get("GPU", 0) or 0)
    cpus = float(resources.get("CPU", 1) or 1)
    gpa = float(gpus_per_actor) if gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    if gpa < 0:
        raise ConfigError(f"--gpus-per-actor must be >= 0, got {gpa:g}")
    if gpa > 1 and not gpa.is_integer():
        raise ConfigError(f"--gpus-per-actor above 1 must be a whole number (Ray's rule), got {gpa:g}")
    device = "cuda" if gpa > 0 else "cpu"
    if device == "cuda":
        slots = int(math.floor(gpus / gpa + 1e-9)) if gpus else 0
        default_n = max(1, slots)
    else:
        default_n = max(1, int(cpus))
    if actors is not None and actors < 1:
        raise ConfigError("--actors must be >= 1")
    lo = min_actors if min_actors is not None else (actors if actors is not None else 1)
    hi = max_actors if max_actors is not None else (actors if actors is not None else default_n)
    if lo < 1 or hi < 1:
        raise ConfigError("--min-actors and --max-actors must be >= 1")
    if lo > hi:
        if min_actors is not None and max_actors is not None:
            raise ConfigError(f"--min-actors ({lo}) must not exceed --max-actors ({hi})")
        if min_actors is not None:
            hi = lo  # an explicit floor above the default ceiling raises the ceiling
        else:
            lo = hi  # an explicit ceiling below the floor lowers the floor
    bw = batch_windows if batch_windows is not None else (GPU_BATCH_WINDOWS if device == "cuda"
                                                          else CPU_BATCH_WINDOWS)
    if bw < 1:
        raise ConfigError("--batch-windows must be >= 1")
    return ActorPlan(device=device, gpus_per_actor=gpa if device == "cuda" else 0.0,
                     cpus_per_actor=CPU_PER_GPU_ACTOR if device == "cuda" else CPU_PER_CODEC_ACTOR,
                     min_actors=lo, max_actors=hi, batch_windows=bw,
                     precision=precision if device == "cuda" else "fp32")


# device nodes without which no CUDA (NVIDIA, or ROCm's HIP, or WSL's GPU paravirtualisation) can be seen
GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def cuda_available(nodes: tuple[str, ...] = GPU_DEVICE_NODES) -> bool:
    """``torch.cuda.is_available()``, except that a machine with none of the GPU device ``nodes`` answers False
    without importing torch (~1 s a process on this VM): choosing the executor, or a lean command, need not
    load it."""
    if not any(glob.glob(p) for p in nodes):
        return False
    import torch
    return torch.cuda.is_available()


def resolve_device(requested: str, cuda_available: bool | None = None) -> str:
    """The device a codec actor uses: ``requested`` if usable, else a clear error (never a silent fallback)."""
    if requested == "cpu":
        return "cpu"
    if not requested.startswith("cuda"):
        raise ConfigError(f"unknown codec device {requested!r}")
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise ConfigError("a GPU codec actor was placed on a node where torch sees no CUDA device "
                          "(CPU-only torch wheel, or no driver); install the CUDA torch build in the image "
                          "or pass --gpus-per-actor 0 for CPU actors")
    return "cuda"


def strict_fp32(device: str, precision: str) -> bool:
    """For ``fp32`` on CUDA, turn off TF32 (cuDNN allows it for convolutions by default; it keeps 10 mantissa
    bits, and bf16's 7 already flip 42 % of neural_rvq's codes, SCALING.md), so a GPU encode agrees with a
    CPU encode of the same input except at float-summation near-ties. Returns whether it changed anything."""
    if precision != "fp32" or not device.startswith("cuda"):
        return False
    import torch
    flags = tf32_flags()
    for f in flags:
        f.fp32_precision = "ieee"
    if not flags:  # torch before the fp32_precision API (mixing the two APIs is an error in newer ones)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return True


def tf32_flags() -> list:
    """torch's per-backend ``fp32_precision`` settings (cuBLAS matmul, cuDNN conv and RNN), [] on old torch."""
    import torch
    out = [getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.cudnn, "conv", None),
           getattr(torch.backends.cudnn, "rnn", None)]
    return [f for f in out if f is not None and hasattr(f, "fp32_precision")]


def autocast_dtype(device: str, precision: str):
    """The autocast dtype, or None for fp32. CPU is always fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}")
    if precision == "fp32" or not device.startswith("cuda"):
        return None
    import torch
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: str, precision: str, allow_cpu: bool = False):
    """Context manager for the codec forward pass: autocast on CUDA for bf16/fp16, nothing otherwise.

    ``allow_cpu`` exists only for the fidelity benchmark (CPU autocast to preview reduced-precision effects).
    """
    import torch
    if allow_cpu and device == "cpu" and precision != "fp32":
        return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def to_device(x, device: str):
    """numpy array -> tensor on ``device``: pinned host memory and an async copy for CUDA."""
    import torch
    t = torch.from_numpy(x)
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t
