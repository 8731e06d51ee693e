"""Codec actor placement and the GPU feed path, exercised on CPU (no GPU needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import cluster, placement
from pipeline.cli import build_parser
from pipeline.errors import ConfigError


def test_cpu_cluster_gets_cpu_actors():
    p = placement.plan_actors({"CPU": 8})
    assert (p.device, p.gpus_per_actor, p.min_actors, p.max_actors) == ("cpu", 0.0, 1, 8)
    assert p.batch_windows == placement.CPU_BATCH_WINDOWS
    assert p.remote_args() == {"num_cpus": placement.CPU_PER_CODEC_ACTOR}


def test_gpu_cluster_gets_one_gpu_actor_per_card():
    p = placement.plan_actors({"CPU": 32, "GPU": 4})
    assert (p.device, p.gpus_per_actor, p.max_actors) == ("cuda", 1.0, 4)
    assert p.batch_windows == placement.GPU_BATCH_WINDOWS
    assert p.remote_args()["num_gpus"] == 1.0


def test_fractional_gpus_pack_actors():
    p = placement.plan_actors({"CPU": 32, "GPU": 2}, gpus_per_actor=0.25)
    assert p.max_actors == 8 and p.remote_args()["num_gpus"] == 0.25


def test_explicit_gpus_on_a_cluster_scaled_to_zero():
    """The GPU worker group may have 0 nodes now; --gpus-per-actor makes GPU actors the autoscaler adds for."""
    p = placement.plan_actors({"CPU": 4}, gpus_per_actor=0.5, min_actors=1, max_actors=16)
    assert (p.device, p.min_actors, p.max_actors) == ("cuda", 1, 16)


def test_override_to_cpu_on_gpu_cluster_and_precision_forced_fp32():
    p = placement.plan_actors({"CPU": 16, "GPU": 1}, gpus_per_actor=0, precision="bf16")
    assert p.device == "cpu" and p.precision == "fp32" and "num_gpus" not in p.remote_args()


def test_pool_bounds():
    p = placement.plan_actors({"CPU": 8}, actors=3)
    assert (p.min_actors, p.max_actors) == (3, 3)
    p = placement.plan_actors({"CPU": 8}, min_actors=2, max_actors=6)
    assert (p.min_actors, p.max_actors) == (2, 6)
    p = placement.plan_actors({"CPU": 2}, min_actors=3)
    assert (p.min_actors, p.max_actors) == (3, 3)
    with pytest.raises(ConfigError):
        placement.plan_actors({"CPU": 8}, min_actors=4, max_actors=2)
    with pytest.raises(ConfigError):
        placement.plan_actors({"CPU": 8}, gpus_per_actor=1.5)
    with pytest.raises(ConfigError):
        placement.plan_actors({"CPU": 8}, precision="int8")


def test_resolve_device():
    assert placement.resolve_device("cpu", cuda_available=False) == "cpu"
    assert placement.resolve_device("cuda", cuda_available=True) == "cuda"
    with pytest.raises(ConfigError, match="no CUDA device"):
        placement.resolve_device("cuda", cuda_available=False)


def test_autocast_on_cuda_only():
    assert placement.autocast_dtype("cuda", "bf16") is torch.bfloat16
    assert placement.autocast_dtype("cuda", "fp16") is torch.float16
    assert placement.autocast_dtype("cuda", "fp32") is None
    for prec in placement.PRECISIONS:
        assert placement.autocast_dtype("cpu", prec) is None
        with placement.autocast("cpu", prec):
            assert not torch.is_autocast_enabled("cpu")
    cm = placement.autocast("cuda", "bf16")
    assert isinstance(cm, torch.autocast) and cm.fast_dtype is torch.bfloat16


def test_strict_fp32_turns_tf32_off_on_cuda_only():
    flags = placement.tf32_flags()
    if not flags:
        pytest.skip("this torch has no fp32_precision settings")
    saved = [f.fp32_precision for f in flags]
    try:
        for f in flags:
            f.fp32_precision = "tf32"
        assert not placement.strict_fp32("cpu", "fp32") and not placement.strict_fp32("cuda", "bf16")
        assert [f.fp32_precision for f in flags] == ["tf32"] * len(flags)
        assert placement.strict_fp32("cuda", "fp32")
        assert [f.fp32_precision for f in flags] == ["ieee"] * len(flags)
    finally:
        for f, v in zip(flags, saved):
            f.fp32_precision = v


def test_to_device_pins_and_copies_async_for_cuda(monkeypatch):
    calls = []

    def fake_pin(self):
        calls.append("pin")
        return self

    def fake_to(self, *a, **kw):
        calls.append(("to", a, kw))
        return self

    x = np.zeros((2, 8), np.float32)
    t = placement.to_device(x, "cpu")
    assert t.data_ptr() == x.ctypes.data  # zero-copy on CPU
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    placement.to_device(x, "cuda")
    assert calls == ["pin", ("to", ("cuda",), {"non_blocking": True})]


def test_codec_actor_cpu_ignores_reduced_precision_and_refuses_cuda_without_gpu():
    from pipeline.codec import load
    from pipeline.encode.stages import CodecActor, _row
    import ray
    was_up = ray.is_initialized()
    c = load("mdct_rvq")
    n_frames = 10
    x = (0.1 * np.random.default_rng(0).standard_normal(n_frames * c.hop_length + sum(c.encode_context))
         ).astype(np.float32)
    rows = [_row("win", 1, 0, 0, n_frames, 1, x.tobytes()), _row("info", 1, info="{}")]
    batch = {k: np.array([r[k] for r in rows], dtype=object if k in ("payload", "info", "kind") else None)
             for k in rows[0]}
    outs = [CodecActor("mdct_rvq", None, c.checkpoint_hash(), 8, "cpu", 1, precision=p)(dict(batch))
            for p in ("fp32", "bf16")]
    assert outs[0]["payload"][0] == outs[1]["payload"][0]
    assert outs[0]["info"][1] == "{}"
    if not was_up:  # used outside Ray, the actor class must not start a Ray instance of its own
        assert not ray.is_initialized()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            CodecActor("mdct_rvq", None, c.checkpoint_hash(), 8, "cuda", 1)


def test_batch_seconds_become_whole_windows():
    from pipeline.encode import EncodeConfig
    cfg = EncodeConfig(src="s", dest="d", window_seconds=30, batch_seconds=1920).validate()
    assert cfg.windows_per_batch() == 64
    assert EncodeConfig(src="s", dest="d", window_seconds=30, batch_seconds=5).validate().windows_per_batch() == 1
    assert EncodeConfig(src="s", dest="d", batch_windows=3).validate().windows_per_batch() == 3
    assert EncodeConfig(src="s", dest="d").validate().windows_per_batch() is None  # placement's default
    with pytest.raises(ConfigError, match="not both"):
        EncodeConfig(src="s", dest="d", batch_windows=2, batch_seconds=60).validate()
    with pytest.raises(ConfigError, match="positive"):
        EncodeConfig(src="s", dest="d", batch_seconds=0).validate()
    a = build_parser().parse_args(["encode", "s", "d", "--batch-seconds", "600"])
    assert a.batch_seconds == 600.0


def test_cli_accepts_cluster_options():
    a = build_parser().parse_args(["encode", "s", "d", "--min-actors", "1", "--max-actors", "8",
                                   "--gpus-per-actor", "0.25", "--precision", "bf16", "--batch-windows", "128"])
    assert (a.min_actors, a.max_actors, a.gpus_per_actor, a.precision, a.batch_windows) == (1, 8, 0.25, "bf16",
                                                                                           128)


def test_job_entrypoint_and_shipping(monkeypatch):
    argv = ["encode", "s3://in/", "s3://out/", "--address", "http://h:8265", "--actors=2", "--json"]
    assert cluster.job_entrypoint(argv) == ["python", "-m", "jobs.encode", "s3://in/", "s3://out/", "--actors=2",
                                            "--json"]
    assert cluster.job_entrypoint(["inspect", "d", "--address=http://h:8265"]) == \
        ["python", "-m", "pipeline.cli", "inspect", "d"]
    assert cluster.is_job_server("http://127.0.0.1:8265") and not cluster.is_job_server("127.0.0.1:6379")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("AUDIOARC_SHIP_CODE", raising=False)
    assert "py_modules" in cluster.driver_kwargs("127.0.0.1:6379")["runtime_env"]
    assert cluster.driver_kwargs("local") == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert cluster.driver_kwargs("127.0.0.1:6379") == {}  # inside `ray job submit`: already shipped
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.setenv("AUDIOARC_SHIP_CODE", "0")
    assert cluster.driver_kwargs("127.0.0.1:6379") == {} and "working_dir" not in cluster.runtime_env()


CUDA_PROBE = """
import sys
from pipeline import placement
print(placement.cuda_available(tuple(sys.argv[1:])), "torch" in sys.modules)
"""


def test_cuda_available_needs_no_torch_on_a_machine_without_gpu_device_nodes(tmp_path):
    """No GPU device node: False, and torch (~1 s to import) is not loaded to say so; a device node present:
    torch is asked (on this CPU-only build it answers False)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    node = tmp_path / "nvidia0"
    missing = subprocess.run([sys.executable, "-c", CUDA_PROBE, str(tmp_path / "nvidia[0-9]*"), str(tmp_path / "kfd")],
                             capture_output=True, text=True, cwd=root, timeout=120)
    assert missing.stdout.split() == ["False", "False"], missing.stderr[-2000:]
    node.write_bytes(b"")
    present = subprocess.run([sys.executable, "-c", CUDA_PROBE, str(tmp_path / "nvidia[0-9]*")],
                             capture_output=True, text=True, cwd=root, timeout=120)
    import torch
    assert present.stdout.split() == [str(torch.cuda.is_available()), "True"], present.stderr[-2000:]
